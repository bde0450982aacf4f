"""Package-level conventions: logging follows diffusers' verbosity controls."""

import logging

from diffusers.utils import logging as diffusers_logging


def test_diffusers_verbosity_controls_reach_pmf_loggers():
    import pmf_diffusers.training.objective  # noqa: F401  (any module with a logger)

    logger = diffusers_logging.get_logger("pmf_diffusers.training.objective")
    previous = diffusers_logging.get_verbosity()
    try:
        diffusers_logging.set_verbosity_error()
        assert not logger.isEnabledFor(logging.WARNING)
        diffusers_logging.set_verbosity_info()
        assert logger.isEnabledFor(logging.INFO)
    finally:
        diffusers_logging.set_verbosity(previous)
