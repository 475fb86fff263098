"""The KubeRay RayService as the serving side of ``polyrec retrain --serving kubernetes``.

The nightly RayCronJob runs on a Ray cluster of its own, where no Serve application runs: the version
in service, and the way to put a new one in service, are in the RayService's ``spec.serveConfigV2``.
A promotion rewrites only the ``user_config`` of the polyrec application's deployments there. KubeRay
sends the changed config to the serving cluster's Serve (a serveConfigV2 change never starts a new Ray
cluster; only a change of ``rayClusterConfig`` does), and Serve applies a change of ``user_config``
alone with ``reconfigure`` on the running replicas, without restarting them.

As in ``serve.runner``'s local swap, a promotion takes two writes, each waited for until KubeRay reports
it applied, so that no request meets a replica without its version: the model deployments load the new
version beside the live one, then the ingress sends new requests to it.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from common.errors import InputError
from serve.config import ServeConfig
from serve.runner import APP_NAME

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
#: Mounted in every pod with a service-account token; holds the pod's namespace.
POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: One API call; a promotion as a whole is bounded by ``promote``'s ``timeout_s``.
REQUEST_TIMEOUT_S = 30.0
#: Status polling starts fast (a user_config change is applied in seconds) and backs off to this.
MAX_POLL_INTERVAL_S = 5.0
#: KubeRay writes the RayService's status every few seconds, and every write changes its
#: resourceVersion, which a promotion's write carries as a precondition: a conflict is retried.
MAX_WRITE_ATTEMPTS = 5
#: Who changed serveConfigV2, as ``kubectl get rayservice --show-managed-fields`` tells.
FIELD_MANAGER = "polyrec-retrain"
#: The serialisation of ``cluster.manifests`` (which generates serveConfigV2), so that an untouched
#: config keeps its text.
YAML_DUMP_OPTIONS: dict[str, Any] = {"sort_keys": False, "width": 120}

UserConfigs = dict[str, dict[str, Any]]


class RayServiceTarget:
    """The polyrec application of one KubeRay RayService: the model it serves, and promotion.

    ``api_client`` (a ``kubernetes.client.ApiClient``) is used as given; without one, the pod's
    service-account token when running in a pod, else the kubeconfig. ``namespace`` defaults to the
    pod's namespace, else the kubeconfig context's, else ``default``.
    """

    def __init__(self, name: str = "polyrec-serve", namespace: str | None = None, api_client: client.ApiClient | None = None):
        self.name = name
        self.namespace = namespace or _default_namespace()
        self.api = client.CustomObjectsApi(api_client or _api_client())

    @property
    def _where(self) -> str:
        return f"RayService {self.namespace}/{self.name}"

    # --- reading -----------------------------------------------------------------------------

    def serve_application(self) -> dict[str, Any]:
        """The polyrec application's entry of ``spec.serveConfigV2``, parsed."""
        return self._application(_parse_serve_config(self._get(), self._where))

    def serve_args(self) -> dict[str, Any]:
        """The application's ``args`` (its ServeConfig fields: paths on the shared volume)."""
        return dict(self.serve_application().get("args") or {})

    def live_model(self) -> str:
        """The artifact the ingress sends requests to: its ``user_config["model"]`` once a promotion
        has set one, else the model the application was started with (``args``)."""
        application = self.serve_application()
        serve_config = self._serve_config(application)
        user_config = _deployment(application, serve_config.ingress_deployment()).get("user_config") or {}
        return user_config.get("model") or serve_config.model

    # --- promotion ---------------------------------------------------------------------------

    def promote(self, model: str, *, timeout_s: float = 600) -> None:
        """Put ``model`` in service in place, in two steps: the model deployments hold it beside the
        live version, then the ingress switches to it. ``timeout_s`` bounds the whole promotion; if the
        first step is not applied in time, the ingress never switches and the live version keeps serving."""
        deadline = time.monotonic() + timeout_s
        live = self.live_model()
        models = [live, model] if live != model else [model]
        self._write_user_configs(lambda serve_config: serve_config.user_configs(models=models, active=live))
        self._wait_applied(deadline, timeout_s, f"the model deployments did not report holding {model} beside {live}")
        self._write_user_configs(lambda serve_config: serve_config.user_configs(models=models, active=model))
        self._wait_applied(deadline, timeout_s, f"the ingress did not report switching to {model}")

    def _write_user_configs(self, user_configs: Callable[[ServeConfig], UserConfigs]) -> None:
        """Set the ``user_config`` of the deployments ``user_configs`` names; every other part of
        serveConfigV2 is written back as it was read."""
        for _ in range(MAX_WRITE_ATTEMPTS):
            rayservice = self._get()
            document = _parse_serve_config(rayservice, self._where)
            updated = copy.deepcopy(document)
            application = self._application(updated)
            deployments = application.setdefault("deployments", [])
            for name, user_config in user_configs(self._serve_config(application)).items():
                deployment = _deployment(application, name)
                if not deployment:
                    deployment = {"name": name}
                    deployments.append(deployment)
                # A copy each: lists shared between deployments would be written as YAML anchors.
                deployment["user_config"] = copy.deepcopy(user_config)
            if updated == document:
                return
            patch = {
                "metadata": {"resourceVersion": rayservice["metadata"]["resourceVersion"]},
                "spec": {"serveConfigV2": yaml.safe_dump(updated, **YAML_DUMP_OPTIONS)},
            }
            try:
                self._call(
                    "patch",
                    self.api.patch_namespaced_custom_object,
                    body=patch,
                    field_validation="Strict",
                    field_manager=FIELD_MANAGER,
                    _content_type="application/merge-patch+json",
                )
                return
            except _Conflict:
                continue
        raise InputError(f"{self._where}: changed by someone else on each of {MAX_WRITE_ATTEMPTS} tries to write it; promote again")

    def _wait_applied(self, deadline: float, timeout_s: float, failure: str) -> None:
        """Until KubeRay has reconciled the latest spec and Serve reports the application RUNNING."""
        pause = 0.05
        while True:
            rayservice = self._get()
            generation = rayservice["metadata"].get("generation", 0)
            status = rayservice.get("status") or {}
            observed = status.get("observedGeneration", 0)
            statuses = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
            application = statuses.get(APP_NAME) or {}
            if observed >= generation:
                if application.get("status") == "RUNNING":
                    return
                if application.get("status") == "DEPLOY_FAILED":
                    raise InputError(f"{self._where}: {failure}: application {APP_NAME} DEPLOY_FAILED: {_one_line(application.get('message', ''))}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InputError(
                    f"{self._where}: {failure} within {timeout_s:g}s (observedGeneration {observed} of generation "
                    f"{generation}, application {APP_NAME} {application.get('status', 'not reported')})"
                )
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, MAX_POLL_INTERVAL_S)

    # --- the API -----------------------------------------------------------------------------

    def _get(self) -> dict[str, Any]:
        return self._call("get", self.api.get_namespaced_custom_object)

    def _call(self, verb: str, method: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
        try:
            return method(GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except ApiException as err:
            if err.status == 409:
                raise _Conflict() from None
            raise self._api_error(err, verb) from None
        except urllib3.exceptions.HTTPError as err:
            host = self.api.api_client.configuration.host
            raise InputError(f"{self._where}: cannot reach the Kubernetes API at {host}: {_one_line(str(err))}") from None

    def _api_error(self, err: ApiException, verb: str) -> InputError:
        detail = _status_message(err)
        if err.status == 401:
            return InputError(f"{self._where}: the Kubernetes API did not accept the credentials (service-account token or kubeconfig): {detail}")
        if err.status == 403:
            return InputError(
                f"{self._where}: forbidden: the ServiceAccount lacks {verb} on rayservices (API group {GROUP}); "
                f"k8s/base/rbac.yaml grants it to polyrec-retrain: {detail}"
            )
        if err.status == 404:
            return InputError(f"{self._where}: not found (is the RayService applied in namespace {self.namespace}?): {detail}")
        if err.status in (400, 422):
            return InputError(f"{self._where}: the API server refused the {verb}: {detail}")
        return InputError(f"{self._where}: {verb} failed: HTTP {err.status} {err.reason}: {detail}")

    # --- the Serve config --------------------------------------------------------------------

    def _application(self, serve_config: dict[str, Any]) -> dict[str, Any]:
        for application in serve_config.get("applications") or []:
            if isinstance(application, dict) and application.get("name") == APP_NAME:
                return application
        raise InputError(f"{self._where}: spec.serveConfigV2 has no application named {APP_NAME!r}")

    def _serve_config(self, application: dict[str, Any]) -> ServeConfig:
        """The ServeConfig the application builds from its ``args`` (``serve.app.build_app``): its graph
        names the ingress and the model deployments, its model is the one served at start."""
        args = dict(application.get("args") or {})
        try:
            return ServeConfig.from_yaml(args.pop("config", None), **args)
        except InputError as err:
            raise InputError(f"{self._where}: application {APP_NAME}'s args: {err}") from None


class _Conflict(Exception):
    """The RayService changed between reading it and writing it (HTTP 409)."""


def _api_client() -> client.ApiClient:
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except config.ConfigException as err:
        raise InputError(f"no Kubernetes API to talk to: not in a pod with a service-account token, and no usable kubeconfig ({err})") from None
    return client.ApiClient(configuration)


def _default_namespace() -> str:
    if os.environ.get("KUBERNETES_SERVICE_HOST") and POD_NAMESPACE_FILE.is_file():
        return POD_NAMESPACE_FILE.read_text().strip()
    try:
        _, context = config.list_kube_config_contexts()
    except config.ConfigException:
        return "default"
    return (context.get("context") or {}).get("namespace") or "default"


def _parse_serve_config(rayservice: dict[str, Any], where: str) -> dict[str, Any]:
    text = (rayservice.get("spec") or {}).get("serveConfigV2")
    if not isinstance(text, str):
        raise InputError(f"{where}: has no spec.serveConfigV2")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"{where}: spec.serveConfigV2 is not valid YAML: {_one_line(str(err))}") from None
    if not isinstance(document, dict):
        raise InputError(f"{where}: spec.serveConfigV2 is not a Serve config (a mapping)")
    return document


def _deployment(application: dict[str, Any], name: str) -> dict[str, Any]:
    """The application's entry for deployment ``name``; empty if it lists none."""
    return next((d for d in application.get("deployments") or [] if isinstance(d, dict) and d.get("name") == name), {})


def _status_message(err: ApiException) -> str:
    """The ``message`` of the Kubernetes Status object the API answers errors with."""
    try:
        message = json.loads(err.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return _one_line(message or err.reason or "no message")


def _one_line(text: str) -> str:
    return " ".join(text.split())
