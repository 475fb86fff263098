"""The ``polyrec`` command: one subcommand per stage, plus the end-to-end pipeline.

User errors (``InputError``) print as one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from common.config import StageConfig
from common.console import console_session
from common.errors import InputError


def _preprocess(args: argparse.Namespace) -> None:
    from data.config import PreprocessConfig
    from data.manifest import format_report
    from data.pipeline import run_preprocess

    config = PreprocessConfig.from_yaml(args.config, output=args.output)
    manifest = run_preprocess(config)
    print(format_report(manifest))


def _train(args: argparse.Namespace) -> None:
    from train.config import TrainConfig
    from train.trainer import run_training

    config = TrainConfig.from_yaml(args.config, data=args.data, output=args.output, resume_from=args.resume_from)
    result = run_training(config)
    print(f"model artifact: {result.artifact}")
    print(f"best validation NDCG@10: {result.best_validation['validation/NDCG@10']:.4f}")


def _pretrain(args: argparse.Namespace) -> None:
    from train.pretrain import PretrainConfig, run_pretrain

    result = run_pretrain(PretrainConfig.from_yaml(args.config, data=args.data, output=args.output))
    record = result.provenance
    print(f"pretrained backbone: {result.output} ({record['objective']}, {record['steps']} steps, loss {record['final_loss']:.4f}, {record['seconds']:.0f}s)")
    print(f"use it with: model.backbone.name_or_path: {result.output}")


def _evaluate(args: argparse.Namespace) -> None:
    from train.evaluate import evaluate_artifact

    metrics = evaluate_artifact(args.model, args.data, split=args.split, output=args.output, use_ray_data=args.ray_data)
    for model_name, values in metrics.items():
        print(model_name, {k: round(v, 4) for k, v in values.items() if "@" in k})


def _submit(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus

    from cluster.submit import job_status, submit

    args, stage_args = submit_options(args)
    job_id = submit(args.job_stage, stage_args, address=args.address, follow=args.follow, extra_pip=args.pip or None)
    print(job_id)
    if args.follow and job_status(job_id, address=args.address) != JobStatus.SUCCEEDED:
        return 1
    return 0


def _add_submit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="dashboard URL http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs; exit 1 unless it succeeds")
    parser.add_argument("--pip", action="append", default=[], metavar="REQ", help="extra pip requirement for the job")


def submit_options(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """``polyrec submit``'s own options wherever they stand, also among the stage's arguments after STAGE (no stage
    has options of these names); the rest, in order, goes to the stage."""
    own = argparse.ArgumentParser(add_help=False)
    _add_submit_options(own)
    return own.parse_known_args(args.job_args, namespace=args)


def _job(args: argparse.Namespace) -> None:
    from cluster.submit import job_logs, job_status, stop_job

    if args.action == "status":
        print(job_status(args.job_id, address=args.address))
    elif args.action == "logs":
        print(job_logs(args.job_id, address=args.address, tail_lines=args.tail))
    else:
        print("stopped" if stop_job(args.job_id, address=args.address) else "already finished")


def _k8s(args: argparse.Namespace) -> int:
    from cluster import manifests

    if (args.action == "build") != (args.dir is not None):
        raise InputError("k8s build takes one kustomization folder (e.g. k8s/overlays/cpu); sync and check take none: they cover every one under k8s/")
    return manifests.main([args.action, *([args.dir] if args.dir else [])])


def _serve(args: argparse.Namespace) -> None:
    from serve.config import ServeConfig
    from serve.runner import rollback, run_service

    config = ServeConfig.from_yaml(args.config, host=args.host, insecure=args.insecure or None)
    if args.rollback:
        rollback(config, port=args.port, feedback_log=args.feedback_log, blocking=not args.detach)  # it says which version
    else:
        service = run_service(config, model=args.model, port=args.port, feedback_log=args.feedback_log, blocking=not args.detach)
        if not service.stopped:  # detached, or the model of a running service swapped
            print(f"serving {service.model.model_version} at {service.url}")


def _retrain(args: argparse.Namespace) -> None:
    from cluster.retrain import RetrainConfig, run_retrain
    from train.config import TrainConfig

    config = RetrainConfig.from_yaml(args.config, feedback_log=args.feedback_log, current_model=args.model, output=args.output)
    if args.train_config:
        config.train = TrainConfig.from_yaml(args.train_config)
    if args.ray_address:
        config.preprocess.ray.address = config.train.ray.address = config.serving.ray.address = args.ray_address
    if args.serving:
        config.serving.kind = args.serving
    outcome = run_retrain(config)
    print(outcome.reason)


def stage_configs() -> dict[str, type[StageConfig]]:
    """Each stage's typed config, by the name of its file under configs/."""
    from cluster.retrain import RetrainConfig
    from data.config import PreprocessConfig
    from serve.config import ServeConfig
    from train.config import TrainConfig
    from train.pretrain import PretrainConfig

    return {"preprocess": PreprocessConfig, "pretrain": PretrainConfig, "train": TrainConfig, "serve": ServeConfig, "retrain": RetrainConfig}


def _defaults(args: argparse.Namespace) -> None:
    print(stage_configs()[args.config_stage]().to_yaml(), end="")


def _pipeline(args: argparse.Namespace) -> None:
    from cluster.pipeline import run_pipeline

    stage_files = {"configs": Path(args.configs)} if args.configs else {}
    run_pipeline(output=args.output, port=args.port, keep_serving=args.keep_serving, pretrain=args.pretrain, **stage_files)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyrec", description="polyrec: an LLM-driven multi-task recommender on Ray.")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name: str, handler: Callable[[argparse.Namespace], None], help_text: str) -> argparse.ArgumentParser:
        sub = stages.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("--verbose", action="store_true", help="also show Ray's and the libraries' own logs (else in <run folder>/logs/polyrec.log)")
        return sub

    sub = stage("preprocess", _preprocess, "Read, clean and split interactions into Parquet shards + manifest.")
    sub.add_argument("--config", help="YAML file (see configs/preprocess.yaml); defaults run the embedded MovieLens-100K")
    sub.add_argument("--output", help="output location: a path or a pyarrow filesystem URI (file://, s3://, gs://)")

    sub = stage("train", _train, "Train the multi-task model on Ray Train + DeepSpeed; export and evaluate it.")
    sub.add_argument("--config", help="YAML file (see configs/train.yaml)")
    sub.add_argument("--data", help="preprocessing output (path or URI)")
    sub.add_argument("--output", help="folder for checkpoints, the artifact, metrics and plots")
    sub.add_argument("--resume-from", help="a checkpoint folder to continue from")

    sub = stage("pretrain", _pretrain, "Continue pretraining the item encoder's language model on the catalogue's text (MLM, CLM or contrastive).")
    sub.add_argument("--config", help="YAML file (see configs/pretrain.yaml)")
    sub.add_argument("--data", help="preprocessing output (path or URI)")
    sub.add_argument("--output", help="the Hugging Face folder to write (new or empty); give it to model.backbone.name_or_path")

    sub = stage("evaluate", _evaluate, "Full-ranking evaluation of a model artifact against baselines.")
    sub.add_argument("--model", default="runs/default/model/artifact", help="model artifact folder")
    sub.add_argument("--data", default="runs/default/data", help="preprocessing output (path or URI)")
    sub.add_argument("--split", default="test", choices=["validation", "test"])
    sub.add_argument("--output", default="runs/default/evaluation", help="folder for metrics.json/.md/.png")
    sub.add_argument("--ray-data", action="store_true", help="batch inference through Ray Data (large user sets)")

    from cluster.submit import STAGES

    sub = stage("submit", _submit, "Run a stage on a Ray cluster through the Ray Jobs API.")
    _add_submit_options(sub)
    sub.add_argument("job_stage", choices=STAGES, metavar="STAGE", help=", ".join(STAGES))
    sub.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments passed to the stage")

    sub = stage("job", _job, "Status, logs or stop of a submitted job.")
    sub.add_argument("action", choices=["status", "logs", "stop"])
    sub.add_argument("job_id")
    sub.add_argument("--address", help="dashboard URL (default: $RAY_ADDRESS)")
    sub.add_argument("--tail", type=int, help="only the last N log lines")

    sub = stage("k8s", _k8s, "KubeRay manifests: sync the RayService from serve/serve_config.yaml; check and build render k8s/ with kubectl kustomize.")
    sub.add_argument("action", choices=["sync", "check", "build"])
    sub.add_argument("dir", nargs="?", help="build: the kustomization folder")

    sub = stage("serve", _serve, "Serve the recommendation graph on Ray Serve (or swap the model of the running app).")
    sub.add_argument("--config", help="YAML file (see configs/serve.yaml)")
    sub.add_argument("--model", help="model artifact folder to serve (default: the version served last)")
    sub.add_argument("--port", type=int, help="HTTP port")
    sub.add_argument("--host", help="address to listen on (default 127.0.0.1; any other needs an API key: $POLYREC_API_KEY)")
    sub.add_argument("--insecure", action="store_true", help="allow open write endpoints on a non-loopback address")
    sub.add_argument("--feedback-log", help="where the feedback log goes (path or URI)")
    sub.add_argument("--rollback", action="store_true", help="serve the version before the current one")
    sub.add_argument("--detach", action="store_true", help="return once deployed, leaving the app on the Ray cluster")

    sub = stage("retrain", _retrain, "Retrain from the base data plus the feedback log; promote and hot-swap if it is better.")
    sub.add_argument("--config", help="YAML file (see configs/retrain.yaml)")
    sub.add_argument("--train-config", help="the training config that trained the model in service (replaces the config's train: section)")
    sub.add_argument("--feedback-log", help="the feedback log (path or URI)")
    sub.add_argument("--model", help="the artifact in service (warm start and gate reference; default: the version the service runs)")
    sub.add_argument("--output", help="folder for the new data and model")
    sub.add_argument("--ray-address", help="the Ray cluster to run on and whose service to promote into (default: the local one)")
    sub.add_argument("--serving", choices=["ray", "kubernetes"], help="where the service runs (kubernetes: the RayService, from a pod)")

    sub = stage("defaults", _defaults, "Print a stage's default config as YAML (what configs/<stage>.yaml writes out).")
    sub.add_argument(
        "config_stage", choices=["preprocess", "pretrain", "train", "serve", "retrain"], metavar="STAGE", help="preprocess, pretrain, train, serve or retrain"
    )

    sub = stage("pipeline", _pipeline, "The main job: preprocess, train, evaluate, serve, simulated users, retrain, hot swap, report.")
    sub.add_argument("--output", default="runs/default", help="folder for every stage's output")
    sub.add_argument("--port", type=int, default=8000, help="HTTP port of the service")
    sub.add_argument("--keep-serving", action="store_true", help="keep the service up at the end (Ctrl-C stops it)")
    sub.add_argument("--pretrain", action="store_true", help="continue pretraining the backbone on the catalogue's text first (configs/pretrain.yaml)")
    sub.add_argument(
        "--configs", help="folder of the stages' files (preprocess.yaml, train.yaml, ...; default: configs/); a stage without one runs on its defaults"
    )
    return parser


#: The commands that write a run's outputs, and so its log file; the others only talk to a cluster or print.
RUN_STAGES = frozenset({"preprocess", "pretrain", "train", "evaluate", "serve", "retrain"})


def run_folder(args: argparse.Namespace) -> Path | None:
    """Where a command's log file goes (``<run folder>/logs/polyrec.log``): the pipeline's ``--output``; for a stage, the
    folder that holds its output (``runs/default`` for ``runs/default/model``; the service's: its state folder), or
    ``runs`` for an output URI."""
    if args.stage == "pipeline":
        return Path(args.output)
    if args.stage not in RUN_STAGES:
        return None
    if args.stage == "evaluate":
        output = args.output
    else:
        config = stage_configs()[args.stage].from_yaml(args.config, output=getattr(args, "output", None))
        output = config.state_dir if args.stage == "serve" else config.output
    return Path("runs") if "://" in output else Path(output).parent


def main(argv: Sequence[str] | None = None) -> int:
    # Hub downloads are never wanted at run time: models come from local folders or packages.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    ray_was_connected = _ray_connected()
    try:
        with console_session(run_folder(args), verbose=args.verbose):
            status = args.handler(args) or 0
    except InputError as err:
        print(f"polyrec {args.stage}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _ray_connected() and not ray_was_connected:
            # Before the message: Ray prints its workers' log lines until the driver disconnects, which would
            # otherwise happen at exit, after it. A connection the caller had (a notebook, a test) stays.
            import ray

            ray.shutdown()
        print(f"polyrec {args.stage}: interrupted", file=sys.stderr)
        return 130
    return status


def _ray_connected() -> bool:
    # Without importing Ray: most commands never do.
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


if __name__ == "__main__":
    sys.exit(main())
