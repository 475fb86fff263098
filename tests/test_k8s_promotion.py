"""Promotion to the KubeRay RayService (cluster/kubernetes.py), against a local HTTP server standing in
for the Kubernetes API server: none runs here.

The fake answers the calls the client makes (GET and PATCH of one RayService), applies merge patches
as RFC 7386 says, honours a ``metadata.resourceVersion`` precondition, refuses every write whose
result the vendored CRD schema refuses (the strict validation of cluster/manifests.py, Serve's config
schema for serveConfigV2 included), and plays KubeRay: a spec change is first not yet observed (the
old config still RUNNING), then observed and DEPLOYING, then RUNNING, each phase ``apply_delay_s``
long. It is seeded with the RayService rendered from k8s/overlays/cpu.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config, kube_config

from cluster import kubernetes as target_module
from cluster import manifests
from cluster.kubernetes import RayServiceTarget
from common.errors import InputError
from serve.config import GRAPH_DEPLOYMENTS, MODEL_DEPLOYMENTS, Graph, ServeConfig
from serve.runner import APP_NAME, serve_config_document

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "polyrec"
RAYSERVICE_PATH = re.compile(r"/apis/ray\.io/v1/namespaces/(?P<namespace>[^/]+)/rayservices/(?P<name>[^/]+)")
NEW_MODEL = "/home/ray/polyrec/runs/default/retrain/20260101-030000/model/artifact"
#: Fields of metadata the API server owns: a client's patch does not change them.
SERVER_METADATA = ("namespace", "uid", "generation", "resourceVersion")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    """The Status object the API server answers a failed request with."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}


@dataclass
class Write:
    """A PATCH the fake accepted."""

    serve_config: dict[str, Any]  # the resulting serveConfigV2, parsed
    previous_applied: bool  # whether KubeRay had applied the spec before this write when it came
    content_type: str
    query: dict[str, list[str]]


@dataclass
class FakeKubernetesAPI:
    rayservice: dict[str, Any]
    apply_delay_s: float = 0.1
    forbidden_verbs: frozenset[str] = frozenset()
    deploy_fails: bool = False
    status_writes_before_patch: int = 0  # KubeRay status writes that slip in before the next PATCHes
    writes: list[Write] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    conflicts: int = 0
    authorizations: set[str | None] = field(default_factory=set)  # the Authorization headers requests came with

    def __post_init__(self) -> None:
        self.rayservice = copy.deepcopy(self.rayservice)
        self.rayservice["metadata"].update(namespace=NAMESPACE, uid="4f1c0b0e-0000-4000-8000-000000000001", generation=1, resourceVersion="1")
        self.observed_generation = 1
        self.changed_at = time.monotonic() - 3 * self.apply_delay_s  # the seed is applied
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def parse_request(self) -> bool:
                parsed = super().parse_request()
                if parsed:
                    fake.authorizations.add(self.headers.get("Authorization"))
                return parsed

            def do_GET(self) -> None:
                self._answer(*fake.get(self.path))

            def do_PATCH(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer(*fake.patch(self.path, self.headers.get("Content-Type", ""), body))

            def _answer(self, code: int, document: dict[str, Any]) -> None:
                payload = json.dumps(document).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def api_client(self) -> client.ApiClient:
        return client.ApiClient(client.Configuration(host=self.url))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- KubeRay's side ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What KubeRay reports now about the latest spec change."""
        elapsed = time.monotonic() - self.changed_at
        generation = self.rayservice["metadata"]["generation"]
        if elapsed < self.apply_delay_s:  # not reconciled yet: the old config still runs
            observed, application = self.observed_generation, {"status": "RUNNING"}
        elif elapsed < 2 * self.apply_delay_s:
            observed, application = generation, {"status": "DEPLOYING", "message": "reconfiguring replicas"}
        elif self.deploy_fails:
            observed, application = generation, {"status": "DEPLOY_FAILED", "message": "Retriever: artifact not found\non the volume"}
        else:
            observed, application = generation, {"status": "RUNNING"}
        return {"observedGeneration": observed, "activeServiceStatus": {"applicationStatuses": {APP_NAME: application}}}

    def applied(self) -> bool:
        status = self.status()
        running = status["activeServiceStatus"]["applicationStatuses"][APP_NAME]["status"] == "RUNNING"
        return status["observedGeneration"] >= self.rayservice["metadata"]["generation"] and running

    def served_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    # --- the API server's side ---------------------------------------------------------------

    def _route(self, path: str, verb: str) -> tuple[int, dict[str, Any]] | None:
        """An error answer, or None when the request names this RayService and is allowed."""
        match = RAYSERVICE_PATH.fullmatch(urlsplit(path).path)
        name = self.rayservice["metadata"]["name"]
        if not match or (match["namespace"], match["name"]) != (NAMESPACE, name):
            return 404, status_object(404, "NotFound", f'rayservices.ray.io "{match["name"] if match else path}" not found')
        if verb in self.forbidden_verbs:
            return 403, status_object(
                403,
                "Forbidden",
                (
                    f'rayservices.ray.io "{name}" is forbidden: User "system:serviceaccount:{NAMESPACE}:polyrec-retrain" '
                    f'cannot {verb} resource "rayservices" in API group "ray.io" in the namespace "{NAMESPACE}"'
                ),
            )
        return None

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            return self._route(path, "get") or (200, {**self.rayservice, "status": self.status()})

    def patch(self, path: str, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        with self.lock:
            previous_applied = self.applied()  # as the request arrives, before the validation's own time
            if refusal := self._route(path, "patch"):
                return refusal
            if content_type != "application/merge-patch+json":
                return 415, status_object(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}")
            patch = json.loads(body)
            metadata = self.rayservice["metadata"]
            if self.status_writes_before_patch:
                self.status_writes_before_patch -= 1
                metadata["resourceVersion"] = str(int(metadata["resourceVersion"]) + 1)
            wanted_version = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted_version is not None and wanted_version != metadata["resourceVersion"]:
                self.conflicts += 1
                return 409, status_object(
                    409,
                    "Conflict",
                    (
                        f'Operation cannot be fulfilled on rayservices.ray.io "{metadata["name"]}": the object has been modified; '
                        "please apply your changes to the latest version and try again"
                    ),
                )
            candidate = merge_patch(self.rayservice, patch)
            candidate["metadata"].update({key: metadata[key] for key in SERVER_METADATA})
            problems = manifests.document_problems({**candidate, "status": self.status()})
            if problems:
                self.refused.append("; ".join(problems))
                return 422, status_object(422, "Invalid", f'RayService.ray.io "{metadata["name"]}" is invalid: {"; ".join(problems)}')
            if candidate["spec"] != self.rayservice["spec"]:
                self.observed_generation = self.status()["observedGeneration"]
                candidate["metadata"]["generation"] = metadata["generation"] + 1
                self.changed_at = time.monotonic()
            candidate["metadata"]["resourceVersion"] = str(int(metadata["resourceVersion"]) + 1)
            self.rayservice = candidate
            self.writes.append(Write(self.served_config(), previous_applied, content_type, parse_qs(urlsplit(path).query)))
            return 200, {**self.rayservice, "status": self.status()}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_rayservice() -> dict[str, Any]:
    (rayservice,) = [d for d in manifests.build(REPO / "k8s" / "overlays" / "cpu") if d["kind"] == "RayService"]
    return rayservice


def with_graph(rayservice: dict[str, Any], graph: Graph) -> dict[str, Any]:
    """The RayService serving ``graph``: the overlay's as rendered (split), or the colocated graph with
    the overlay's args, as serve.runner writes a Serve config for it."""
    if yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]["graph"] == graph:
        return rayservice
    (application,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    document = serve_config_document(ServeConfig(graph=graph), {**application["args"], "graph": graph})
    return merge_patch(rayservice, {"spec": {"serveConfigV2": yaml.safe_dump(document, sort_keys=False, width=120)}})


@pytest.fixture
def fake_api() -> Iterator[Any]:
    servers: list[FakeKubernetesAPI] = []

    def start(rayservice: dict[str, Any], **behaviour: Any) -> FakeKubernetesAPI:
        server = FakeKubernetesAPI(rayservice, **behaviour)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def target_of(server: FakeKubernetesAPI) -> RayServiceTarget:
    return RayServiceTarget(server.rayservice["metadata"]["name"], NAMESPACE, api_client=server.api_client())


def the_application(serve_config: dict[str, Any]) -> dict[str, Any]:
    return next(app for app in serve_config["applications"] if app["name"] == APP_NAME)


def user_configs(serve_config: dict[str, Any]) -> dict[str, Any]:
    return {d["name"]: d.get("user_config") for d in the_application(serve_config)["deployments"]}


def without_user_configs(serve_config: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(serve_config)
    for deployment in the_application(stripped)["deployments"]:
        deployment.pop("user_config", None)
    return stripped


# --- reading what is served --------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["split", "colocated"])
def test_live_model_is_the_model_the_served_config_names(fake_api, cpu_rayservice, graph: Graph):
    server = fake_api(with_graph(cpu_rayservice, graph))
    target = target_of(server)
    application = the_application(server.served_config())
    assert target.serve_application() == application
    assert target.serve_args() == application["args"] and target.serve_args()["graph"] == graph
    # No promotion yet: the model the application was started with.
    assert target.live_model() == application["args"]["model"]

    ingress = GRAPH_DEPLOYMENTS[graph][0]
    promoted = copy.deepcopy(server.served_config())
    for deployment in the_application(promoted)["deployments"]:
        if deployment["name"] == ingress:
            deployment["user_config"] = {"model": NEW_MODEL}
    server.rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(promoted, sort_keys=False)
    assert target.live_model() == NEW_MODEL


def test_without_a_graph_in_its_args_the_application_is_colocated(fake_api, cpu_rayservice):
    serve_config = yaml.safe_load(cpu_rayservice["spec"]["serveConfigV2"])
    del the_application(serve_config)["args"]["graph"]
    the_application(serve_config)["deployments"].append({"name": "Recommender", "user_config": {"model": NEW_MODEL}})
    rayservice = merge_patch(cpu_rayservice, {"spec": {"serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False)}})
    assert target_of(fake_api(rayservice)).live_model() == NEW_MODEL


# --- where the API and the namespace come from -------------------------------------------------


def test_outside_a_pod_the_kubeconfig_names_the_api_server_credentials_and_namespace(fake_api, cpu_rayservice, tmp_path, monkeypatch):
    server = fake_api(cpu_rayservice)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "laptop",
                "clusters": [{"name": "kind", "cluster": {"server": server.url}}],
                "users": [{"name": "me", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "laptop", "context": {"cluster": "kind", "user": "me", "namespace": NAMESPACE}}],
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))  # what $KUBECONFIG sets
    target = RayServiceTarget()
    assert target.namespace == NAMESPACE
    assert target.live_model() == the_application(server.served_config())["args"]["model"]
    assert server.authorizations == {"Bearer t0ken"}

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="no Kubernetes API to talk to: not in a pod with a service-account token, and no usable kubeconfig"):
        RayServiceTarget()


def test_in_a_pod_the_service_account_token_and_the_pods_namespace_are_used(tmp_path, monkeypatch):
    account = tmp_path / "serviceaccount"
    account.mkdir()
    for file, text in {"token": "pod-token", "ca.crt": "-----BEGIN CERTIFICATE-----", "namespace": "ranking\n"}.items():
        (account / file).write_text(text)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(account / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(account / "ca.crt"))
    monkeypatch.setattr(target_module, "POD_NAMESPACE_FILE", account / "namespace")
    target = RayServiceTarget()
    configuration = target.api.api_client.configuration
    assert target.namespace == "ranking"
    assert configuration.host == "https://127.0.0.1:6443" and configuration.ssl_ca_cert == str(account / "ca.crt")
    assert configuration.api_key["BearerToken"] == "bearer pod-token"
    assert RayServiceTarget(namespace="serving").namespace == "serving"


# --- promotion ---------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["split", "colocated"])
def test_promote_loads_the_new_model_before_the_ingress_switches_and_changes_only_user_configs(fake_api, cpu_rayservice, graph: Graph):
    server = fake_api(with_graph(cpu_rayservice, graph))
    target = target_of(server)
    before = copy.deepcopy(server.rayservice)
    live = target.live_model()
    ingress, model_deployments = GRAPH_DEPLOYMENTS[graph][0], MODEL_DEPLOYMENTS[graph]

    target.promote(NEW_MODEL, timeout_s=30)

    loaded, switched = server.writes
    # First: every model deployment holds both versions while the ingress still sends to the live one.
    for name in model_deployments:
        assert user_configs(loaded.serve_config)[name]["models"] == [live, NEW_MODEL], name
    assert user_configs(loaded.serve_config)[ingress]["model"] == live
    # Then: the ingress switches, the model deployments unchanged.
    assert user_configs(switched.serve_config)[ingress]["model"] == NEW_MODEL
    for name in model_deployments:
        assert user_configs(switched.serve_config)[name]["models"] == [live, NEW_MODEL], name
    # Each write waited until KubeRay had applied the one before, and promote until the last applied.
    assert loaded.previous_applied and switched.previous_applied and server.applied()
    assert server.rayservice["metadata"]["generation"] == before["metadata"]["generation"] + 2
    assert target.live_model() == NEW_MODEL

    # Nothing but user_configs changed, so KubeRay reconfigures the running replicas in place.
    assert without_user_configs(server.served_config()) == without_user_configs(yaml.safe_load(before["spec"]["serveConfigV2"]))
    assert {k: v for k, v in server.rayservice["spec"].items() if k != "serveConfigV2"} == {k: v for k, v in before["spec"].items() if k != "serveConfigV2"}
    assert not re.search(r"[&*]id\d+", server.rayservice["spec"]["serveConfigV2"]), "YAML anchors in what kubectl shows"
    changed = {name for name, config in user_configs(server.served_config()).items() if config is not None}
    assert changed == {ingress, *model_deployments}
    for write in server.writes:
        assert write.content_type == "application/merge-patch+json" and write.query == {"fieldValidation": ["Strict"], "fieldManager": ["polyrec-retrain"]}


def test_a_second_promotion_holds_the_live_and_the_new_version_only(fake_api, cpu_rayservice):
    server = fake_api(cpu_rayservice, apply_delay_s=0.02)
    target = target_of(server)
    first = target.live_model()
    second, third = NEW_MODEL, NEW_MODEL.replace("20260101", "20260102")
    target.promote(second, timeout_s=30)
    target.promote(third, timeout_s=30)
    assert len(server.writes) == 4
    assert user_configs(server.writes[2].serve_config)["Ranker"]["models"] == [second, third]
    assert first not in json.dumps(user_configs(server.served_config()))
    assert target.live_model() == third


def test_a_status_write_between_read_and_write_is_retried(fake_api, cpu_rayservice):
    server = fake_api(cpu_rayservice, apply_delay_s=0.02, status_writes_before_patch=2)
    target_of(server).promote(NEW_MODEL, timeout_s=30)
    assert server.conflicts == 2 and len(server.writes) == 2
    assert user_configs(server.served_config())["Ingress"] == {"model": NEW_MODEL}


def test_when_the_new_version_is_not_applied_in_time_the_ingress_never_switches(fake_api, cpu_rayservice):
    server = fake_api(cpu_rayservice, apply_delay_s=3600)
    target = target_of(server)
    live = target.live_model()
    started = time.monotonic()
    with pytest.raises(InputError) as raised:
        target.promote(NEW_MODEL, timeout_s=0.5)
    assert 0.5 <= time.monotonic() - started < 10
    message = str(raised.value)
    assert message.startswith(f"RayService {NAMESPACE}/polyrec-serve: the model deployments did not report holding {NEW_MODEL}")
    assert "within 0.5s (observedGeneration 1 of generation 2, application polyrec RUNNING)" in message
    assert len(server.writes) == 1 and user_configs(server.served_config())["Ingress"] == {"model": live}


def test_a_failed_deploy_stops_the_promotion_with_the_applications_message(fake_api, cpu_rayservice):
    server = fake_api(cpu_rayservice, apply_delay_s=0.02, deploy_fails=True)
    with pytest.raises(InputError, match=r"application polyrec DEPLOY_FAILED: Retriever: artifact not found on the volume$"):
        target_of(server).promote(NEW_MODEL, timeout_s=30)
    assert len(server.writes) == 1


# --- API errors --------------------------------------------------------------------------------


def test_a_forbidden_patch_says_the_serviceaccount_lacks_patch_on_rayservices(fake_api, cpu_rayservice):
    server = fake_api(cpu_rayservice, forbidden_verbs=frozenset({"patch"}))
    with pytest.raises(InputError) as raised:
        target_of(server).promote(NEW_MODEL)
    message = str(raised.value)
    assert message.startswith(f"RayService {NAMESPACE}/polyrec-serve: forbidden: the ServiceAccount lacks patch on rayservices (API group ray.io)")
    assert 'cannot patch resource "rayservices"' in message and "\n" not in message
    assert server.writes == []

    server = fake_api(cpu_rayservice, forbidden_verbs=frozenset({"get"}))
    with pytest.raises(InputError, match="the ServiceAccount lacks get on rayservices"):
        target_of(server).live_model()


def test_an_unknown_rayservice_or_an_unreachable_api_is_an_input_error(fake_api, cpu_rayservice):
    server = fake_api(cpu_rayservice)
    with pytest.raises(InputError, match=rf"^RayService {NAMESPACE}/polyrec-serv: not found \(is the RayService applied in namespace {NAMESPACE}\?\)"):
        RayServiceTarget("polyrec-serv", NAMESPACE, api_client=server.api_client()).live_model()
    unreachable = server.api_client()
    server.close()
    with pytest.raises(InputError, match=rf"^RayService {NAMESPACE}/polyrec-serve: cannot reach the Kubernetes API at {server.url}"):
        RayServiceTarget("polyrec-serve", NAMESPACE, api_client=unreachable).live_model()


def test_the_fake_api_server_refuses_writes_the_crd_schema_refuses(fake_api, cpu_rayservice):
    server = fake_api(cpu_rayservice)
    api = client.CustomObjectsApi(server.api_client())
    name = cpu_rayservice["metadata"]["name"]
    for bad_patch, problem in [
        ({"spec": {"serveConfigV3": "applications: []"}}, "spec: Additional properties are not allowed ('serveConfigV3' was unexpected)"),
        ({"spec": {"rayClusterConfig": {"enableInTreeAutoscaling": "yes"}}}, "spec.rayClusterConfig.enableInTreeAutoscaling: 'yes' is not of type 'boolean'"),
        (
            {"spec": {"serveConfigV2": "applications:\n- name: polyrec\n  import_path: serve.app:build_app\n  replicas: 2\n"}},
            "spec.serveConfigV2: applications[polyrec].replicas: unknown field",
        ),
    ]:
        with pytest.raises(ApiException) as refused:
            api.patch_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices", name, bad_patch, _content_type="application/merge-patch+json")
        assert refused.value.status == 422 and problem in json.loads(refused.value.body)["message"], bad_patch
    assert server.writes == [] and server.rayservice["metadata"]["generation"] == 1

    # A RayService stored before the schema got stricter: promote writes its serveConfigV2 back as
    # it is, so the API server refuses the write, and the error says why.
    serve_config = yaml.safe_load(cpu_rayservice["spec"]["serveConfigV2"])
    the_application(serve_config)["deployments"][0]["autoscaling_confg"] = {"max_replicas": 3}
    stale = merge_patch(cpu_rayservice, {"spec": {"serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False)}})
    with pytest.raises(InputError, match=r"polyrec-serve: the API server refused the patch: .*deployments\[Ingress\]\.autoscaling_confg: unknown field"):
        target_of(fake_api(stale)).promote(NEW_MODEL)
