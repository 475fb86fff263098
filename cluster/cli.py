"""The ``polyrec`` command: one subcommand per stage, plus the end-to-end pipeline.

User errors (``InputError``) print as one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from data.errors import InputError


def _preprocess(args: argparse.Namespace) -> None:
    from data.config import PreprocessConfig
    from data.pipeline import format_report, run_preprocess

    config = PreprocessConfig.from_yaml(args.config, output=args.output)
    manifest = run_preprocess(config)
    print(format_report(manifest))


def _pipeline(args: argparse.Namespace) -> None:
    from cluster.pipeline import run_pipeline

    run_pipeline(output=args.output, keep_serving=getattr(args, "keep_serving", False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyrec", description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name: str, handler: Callable[[argparse.Namespace], None], help_text: str) -> argparse.ArgumentParser:
        sub = stages.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    sub = stage("preprocess", _preprocess, "Read, clean and split interactions into Parquet shards + manifest.")
    sub.add_argument("--config", help="YAML file (see configs/preprocess.yaml); defaults run the embedded MovieLens-100K")
    sub.add_argument("--output", help="output location: a path or a pyarrow filesystem URI (file://, s3://, gs://)")

    sub = stage("pipeline", _pipeline, "The main job: the whole loop on the embedded default.")
    sub.add_argument("--output", default="runs/default", help="folder for every stage's output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Hub downloads are never wanted at run time: models come from local folders or packages.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except InputError as err:
        print(f"polyrec {args.stage}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"polyrec {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
