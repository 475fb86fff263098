"""Start the recommendation service, swap model versions in place, roll back (``polyrec serve``).

The application is deployed the way ``serve deploy`` and KubeRay's RayService deploy it: as a
declarative config (``serve.app:build_app`` plus ``args``). Only on that path does a change of a
deployment's ``user_config`` alone reach the running replicas through ``reconfigure``, without
restarting them; ``serve.run`` gives every deploy a new code version and so replaces every replica.

A swap runs in two steps, so that no request meets a replica without its version: first the model
deployments (Retriever and Ranker, or the colocated graph's Recommender) load the new version beside
the current one, then the ingress (Ingress or Recommender) sends new requests to it.
Every swap is recorded in ``<state_dir>/versions.json``; a rollback serves the version before.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.serve.schema import ApplicationStatus, ServeApplicationSchema, ServeDeploySchema

from data.errors import InputError
from serve.app import build_app
from serve.config import SERVE_THROUGHPUT_ENV, ServeConfig
from serve.versions import VersionHistory, VersionRecord, artifact_version

APP_NAME = "polyrec"
IMPORT_PATH = f"{build_app.__module__}:{build_app.__name__}"
SERVE_CONFIG_FILE = Path(__file__).with_name("serve_config.yaml")
SOURCE_ROOT = str(Path(__file__).resolve().parents[1])
#: Settings of the driver, not of the application: left out of ``args`` so that they never change
#: the application's code version (which would restart every replica).
DRIVER_FIELDS = {"model", "host", "port", "ray_address", "ray_num_cpus"}
DEPLOY_TIMEOUT_S = 600
SERVE_CONFIG_HEADER = """\
# Ray Serve config of polyrec's recommendation service (Ray Serve config schema, ray 2.60).
#   serve run serve/serve_config.yaml      (or `serve deploy` to a running cluster)
# The KubeRay RayService's serveConfigV2 is generated from this file:
#   python -m cluster.manifests sync       (see k8s/README.md)
# Generated from serve.config.ServeConfig's defaults, with the split graph for a cluster, by
# serve.runner.write_serve_config_file; any ServeConfig field may be added under args. Paths are
# relative to the working folder of the workers: use absolute paths or URIs on a cluster.
# Model swap without restart: set user_config {models: [OLD, NEW]} on Retriever and Ranker, apply,
# then user_config {model: NEW} on Ingress and apply again (serve.runner.swap_model does both).
# UserStateStore is the single shared copy of the server-side state: keep it at one replica.
# On a small machine, `graph: colocated` (the default of `polyrec serve`) serves the API and runs
# every model stage in one Recommender deployment: list it instead of Ingress, Retriever, Ranker and
# ReRanker, and give it both user_config keys {model, models} in a swap."""


@dataclass
class Service:
    """A running service, as ``run_service(..., blocking=False)`` returns it."""

    url: str
    model: VersionRecord
    config: ServeConfig
    owns_ray: bool  # whether run_service started the Ray instance (and stop() ends it)

    def stop(self) -> None:
        """Graceful shutdown: replicas finish their requests and the FeedbackLogger flushes its WAL."""
        serve.shutdown()
        if self.owns_ray:
            ray.shutdown()


def run_service(
    config: ServeConfig,
    *,
    model: str | None = None,
    port: int | None = None,
    feedback_log: str | None = None,
    blocking: bool = True,
) -> Service:
    """Serve ``model`` (default: the version served last, else ``config.model``) on ``port``.

    If the application already runs on the cluster, the model is swapped in place instead. With
    ``blocking`` this returns only after Ctrl-C or SIGTERM, having shut down gracefully.
    """
    config = _absolute(config, port=port, feedback_log=feedback_log)
    history = VersionHistory(config.state_dir)
    current = history.current()
    target = _absolute_path(model) if model else current.model if current else config.model
    artifact_version(target)  # a clean error before anything starts
    owns_ray = _connect(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    if _running():
        _swap_in_place(config, current.model if current else None, target)
    else:
        _deploy(config, models=[target], active=target)
    service = Service(f"http://{config.host}:{config.port}", history.record(target), config, owns_ray)
    if blocking:
        _serve_until_stopped(service)
    return service


def swap_model(config: ServeConfig, model: str) -> VersionRecord:
    """Put ``model`` in service on the running application, in place; returns its record."""
    config = _absolute(config)
    model = _absolute_path(model)
    artifact_version(model)
    history = VersionHistory(config.state_dir)
    current = history.current()
    _swap_in_place(config, current.model if current else None, model)
    return history.record(model)


def rollback(config: ServeConfig, *, port: int | None = None, feedback_log: str | None = None, blocking: bool = True) -> VersionRecord:
    """Serve the version before the current one: in place when the application runs on the cluster
    (``config.ray_address``, else the local one), otherwise by starting the service with it."""
    config = _absolute(config, port=port, feedback_log=feedback_log)
    history = VersionHistory(config.state_dir)
    current, previous = history.current(), history.previous()
    if _find_cluster(config) and _running():
        _swap_in_place(config, current.model, previous.model)
        history.drop_current()
    else:
        history.drop_current()
        run_service(config, model=previous.model, blocking=blocking)
    return previous


def _swap_in_place(config: ServeConfig, current: str | None, model: str) -> None:
    models = [current, model] if current and current != model else [model]
    if current is not None:
        _deploy(config, models=models, active=current)
    _deploy(config, models=models, active=model)


# --- the Serve config ------------------------------------------------------------------------


def throughput_env() -> dict[str, str]:
    """``SERVE_THROUGHPUT_ENV``, each variable as this process's environment has it if set."""
    return {name: os.environ.get(name, value) for name, value in SERVE_THROUGHPUT_ENV.items()}


def use_throughput_env() -> None:
    """Put ``SERVE_THROUGHPUT_ENV`` in this process's environment (where not set), before it starts a
    local Ray instance: every process of the instance, the HTTP proxy too, inherits it."""
    for name, value in SERVE_THROUGHPUT_ENV.items():
        os.environ.setdefault(name, value)


def application_config(config: ServeConfig, *, models: list[str], active: str) -> dict[str, Any]:
    """The application's entry of a Serve config file: ``args`` from ``config``, and the model
    versions as ``user_config`` overrides (which a redeploy applies in place)."""
    return {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": config.model_dump(mode="json", exclude=DRIVER_FIELDS),
        # Replicas and the controller's build task import polyrec from this checkout, installed or not.
        "runtime_env": {"env_vars": {**throughput_env(), "PYTHONPATH": os.pathsep.join(filter(None, [SOURCE_ROOT, os.environ.get("PYTHONPATH")]))}},
        "deployments": [{"name": name, "user_config": user_config} for name, user_config in config.user_configs(models=models, active=active).items()],
    }


def serve_config_document(config: ServeConfig, args: dict[str, Any]) -> dict[str, Any]:
    """A whole Serve config file (``serve run``/``serve deploy``, KubeRay ``serveConfigV2``) whose
    deployments, those of ``config``'s graph, carry its resources; ``serve/serve_config.yaml`` is
    this for the defaults."""
    deployments = [{"name": name, **config.deployments[name].serve_options()} for name in config.graph_deployments()]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": config.port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args,
             "runtime_env": {"env_vars": SERVE_THROUGHPUT_ENV}, "deployments": deployments}
        ],
    }


def _deploy(config: ServeConfig, *, models: list[str], active: str) -> None:
    from ray.serve.context import _get_global_client

    # The controller's declarative deploy, which `serve deploy` reaches through the dashboard's REST
    # API: Serve has no public Python call for it.
    schema = ServeDeploySchema(applications=[ServeApplicationSchema(**application_config(config, models=models, active=active))])
    _get_global_client().deploy_apps(schema)
    _wait_running()


def _running() -> bool:
    application = serve.status().applications.get(APP_NAME)  # empty when Serve is not started
    return application is not None and application.status in (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOYING)


def _wait_running() -> None:
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while time.monotonic() < deadline:
        application = serve.status().applications[APP_NAME]
        if application.status == ApplicationStatus.RUNNING:
            return
        if application.status == ApplicationStatus.DEPLOY_FAILED:
            problems = [f"{name}: {d.message}" for name, d in application.deployments.items() if d.message]
            raise InputError(f"serve: application {APP_NAME} failed to deploy: {application.message} {'; '.join(problems)}")
        time.sleep(0.2)
    raise TimeoutError(f"serve: application {APP_NAME} not running after {DEPLOY_TIMEOUT_S}s")


# --- the driver ------------------------------------------------------------------------------


def _absolute_path(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _absolute(config: ServeConfig, *, port: int | None = None, feedback_log: str | None = None) -> ServeConfig:
    """Paths made absolute here: replicas and the controller's build task have other working folders."""
    feedback = config.feedback.model_copy(update={
        "path": _absolute_path(feedback_log or config.feedback.path),
        "wal_dir": _absolute_path(config.feedback.wal_dir) if config.feedback.wal_dir else None,
    })
    update: dict[str, Any] = {
        "model": _absolute_path(config.model),
        "state_dir": _absolute_path(config.state_dir),
        "feedback": feedback,
        "feedback_log": None,
        "port": port or config.port,
    }
    for field in ("training_data", "model_root"):
        if getattr(config, field):
            update[field] = _absolute_path(getattr(config, field))
    return config.model_copy(update=update)


def _connect(config: ServeConfig) -> bool:
    """Connect to ``config.ray_address``, or start a local instance; returns whether this started Ray."""
    if ray.is_initialized():
        return False
    if config.ray_address:
        ray.init(address=config.ray_address, logging_level="WARNING")
        return False
    use_throughput_env()
    ray.init(num_cpus=config.ray_num_cpus, logging_level="WARNING")
    return True


def _find_cluster(config: ServeConfig) -> bool:
    """Connect to a running cluster (``config.ray_address``, else the local one); False if none runs."""
    if ray.is_initialized():
        return True
    try:
        ray.init(address=config.ray_address or "auto", logging_level="WARNING")
    except ConnectionError:
        return False
    return True


def _serve_until_stopped(service: Service) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`, Kubernetes: same as Ctrl-C
    print(f"polyrec serving model {service.model.model_version} at {service.url} (docs: {service.url}/docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    finally:
        service.stop()


def write_serve_config_file(path: Path = SERVE_CONFIG_FILE) -> None:
    """Regenerate ``serve/serve_config.yaml``: the ``ServeConfig`` defaults with the cluster's split graph."""
    config = ServeConfig(graph="split")
    document = serve_config_document(config, {"graph": config.graph, "model": config.model, "feedback_log": config.feedback.path})
    header = "".join(line + "\n" for line in SERVE_CONFIG_HEADER.splitlines())
    path.write_text(header + yaml.safe_dump(document, sort_keys=False, width=120))
