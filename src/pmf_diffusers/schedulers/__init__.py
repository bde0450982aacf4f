from .scheduling_pmf import PMFScheduler, PMFSchedulerOutput

__all__ = ["PMFScheduler", "PMFSchedulerOutput"]
