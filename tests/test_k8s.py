"""The KubeRay manifests under k8s/: base and overlays rendered by `kubectl kustomize`, validated
strictly against the vendored KubeRay CRDs, their Serve config generated from
serve/serve_config.yaml, secrets only referenced, and the Ray clusters large enough for what runs
on them."""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster import cli, manifests
from cluster.submit import STAGES
from common.errors import InputError
from serve.config import SERVE_THROUGHPUT_ENV
from train.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ["base", "overlays/cpu", "overlays/gpu"]
RUNS_MOUNT = "/home/ray/polyrec/runs"

#: (CPUs, GPUs, GPU memory in GB) of the instance types the GPU overlay selects.
INSTANCE_TYPES = {"p4de.24xlarge": (96, 8, 80), "g5.12xlarge": (48, 4, 24)}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict]]:
    """overlay -> kind -> the one document of that kind it renders."""
    out = {}
    for overlay in OVERLAYS:
        documents = manifests.build(K8S / overlay)
        kinds = [d["kind"] for d in documents]
        assert len(kinds) == len(set(kinds)), kinds
        out[overlay] = {d["kind"]: d for d in documents}
    return out


def _ray_cluster_specs(documents: dict[str, dict]) -> dict[str, dict]:
    return {
        "RayJob": documents["RayJob"]["spec"]["rayClusterSpec"],
        "RayService": documents["RayService"]["spec"]["rayClusterConfig"],
        "RayCronJob": documents["RayCronJob"]["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def _containers(node) -> list[dict]:
    if isinstance(node, dict):
        return [c for k, v in node.items() for c in (v if k == "containers" else _containers(v))]
    if isinstance(node, list):
        return [c for item in node for c in _containers(item)]
    return []


# --- Schema validity -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_pass_the_strict_kuberay_crd_validation(rendered, overlay):
    documents = rendered[overlay]
    assert set(documents) == {"PersistentVolumeClaim", "RayJob", "RayService", "RayCronJob", "ServiceAccount", "Role", "RoleBinding"}
    assert manifests.validate(documents.values()) == []


def test_the_validator_rejects_unknown_fields_wrong_types_and_bad_names(rendered):
    rayjob = rendered["base"]["RayJob"]
    assert manifests.document_problems(rayjob) == []

    renamed = copy.deepcopy(rayjob)
    cluster_spec = renamed["spec"]["rayClusterSpec"]
    cluster_spec["workerGroupSpec"] = cluster_spec.pop("workerGroupSpecs")
    assert any("'workerGroupSpec' was unexpected" in p for p in manifests.document_problems(renamed))

    typo_in_pod = copy.deepcopy(rayjob)
    typo_in_pod["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    problems = manifests.document_problems(typo_in_pod)
    assert problems == [
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0: Additional properties are not allowed ('imagePullPolicyy' was unexpected)"
    ]

    wrong_type = copy.deepcopy(rayjob)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert manifests.document_problems(wrong_type) == ["spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas: 'eight' is not of type 'integer'"]

    # Quantities are int-or-string: 2 and "2" both pass; a list does not.
    resources = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    for cpu, valid in [(2, True), ("2", True), ([2], False)]:
        quantity = copy.deepcopy(rayjob)
        quantity["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"] = {
            **resources,
            "limits": {**resources["limits"], "cpu": cpu},
        }
        assert (manifests.document_problems(quantity) == []) is valid, cpu

    for name in ["polyrec-train-" + "x" * 34, "Polyrec-train", "1polyrec"]:  # 48 characters, uppercase, digit first
        bad_name = copy.deepcopy(rayjob)
        bad_name["metadata"]["name"] = name
        assert manifests.document_problems(bad_name) == ["metadata.name must be a DNS-1035 label of at most 47 characters"], name


def test_serving_pods_must_carry_serves_throughput_flags(rendered):
    rayservice = rendered["base"]["RayService"]
    assert manifests.document_problems(rayservice) == []
    name = next(iter(SERVE_THROUGHPUT_ENV))

    flipped = copy.deepcopy(rayservice)
    worker = flipped["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    next(var for var in worker["env"] if var["name"] == name)["value"] = "0" if SERVE_THROUGHPUT_ENV[name] == "1" else "1"
    assert manifests.document_problems(flipped) == [
        f"container {worker['name']}: env {name} must be '{SERVE_THROUGHPUT_ENV[name]}' (serve.config.SERVE_THROUGHPUT_ENV)"
    ]

    dropped = copy.deepcopy(rayservice)
    head = dropped["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [var for var in head["env"] if var["name"] not in SERVE_THROUGHPUT_ENV]
    assert manifests.document_problems(dropped) == [
        f"container {head['name']}: env {flag} must be '{value}' (serve.config.SERVE_THROUGHPUT_ENV)" for flag, value in SERVE_THROUGHPUT_ENV.items()
    ]


def test_the_validator_holds_rbac_objects_to_the_api_servers_rules(rendered):
    documents = rendered["base"]
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert manifests.document_problems(documents[kind]) == [], kind

    def problems(kind: str, change) -> list[str]:
        document = copy.deepcopy(documents[kind])
        change(document)
        return manifests.document_problems(document)

    assert problems("ServiceAccount", lambda sa: sa.update(automountToken=False)) == [
        "<root>: Additional properties are not allowed ('automountToken' was unexpected)"
    ]
    assert problems("Role", lambda role: role["rules"][0].update(verbs=["get", "pach"])) == [f"rules.0.verbs.1: 'pach' is not one of {manifests.RBAC_VERBS}"]
    assert problems("Role", lambda role: role["rules"][0].update(verbs=[])) == ["rules.0.verbs: [] should be non-empty"]
    assert problems("Role", lambda role: role["rules"][0].pop("apiGroups")) == ["rules.0: 'apiGroups' is a required property"]
    assert problems("Role", lambda role: role["rules"][0].update(nonResourceURLs=["/healthz"])) == [
        "rules.0: Additional properties are not allowed ('nonResourceURLs' was unexpected)"
    ]
    assert problems("RoleBinding", lambda binding: binding["roleRef"].update(apiGroup="rbac")) == ["roleRef.apiGroup: 'rbac.authorization.k8s.io' was expected"]
    assert problems("RoleBinding", lambda binding: binding.pop("roleRef")) == ["<root>: 'roleRef' is a required property"]
    assert problems("RoleBinding", lambda binding: binding["subjects"][0].update(apiGroup=manifests.RBAC_API_GROUP)) == ["subjects.0.apiGroup: '' was expected"]
    assert problems("RoleBinding", lambda binding: binding["subjects"].append({"kind": "User", "name": "ops"})) == [
        "subjects.1: 'apiGroup' is a required property"
    ]
    assert problems("RoleBinding", lambda binding: binding.update(metadata={"name": "Polyrec_Retrain"})) == ["metadata.name must be a DNS-1123 subdomain"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_retraining_promotes_to_the_rayservice_as_a_serviceaccount_allowed_to(rendered, overlay):
    documents = rendered[overlay]
    job_spec = documents["RayCronJob"]["spec"]["jobTemplate"]
    assert manifests.PROMOTING_RETRAIN.search(job_spec["entrypoint"])
    head_pod = job_spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head_pod["serviceAccountName"] == documents["ServiceAccount"]["metadata"]["name"] == "polyrec-retrain"
    # The training job and the serving cluster need no access to the Kubernetes API.
    for kind in ("RayJob", "RayService"):
        assert "serviceAccountName" not in yaml.safe_dump(documents[kind]), kind
    (rule,) = documents["Role"]["rules"]
    assert rule == {
        "apiGroups": ["ray.io"],
        "resources": ["rayservices"],
        "resourceNames": [documents["RayService"]["metadata"]["name"]],
        "verbs": ["get", "patch"],
    }


def test_cross_references_and_the_promotion_permissions_are_checked(rendered):
    documents = rendered["overlays/cpu"]

    def problems(change) -> list[str]:
        """Sorted: their order follows the documents', which is kustomize's."""
        changed = copy.deepcopy(documents)
        change(changed)
        return sorted(manifests.validate(changed.values()))

    head_pod = lambda docs: docs["RayCronJob"]["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]  # noqa: E731
    assert problems(lambda docs: None) == []
    assert problems(lambda docs: docs["Role"]["rules"][0].update(verbs=["get"])) == [
        "RayCronJob/polyrec-retrain: ServiceAccount 'polyrec-retrain' (the head pod's) lacks patch on RayService 'polyrec-serve'"
    ]
    assert problems(lambda docs: docs["Role"]["rules"][0].update(resourceNames=["another-service"])) == [
        "RayCronJob/polyrec-retrain: ServiceAccount 'polyrec-retrain' (the head pod's) lacks get, patch on RayService 'polyrec-serve'"
    ]
    assert problems(lambda docs: docs["Role"]["rules"][0].update(resourceNames=[], verbs=["*"])) == []
    assert problems(lambda docs: docs["RoleBinding"]["roleRef"].update(name="polyrec-retrainer")) == [
        "RayCronJob/polyrec-retrain: ServiceAccount 'polyrec-retrain' (the head pod's) lacks get, patch on RayService 'polyrec-serve'",
        "RoleBinding/polyrec-retrain: roleRef names Role 'polyrec-retrainer', which is not among the manifests",
    ]
    assert problems(lambda docs: head_pod(docs).pop("serviceAccountName")) == [
        "RayCronJob/polyrec-retrain: runs `polyrec retrain --serving kubernetes`, but its head pod (where the driver runs) sets no serviceAccountName"
    ]
    assert problems(lambda docs: head_pod(docs).update(serviceAccountName="polyrec")) == [
        "RayCronJob/polyrec-retrain: ServiceAccount 'polyrec' (the head pod's) lacks get, patch on RayService 'polyrec-serve'",
        "RayCronJob/polyrec-retrain: serviceAccountName 'polyrec' is not among the manifests",
    ]
    # A retraining that does not promote through the API needs no permissions.
    no_promotion = lambda docs: (  # noqa: E731
        head_pod(docs).pop("serviceAccountName"),
        docs["RayCronJob"]["spec"]["jobTemplate"].update(entrypoint="bash -c 'cd /home/ray/polyrec && polyrec retrain'"),
    )
    assert problems(no_promotion) == []


def test_names_are_dns_1035_labels_the_operator_accepts(rendered):
    for documents in rendered.values():
        for kind in ("RayJob", "RayService", "RayCronJob"):
            name = documents[kind]["metadata"]["name"]
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47


def test_vendored_crds_are_the_upstream_files_listed_in_their_readme():
    listed = dict(re.findall(r"\| `(ray\.io_\w+\.yaml)` \|.*\| `([0-9a-f]{64})` \|", (K8S / "schemas" / "README.md").read_text()))
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (K8S / "schemas").glob("*.yaml")}
    assert listed == on_disk and len(on_disk) == 4
    assert "Apache License" in (K8S / "schemas" / "LICENSE").read_text()


# --- The Serve config: one source ------------------------------------------------------------


def test_generated_serve_config_patches_are_up_to_date():
    assert manifests.sync_serve_patches(check=True) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_embedded_serve_config_is_serve_config_yaml_with_cluster_paths(rendered, overlay):
    source = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    embedded = yaml.safe_load(rendered[overlay]["RayService"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)

    # Everything but the paths (and, on GPUs, the Ranker's resources) is the source file's.
    (app,) = embedded["applications"]
    (source_app,) = source["applications"]
    # The source's relative runs/... paths, and the serving state, absolute on the shared volume.
    on_volume = {k: f"{RUNS_MOUNT}/{v.removeprefix('runs/')}" for k, v in source_app["args"].items() if str(v).startswith("runs/")}
    assert on_volume["model"] == f"{RUNS_MOUNT}/default/model/artifact"
    assert app["args"] == {**source_app["args"], **on_volume, "state_dir": f"{RUNS_MOUNT}/default/serve"}
    expected_deployments = copy.deepcopy(source_app["deployments"])
    if overlay == "overlays/gpu":
        ranker = next(d for d in expected_deployments if d["name"] == "Ranker")
        ranker["ray_actor_options"] = {**ranker["ray_actor_options"], "num_cpus": 4, "num_gpus": 1}
        ranker["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 4}
    assert app["deployments"] == expected_deployments
    rest = lambda config: {k: v for k, v in config.items() if k != "applications"}  # noqa: E731
    assert rest(embedded) == rest(source)
    assert {k: v for k, v in app.items() if k not in ("args", "deployments")} == {k: v for k, v in source_app.items() if k not in ("args", "deployments")}


def test_serve_overrides_naming_an_unknown_deployment_are_rejected(tmp_path):
    overrides = tmp_path / "serve-overrides.yaml"
    overrides.write_text("applications:\n- name: polyrec\n  deployments:\n  - {name: Rankr, num_replicas: 2}\n")
    with pytest.raises(InputError, match=r"deployments: no entry named 'Rankr'"):
        manifests.render_serve_config([overrides])


def test_serve_config_keys_serve_would_silently_ignore_are_reported():
    config = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    ingress = config["applications"][0]["deployments"][0]
    ingress["autoscaling_confg"] = {"max_replicas": 3}
    ingress["ray_actor_options"]["num_gpu"] = 1
    ingress["autoscaling_config"]["max_replica"] = 3
    assert ServeDeploySchema.model_validate(config)  # Serve itself would take all three
    assert manifests.serve_config_problems(config) == [
        "applications[polyrec].deployments[Ingress].autoscaling_confg: unknown field",
        "applications[polyrec].deployments[Ingress].ray_actor_options.num_gpu: unknown field",
        "applications[polyrec].deployments[Ingress].autoscaling_config.max_replica: unknown field",
    ]


# --- Secrets, storage, images ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(rendered, overlay):
    documents = rendered[overlay]
    assert "Secret" not in documents
    for spec in _ray_cluster_specs(documents).values():
        assert spec["authOptions"] == {"mode": "token", "secretName": "polyrec-ray-auth"}
    secret_like = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
    sensitive = [e for c in _containers(list(documents.values())) for e in c.get("env", []) if secret_like.search(e["name"])]
    assert {e["name"] for e in sensitive} == {"RAY_AUTH_TOKEN", "POLYREC_API_KEY"}
    for env in sensitive:
        assert set(env) == {"name", "valueFrom"} and set(env["valueFrom"]) == {"secretKeyRef"}, env
    # Both RayJob submitters (K8sJobMode) authenticate to their cluster's dashboard.
    for job_spec in (documents["RayJob"]["spec"], documents["RayCronJob"]["spec"]["jobTemplate"]):
        (submitter,) = job_spec["submitterPodTemplate"]["spec"]["containers"]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in submitter["env"]
    # Serve replicas can run on any worker: the API key is in every RayService container.
    for container in _containers(documents["RayService"]):
        assert "POLYREC_API_KEY" in {e["name"] for e in container["env"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_mounts_the_shared_volume_where_polyrec_writes(rendered, overlay):
    documents = rendered[overlay]
    for spec in _ray_cluster_specs(documents).values():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert {"name": "runs", "persistentVolumeClaim": {"claimName": "polyrec-runs"}} in pod["volumes"]
            (container,) = pod["containers"]
            assert {"name": "runs", "mountPath": RUNS_MOUNT} in container["volumeMounts"]


@pytest.mark.parametrize(("overlay", "image"), [("overlays/cpu", "polyrec:0.1.0"), ("overlays/gpu", "polyrec:0.1.0-gpu")])
def test_every_container_runs_the_overlays_image(rendered, overlay, image):
    assert {c["image"] for c in _containers(list(rendered[overlay].values()))} == {image}


def test_job_entrypoints_reach_the_cluster_as_one_polyrec_command_line(rendered):
    for documents in rendered.values():
        for job_spec in (documents["RayJob"]["spec"], documents["RayCronJob"]["spec"]["jobTemplate"]):
            # KubeRay's submitter pastes the entrypoint into a shell script: it must be one word
            # list that `bash -c` receives whole.
            bash, flag, script = shlex.split(job_spec["entrypoint"])
            assert (bash, flag) == ("bash", "-c")
            cd, *commands = script.split(" && ")
            assert cd == "cd /home/ray/polyrec"
            for command in commands:
                program, stage, *_ = shlex.split(command)
                assert program == "polyrec" and stage in STAGES, command


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_nightly_retraining_trains_with_the_config_the_training_job_trained_with(rendered, overlay):
    # `polyrec retrain` refuses a train.model other than the served model's, and the served model is the RayJob's.
    commands = {}
    for job_spec in (rendered[overlay]["RayJob"]["spec"], rendered[overlay]["RayCronJob"]["spec"]["jobTemplate"]):
        _, _, script = shlex.split(job_spec["entrypoint"])
        for command in script.split(" && ")[1:]:
            arguments = cli.build_parser().parse_args(shlex.split(command)[1:])
            commands[arguments.stage] = arguments
    assert commands["retrain"].train_config == commands["train"].config


def test_every_stage_that_writes_a_run_can_be_submitted_as_a_job():
    assert set(STAGES) >= cli.RUN_STAGES


# --- Capacity --------------------------------------------------------------------------------


def _quantity(value) -> float:
    return float(value[:-1]) / 1000 if isinstance(value, str) and value.endswith("m") else float(value)


def _groups(spec: dict) -> list[tuple[int, float, float]]:
    """(max pods, CPUs, GPUs per pod) of each worker group; Ray takes a pod's size from its limits."""
    groups = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups.append((group["maxReplicas"], _quantity(limits["cpu"]), _quantity(limits.get("nvidia.com/gpu", 0))))
    return groups


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_cluster_holds_every_serve_replica_at_its_maximum(rendered, overlay):
    documents = rendered[overlay]
    cluster_spec = documents["RayService"]["spec"]["rayClusterConfig"]
    assert cluster_spec["enableInTreeAutoscaling"] is True
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = _groups(cluster_spec)
    (app,) = yaml.safe_load(documents["RayService"]["spec"]["serveConfigV2"])["applications"]
    needed_cpus = needed_gpus = 0.0
    for deployment in app["deployments"]:
        options = deployment["ray_actor_options"]
        cpus, gpus = options.get("num_cpus", 1), options.get("num_gpus", 0)
        replicas = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
        needed_cpus, needed_gpus = needed_cpus + replicas * cpus, needed_gpus + replicas * gpus
        assert any(pod_cpus >= cpus and pod_gpus >= gpus for _, pod_cpus, pod_gpus in groups), deployment["name"]
    assert needed_cpus <= sum(pods * cpus for pods, cpus, _ in groups)
    assert needed_gpus <= sum(pods * gpus for pods, _, gpus in groups)


def test_gpu_training_cluster_fits_an_8b_backbone_with_zero3(rendered):
    """The memory arithmetic of cluster/README.md: 8e9 parameters x 16 bytes (bf16 weights and
    gradients, fp32 master weights and two Adam moments) sharded over 8 GPUs = 16 GB each."""
    cluster_spec = rendered["overlays/gpu"]["RayJob"]["spec"]["rayClusterSpec"]
    (gpu_group,) = [g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == "gpu-a100-80g"]
    instance = gpu_group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
    instance_cpus, instance_gpus, gpu_memory_gb = INSTANCE_TYPES[instance]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    pod_gpus, pod_cpus = int(limits["nvidia.com/gpu"]), _quantity(limits["cpu"])
    assert pod_gpus == instance_gpus == 8 and pod_cpus <= instance_cpus
    model_states_per_gpu_gb = 8e9 * 16 / pod_gpus / 1e9
    assert model_states_per_gpu_gb == 16.0 and model_states_per_gpu_gb < 0.5 * gpu_memory_gb

    # Eight Ray Train workers of 1 GPU + 8 CPUs fit the one pod (or the lead's config, once written).
    config_path = REPO / "configs" / "train-llm-8b.yaml"
    scaling = TrainConfig.from_yaml(config_path).scaling if config_path.exists() else None
    workers, cpus_per_worker = (scaling.num_workers, scaling.cpus_per_worker) if scaling else (8, 8)
    assert workers <= pod_gpus * gpu_group["maxReplicas"] and workers * cpus_per_worker <= pod_cpus * gpu_group["maxReplicas"]


# --- Rendering with kubectl kustomize --------------------------------------------------------


def test_a_kustomization_kustomize_refuses_is_an_input_error(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(InputError, match=r"kubectl kustomize .*missing\.yaml"):
        manifests.build(tmp_path)


@pytest.mark.parametrize("action", [["check"], ["build", "k8s/overlays/gpu"]])
def test_without_kubectl_the_k8s_commands_say_in_one_line_what_to_install(monkeypatch, tmp_path, capsys, action):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["k8s", *action]) == 2  # a user error, not a failed check (1)
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert "kubectl" in line and manifests.KUBECTL_INSTALL_URL in line
