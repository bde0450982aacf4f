# Copyright 2026 The pmf-diffusers developers. MIT License.
"""`pmf push-space`: publish the Gradio app to a Hub Space with the package inside
(`pmf_diffusers.hub.push_space_to_hub`)."""

from __future__ import annotations

from . import EXIT_OK, add_command_parser
from .push import add_upload_arguments, upload_options

EPILOG = """\
pmf-diffusers is not on the package index, so the Space carries it: the package is built as a wheel from this
checkout (or --wheel is used) and unpacked next to app.py, where `python app.py` imports it; requirements.txt lists
the package's runtime dependencies (from its metadata), and Gradio comes from `sdk_version` in the Space README.
The app files and the README (the Space's YAML configuration) are uploaded as they are, in one commit that also
removes the package files of an earlier push. The token comes from --token-file, else huggingface_hub's usual
sources (HF_TOKEN, `hf auth login`); it is never printed, and no file holding it is uploaded.

examples:
  pmf push-space me/pmf-demo --dry-run --staging-dir staged-space/   # build and stage, send nothing
  pmf push-space me/pmf-demo                                         # create (or update) the Space
  pmf push-space me/pmf-demo --private --token-file ~/.hf-write-token
  pmf push-space me/pmf-demo --wheel dist/pmf_diffusers-0.1.0-py3-none-any.whl --app-dir my_app/
"""


def add_parser(subparsers):
    parser = add_command_parser(
        subparsers,
        "push-space",
        help="publish the Gradio app (spaces_app/) to a Hub Space, with the package inside",
        description="Publish the Gradio demo to a Hugging Face Space that builds without pmf-diffusers on the index.",
        epilog=EPILOG,
    )
    parser.add_argument("repo_id", help="Space id, namespace/name (created with the README's SDK if missing)")
    parser.add_argument(
        "--app-dir", default=None, metavar="DIR", help="the app folder (default: spaces_app/ of this checkout)"
    )
    parser.add_argument(
        "--wheel", default=None, metavar="WHEEL",
        help="a built pmf_diffusers wheel to ship (default: build one from this checkout with pip)",
    )
    add_upload_arguments(parser, "Space")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from ..hub import push_space_to_hub

    result = push_space_to_hub(args.repo_id, app_dir=args.app_dir, wheel=args.wheel, **upload_options(args))
    print(result.summary())
    return EXIT_OK
