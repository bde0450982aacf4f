# Copyright 2026 The pmf-diffusers developers. MIT License.
"""`pmf push`: publish a PMFPipeline folder to the Hub (`pmf_diffusers.hub.push_pipeline_to_hub`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..hub import CARD_KINDS  # hub.py imports torch and huggingface_hub only inside its functions
from . import EXIT_OK, CLIError, add_command_parser

EPILOG = """\
The repo receives the pipeline (safetensors only; pickle weights never leave the machine), a model card rendered
from the pipeline's config, samples.png (one step, fixed seeds) and pipeline_pmf.py, so that diffusers' generic
loader finds the pipeline class. The token comes from --token-file, else huggingface_hub's usual sources
(HF_TOKEN, `hf auth login`); it is never printed, and a push (or a dry run) that would upload a file holding it
is refused.

examples:
  pmf push runs/toy-cpu/pipeline me/pmf-toy --dry-run                 # list the files, send nothing
  pmf push runs/toy-cpu/pipeline me/pmf-toy --dry-run --staging-dir staged/   # and keep them to look at
  pmf push ./pmf-b-16 me/pmf-b16 --private --card-kind official
  pmf push runs/flowers/pipeline me/pmf-flowers --base-model me/pmf-b16 --license cc-by-nc-4.0 --revision dev
  pmf push runs/toy-cpu/pipeline me/pmf-toy --card-info card.json --create-pr
"""


def add_parser(subparsers):
    parser = add_command_parser(
        subparsers,
        "push",
        help="publish a PMFPipeline folder to the Hub (weights, card, sample grid, loader shim)",
        description="Push a PMFPipeline folder to a Hub model repo with its model card and sample grid.",
        epilog=EPILOG,
    )
    parser.add_argument("folder", help="a saved PMFPipeline folder (pipe.save_pretrained / pmf convert output)")
    parser.add_argument("repo_id", help="Hub repo id, namespace/name")
    add_upload_arguments(parser, "repo")
    parser.add_argument("--revision", default=None, metavar="BRANCH", help="branch to push to (created from main if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request against main instead of committing")
    parser.add_argument(
        "--card-kind", choices=CARD_KINDS, default=None,
        help="model card: 'official' (converted released weights) or 'trained'; default: decided from the pipeline",
    )
    parser.add_argument(
        "--card-info", default=None, metavar="JSON_FILE",
        help="JSON object of model-card fields: preset, dataset, training_steps, recipe, command, base_model, "
        "license, metrics, title, description",
    )
    parser.add_argument("--base-model", default=None, metavar="REPO_ID", help="Hub id of the model this was fine-tuned from")
    parser.add_argument("--license", default=None, help="license id of trained weights (default mit)")
    parser.add_argument("--no-samples", action="store_true", help="do not render samples.png")
    parser.set_defaults(func=run)
    return parser


def add_upload_arguments(parser, target: str) -> None:
    """The options every push command shares (`pmf push`, `pmf push-space`); `target` names what is created."""
    parser.add_argument(
        "--private", action="store_const", const=True, default=None,
        help=f"create the {target} private (ignored when it exists)",
    )
    parser.add_argument("--commit-message", default=None, metavar="MESSAGE")
    parser.add_argument(
        "--dry-run", action="store_true", help="stage and list the files that would be uploaded; send nothing"
    )
    parser.add_argument("--staging-dir", default=None, metavar="DIR", help="stage into DIR and keep it (inspect a dry run)")
    parser.add_argument(
        "--token-file", default=None, metavar="PATH",
        help="read the Hub token from this file (default: HF_TOKEN or the `hf auth login` token)",
    )


def upload_options(args) -> dict:
    """The keyword arguments of `hub.push_*_to_hub` that the options of `add_upload_arguments` set."""
    from ..hub import read_token_file

    return {
        "private": args.private,
        "token": read_token_file(args.token_file) if args.token_file else None,
        "commit_message": args.commit_message,
        "dry_run": args.dry_run,
        "staging_dir": args.staging_dir,
    }


def _card_info(args) -> dict:
    """The model-card fields of --card-info, --base-model and --license."""
    info: dict = {}
    if args.card_info:
        path = Path(args.card_info)
        try:
            info = json.loads(path.read_text())
        except OSError as error:
            raise CLIError(f"cannot read --card-info {path}: {error.strerror or error}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CLIError(f"--card-info {path} is not valid JSON: {error}") from None
        if not isinstance(info, dict):
            raise CLIError(f"--card-info {path} must hold a JSON object")
    if args.base_model:
        info["base_model"] = args.base_model
    if args.license:
        info["license"] = args.license
    return info


def run(args) -> int:
    from ..hub import push_pipeline_to_hub

    options = upload_options(args)
    result = push_pipeline_to_hub(
        args.folder,
        args.repo_id,
        revision=args.revision,
        create_pr=args.create_pr,
        card_kind=args.card_kind,
        card_info=_card_info(args),
        sample_grid=not args.no_samples,
        **options,
    )
    print(result.summary())
    return EXIT_OK
