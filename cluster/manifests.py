"""polyrec's KubeRay manifests (k8s/): the RayService's Serve config, the kustomizations rendered
by ``kubectl kustomize``, and strict validation against the vendored KubeRay CRDs.

* ``serveConfigV2`` has one source, ``serve/serve_config.yaml``. Each kustomization folder with
  a ``serve-overrides.yaml`` gets a generated patch, ``rayservice-serve-config.yaml``, holding
  that file with the overrides of the base and of the folder merged in.
* ``build`` renders a kustomization with ``kubectl kustomize`` (kubectl bundles kustomize), so
  what is checked is what ``kubectl apply -k`` sends; without kubectl on PATH it is an
  ``InputError`` saying where to get it.
* ``validate`` checks documents against the CRDs' openAPIV3Schema with the API server's strict
  field validation (a field the schema does not list is an error), plus the operator's name
  rules and Ray Serve's own config schema for ``serveConfigV2``. The core kinds beside them
  (ServiceAccount, Role, RoleBinding) have no CRD to vendor and get strict schemas written here.
  Across documents, every name one refers to must be among them, and a retraining that promotes
  to the RayService must run as a ServiceAccount allowed to get and patch it.

Command line::

    python -m cluster.manifests sync              # regenerate the serveConfigV2 patches
    python -m cluster.manifests check             # stale patches or invalid manifests: exit 1
    python -m cluster.manifests build k8s/overlays/gpu   # kubectl kustomize k8s/overlays/gpu
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

from common.config import yaml_problem
from common.errors import InputError
from serve.config import SERVE_THROUGHPUT_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = REPO_ROOT / "k8s"
CRD_DIR = K8S_DIR / "schemas"
SERVE_CONFIG = REPO_ROOT / "serve" / "serve_config.yaml"
SERVE_OVERRIDES = "serve-overrides.yaml"
SERVE_PATCH = "rayservice-serve-config.yaml"
RAYSERVICE_NAME = "polyrec-serve"

#: The operator prefixes generated object names, so it limits the names it accepts
#: (ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0).
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47, "RayCronJob": 47}
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

#: libyaml's loader when PyYAML was built with it: the vendored CRDs are 4 MB of YAML.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=YAML_LOADER)
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {yaml_problem(err)}") from None


# --- The Serve config embedded in the RayService ----------------------------------------------


def merge_named(base: Any, override: Any, where: str) -> Any:
    """Deep-merge ``override`` into ``base``: mappings key by key, lists of named mappings
    (applications, deployments) item by ``name``; anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge_named(base[key], value, f"{where}.{key}") if key in base else value
        return merged
    if _is_named_list(base) and _is_named_list(override):
        by_name = {item["name"]: item for item in base}
        for item in override:
            if item["name"] not in by_name:
                raise InputError(f"{where}: no entry named {item['name']!r} in {SERVE_CONFIG.name}")
            by_name[item["name"]] = merge_named(by_name[item["name"]], item, f"{where}[{item['name']}]")
        return list(by_name.values())
    return override


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value)


def render_serve_config(overrides: Sequence[Path] = ()) -> str:
    """``serve/serve_config.yaml`` with ``overrides`` merged in, checked against Ray Serve's schema."""
    config = load_yaml(SERVE_CONFIG)
    for path in overrides:
        config = merge_named(config, load_yaml(path), str(path))
    problems = serve_config_problems(config)
    if problems:
        raise InputError(f"{SERVE_CONFIG} + {', '.join(map(str, overrides))}: {'; '.join(problems)}")
    return yaml.safe_dump(config, sort_keys=False, width=120)


def serve_config_problems(config: Any) -> list[str]:
    """Ray Serve's own validation, plus unknown keys (which Serve would silently ignore)."""
    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as err:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    problems = _unknown_keys(config, ServeDeploySchema, "")
    problems += _unknown_keys(config.get("http_options", {}), HTTPOptionsSchema, "http_options")
    for app in config["applications"]:
        problems += _unknown_keys(app, ServeApplicationSchema, f"applications[{app['name']}]")
        for deployment in app.get("deployments", []):
            where = f"applications[{app['name']}].deployments[{deployment['name']}]"
            problems += _unknown_keys(deployment, DeploymentSchema, where)
            for key, model in (("ray_actor_options", RayActorOptionsSchema), ("autoscaling_config", AutoscalingConfig)):
                if isinstance(deployment.get(key), dict):
                    problems += _unknown_keys(deployment[key], model, f"{where}.{key}")
    return problems


def _unknown_keys(mapping: dict, model: type[pydantic.BaseModel], where: str) -> list[str]:
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return [f"{where}.{key}: unknown field".lstrip(".") for key in mapping if key not in known]


def serve_patch_targets() -> dict[Path, list[Path]]:
    """Each generated patch file and the override files merged into it, base first."""
    base_overrides = [K8S_DIR / "base" / SERVE_OVERRIDES]
    targets = {K8S_DIR / "base" / SERVE_PATCH: base_overrides}
    for overlay in sorted((K8S_DIR / "overlays").iterdir()):
        if (overlay / SERVE_OVERRIDES).is_file():
            targets[overlay / SERVE_PATCH] = base_overrides + [overlay / SERVE_OVERRIDES]
    return targets


class _LiteralStrings(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, so the embedded Serve config reads as YAML."""


_LiteralStrings.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None),
)


def serve_patch_text(overrides: Sequence[Path]) -> str:
    sources = ", ".join(str(p.relative_to(REPO_ROOT)) for p in [SERVE_CONFIG, *overrides])
    patch = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": RAYSERVICE_NAME},
        "spec": {"serveConfigV2": render_serve_config(overrides)},
    }
    header = f"# Generated by `python -m cluster.manifests sync` from {sources}. Do not edit.\n"
    return header + yaml.dump(patch, Dumper=_LiteralStrings, sort_keys=False, width=120)


def sync_serve_patches(*, check: bool = False) -> list[Path]:
    """Write every generated serveConfigV2 patch; return those that were (with ``check``: would
    be) changed."""
    stale = []
    for target, overrides in serve_patch_targets().items():
        text = serve_patch_text(overrides)
        if not target.is_file() or target.read_text() != text:
            stale.append(target)
            if not check:
                target.write_text(text)
    return stale


# --- Rendering -------------------------------------------------------------------------------

KUBECTL_INSTALL_URL = "https://kubernetes.io/docs/tasks/tools/"


def render(directory: Path) -> str:
    """``kubectl kustomize directory``: the kustomization's manifests as one YAML stream."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise InputError(f"kubectl is not on PATH; it renders k8s/ (kubectl includes kustomize): install it, see {KUBECTL_INSTALL_URL}")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InputError(f"kubectl kustomize {directory}: {result.stderr.strip()}")
    return result.stdout


def build(directory: Path) -> list[dict]:
    """The documents ``kubectl kustomize directory`` renders."""
    return [document for document in yaml.load_all(render(directory), Loader=YAML_LOADER) if document is not None]


# --- Validation ------------------------------------------------------------------------------


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict JSON Schema of that CRD version, from k8s/schemas/."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = load_yaml(path)
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schemas[api_version, crd["spec"]["names"]["kind"]] = strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas


def strict_schema(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema with the API server's semantics:
    unknown fields rejected unless ``x-kubernetes-preserve-unknown-fields``, int-or-string,
    ``nullable``, and ``required`` fields that have defaults left to the defaulting."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: strict_schema(value) for key, value in schema.items()}
    if strict.pop("x-kubernetes-int-or-string", False):
        strict.pop("type", None)
        strict["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if strict.pop("nullable", False) and "type" in strict:
        strict["type"] = [strict["type"], "null"]
    properties = strict.get("properties")
    if isinstance(properties, dict):
        if not strict.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in strict:
            strict["additionalProperties"] = False
        if "required" in strict:
            strict["required"] = [f for f in strict["required"] if "default" not in properties.get(f, {})]
    return strict


# The core kinds k8s/ uses beside the KubeRay resources are built into the API server, so there is
# no CRD to vendor. These schemas hold the fields of theirs a manifest sets (Kubernetes API
# reference: core/v1 ServiceAccount, rbac.authorization.k8s.io/v1 Role and RoleBinding), with
# unknown fields rejected and the API server's RBAC validation rules written in.
RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"
RBAC_API_GROUP = RBAC_API_VERSION.split("/")[0]
#: The API server takes any string as a verb, but a misspelt one silently grants nothing.
RBAC_VERBS = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "bind",
    "escalate",
    "impersonate",
    "use",
    "approve",
    "sign",
    "*",
]
_NON_EMPTY_STRINGS: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "string"}}
_OBJECT_META: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
#: A namespaced Role's rule: resource rules only (``nonResourceURLs`` belong to ClusterRoles).
_POLICY_RULE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiGroups", "resources", "verbs"],
    "properties": {
        "apiGroups": _NON_EMPTY_STRINGS,  # "" is the core group
        "resources": _NON_EMPTY_STRINGS,
        "resourceNames": {"type": "array", "items": {"type": "string"}},
        "verbs": {"type": "array", "minItems": 1, "items": {"enum": RBAC_VERBS}},
    },
}
_ROLE_REF: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiGroup", "kind", "name"],
    "properties": {"apiGroup": {"const": RBAC_API_GROUP}, "kind": {"enum": ["Role", "ClusterRole"]}, "name": {"type": "string", "minLength": 1}},
}
_SUBJECT: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["kind", "name"],
    "properties": {
        "kind": {"enum": ["ServiceAccount", "User", "Group"]},
        "apiGroup": {"type": "string"},
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
    },
    # A ServiceAccount is in the core group, users and groups in RBAC's.
    "if": {"properties": {"kind": {"const": "ServiceAccount"}}},
    "then": {"properties": {"apiGroup": {"const": ""}}},
    "else": {"required": ["apiGroup"], "properties": {"apiGroup": {"const": RBAC_API_GROUP}}},
}


def _core_schema(api_version: str, kind: str, properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", *required],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _OBJECT_META, **properties},
    }


CORE_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("v1", "ServiceAccount"): _core_schema(
        "v1",
        "ServiceAccount",
        {
            "automountServiceAccountToken": {"type": "boolean"},
            "imagePullSecrets": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": False, "properties": {"name": {"type": "string"}}},
            },
        },
    ),
    (RBAC_API_VERSION, "Role"): _core_schema(RBAC_API_VERSION, "Role", {"rules": {"type": "array", "items": _POLICY_RULE}}),
    (RBAC_API_VERSION, "RoleBinding"): _core_schema(
        RBAC_API_VERSION, "RoleBinding", {"roleRef": _ROLE_REF, "subjects": {"type": "array", "items": _SUBJECT}}, required=["roleRef"]
    ),
}

#: An entrypoint whose ``polyrec retrain`` reads and promotes to the RayService through the API.
PROMOTING_RETRAIN = re.compile(r"\bpolyrec retrain\b[^&;|]*?\s--serving[ =]kubernetes\b")
#: Every namespace has it, made by Kubernetes, so no manifest needs to.
DEFAULT_SERVICE_ACCOUNT = "default"
#: What that retraining does to the RayService (cluster/kubernetes.py).
PROMOTION_VERBS = {"get", "patch"}


def validate(documents: Iterable[dict], source: str = "") -> list[str]:
    """Every problem found in the documents, one line each (empty: all valid)."""
    documents = list(documents)
    problems = []
    for number, document in enumerate(documents, 1):
        where = f"{source}doc {number} {document.get('kind', '?')}/{document.get('metadata', {}).get('name', '?')}"
        problems += [f"{where}: {problem}" for problem in document_problems(document)]
    return problems + [f"{source}{problem}" for problem in reference_problems(documents)]


def reference_problems(documents: Sequence[dict]) -> list[str]:
    """Names one document gives another's (a RoleBinding's Role and ServiceAccounts, a pod's
    ServiceAccount) that are not among the documents, and a retraining that promotes to the
    RayService without the permissions to (its head pod runs the driver)."""
    names = {(d.get("kind"), _dig(d, "metadata", "name")) for d in documents}
    problems = []
    for document in documents:
        where = f"{document.get('kind')}/{_dig(document, 'metadata', 'name')}"
        if document.get("kind") == "RoleBinding":
            role = document.get("roleRef") or {}
            if role.get("kind") == "Role" and ("Role", role.get("name")) not in names:
                problems.append(f"{where}: roleRef names Role {role.get('name')!r}, which is not among the manifests")
            for subject in document.get("subjects") or []:
                if _is_local_service_account(subject) and ("ServiceAccount", subject.get("name")) not in names:
                    problems.append(f"{where}: subject ServiceAccount {subject.get('name')!r} is not among the manifests")
        for account in _service_account_names(document):
            if account != DEFAULT_SERVICE_ACCOUNT and ("ServiceAccount", account) not in names:
                problems.append(f"{where}: serviceAccountName {account!r} is not among the manifests")
        job_spec = {"RayJob": document.get("spec"), "RayCronJob": _dig(document, "spec", "jobTemplate")}.get(document.get("kind"))
        if isinstance(job_spec, dict) and PROMOTING_RETRAIN.search(str(job_spec.get("entrypoint", ""))):
            problems += [f"{where}: {problem}" for problem in _promotion_permission_problems(documents, job_spec)]
    return problems


def _promotion_permission_problems(documents: Sequence[dict], job_spec: dict) -> list[str]:
    account = _dig(job_spec, "rayClusterSpec", "headGroupSpec", "template", "spec", "serviceAccountName")
    if not account:
        return ["runs `polyrec retrain --serving kubernetes`, but its head pod (where the driver runs) sets no serviceAccountName"]
    problems = []
    for rayservice in (d for d in documents if d.get("kind") == "RayService"):
        name = _dig(rayservice, "metadata", "name")
        if missing := PROMOTION_VERBS - _granted_verbs(documents, account, "ray.io", "rayservices", name):
            problems.append(f"ServiceAccount {account!r} (the head pod's) lacks {', '.join(sorted(missing))} on RayService {name!r}")
    return problems


def _granted_verbs(documents: Sequence[dict], account: str, api_group: str, resource: str, name: str) -> set[str]:
    """The verbs the manifests' Roles grant ``account`` on the object ``name`` (``*``: all of them)."""
    roles = {
        _dig(binding, "roleRef", "name")
        for binding in documents
        if binding.get("kind") == "RoleBinding"
        and _dig(binding, "roleRef", "kind") == "Role"
        and any(_is_local_service_account(s) and s.get("name") == account for s in binding.get("subjects") or [])
    }
    verbs: set[str] = set()
    for role in (d for d in documents if d.get("kind") == "Role" and _dig(d, "metadata", "name") in roles):
        for rule in role.get("rules") or []:
            if (
                {api_group, "*"} & set(rule.get("apiGroups") or [])
                and {resource, "*"} & set(rule.get("resources") or [])
                and (not rule.get("resourceNames") or name in rule["resourceNames"])
            ):
                verbs |= set(rule.get("verbs") or [])
    return set(RBAC_VERBS) if "*" in verbs else verbs


def _is_local_service_account(subject: Any) -> bool:
    """A RoleBinding's ServiceAccount subject without a namespace is in the binding's namespace."""
    return isinstance(subject, dict) and subject.get("kind") == "ServiceAccount" and not subject.get("namespace")


def _nested_values(node: Any, keys: set[str]) -> Iterator[Any]:
    """The value of every mapping entry named one of ``keys``, wherever it is nested."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys:
                yield value
            else:
                yield from _nested_values(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _nested_values(item, keys)


def _containers(node: Any) -> Iterator[dict]:
    """Every container of every pod template."""
    for containers in _nested_values(node, {"containers", "initContainers"}):
        if isinstance(containers, list):
            yield from (container for container in containers if isinstance(container, dict))


def _service_account_names(node: Any) -> Iterator[str]:
    """Every pod template's serviceAccountName."""
    return (name for name in _nested_values(node, {"serviceAccountName"}) if isinstance(name, str))


def _dig(node: Any, *keys: str) -> Any:
    """``node[k1][k2]...``, or None where a level is missing or not a mapping."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def document_problems(document: dict) -> list[str]:
    kind, name = document.get("kind"), document.get("metadata", {}).get("name", "")
    if not (document.get("apiVersion") and kind and name):
        return ["apiVersion, kind and metadata.name are required"]
    problems = []
    if kind in MAX_NAME_LENGTH:
        if not DNS_1035_LABEL.fullmatch(name) or len(name) > MAX_NAME_LENGTH[kind]:
            problems.append(f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH[kind]} characters")
    elif not DNS_1123_SUBDOMAIN.fullmatch(name) or len(name) > 253:
        problems.append("metadata.name must be a DNS-1123 subdomain")
    schema = crd_schemas().get((document["apiVersion"], kind)) or CORE_SCHEMAS.get((document["apiVersion"], kind))
    if document["apiVersion"].startswith("ray.io/") and schema is None:
        problems.append(f"no vendored CRD for {document['apiVersion']} {kind}")
    if schema is not None:
        validator = jsonschema.Draft7Validator(schema)
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
            path = ".".join(map(str, error.absolute_path)) or "<root>"
            problems.append(f"{path}: {error.message}")
    if kind == "RayService":
        problems += _throughput_env_problems(document)
    if kind == "RayService" and isinstance(document.get("spec", {}).get("serveConfigV2"), str):
        try:
            serve_config = yaml.safe_load(document["spec"]["serveConfigV2"])
        except yaml.YAMLError as err:
            return [*problems, f"spec.serveConfigV2: not valid YAML: {err}"]
        problems += [f"spec.serveConfigV2: {p}" for p in serve_config_problems(serve_config)]
    return problems


def _throughput_env_problems(document: dict) -> list[str]:
    """Serve's throughput flags must reach every process of the serving cluster, the HTTP proxy
    too, which only the pods' environment does (serveConfigV2's runtime_env reaches the replicas)."""
    problems = []
    for container in _containers(document.get("spec", {}).get("rayClusterConfig", {})):
        env = {var.get("name"): var.get("value") for var in container.get("env", []) if isinstance(var, dict)}
        for name, value in SERVE_THROUGHPUT_ENV.items():
            if env.get(name) != value:
                problems.append(f"container {container.get('name', '?')}: env {name} must be {value!r} (serve.config.SERVE_THROUGHPUT_ENV)")
    return problems


def kustomization_dirs() -> list[Path]:
    return [K8S_DIR / "base", *sorted(p for p in (K8S_DIR / "overlays").iterdir() if p.is_dir())]


def check() -> list[str]:
    """Stale generated patches and invalid manifests, for every kustomization under k8s/."""
    stale = sync_serve_patches(check=True)
    problems = [f"{path.relative_to(REPO_ROOT)}: stale, run `python -m cluster.manifests sync`" for path in stale]
    for directory in kustomization_dirs():
        problems += validate(build(directory), f"{directory.relative_to(REPO_ROOT)}: ")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.manifests", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("sync", help="regenerate the RayService serveConfigV2 patches")
    commands.add_parser("check", help="fail on stale patches or manifests the KubeRay CRDs reject")
    build_command = commands.add_parser("build", help="print a kustomization's manifests (kubectl kustomize)")
    build_command.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "sync":
            for path in sync_serve_patches():
                print(f"wrote {path.relative_to(REPO_ROOT)}")
        elif args.command == "build":
            print(render(args.directory), end="")
        else:
            problems = check()
            print("\n".join(problems) if problems else "all manifests valid")
            return 1 if problems else 0
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2  # a user error, as everywhere in polyrec's CLI; 1 means the check found problems
    return 0


if __name__ == "__main__":
    sys.exit(main())
