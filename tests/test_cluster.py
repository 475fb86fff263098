"""Job submission against a real local Ray cluster (token authentication on), and the
cluster-launcher and DeepSpeed configs against Ray's and DeepSpeed's own checks.

The cluster is a ``ray start --head --block`` child of this module, stopped by signalling that
process and its process group: ``ray stop`` would also stop other Ray instances on the machine.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import psutil
import pytest
import ray.autoscaler
import requests
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.accelerators.accelerators import NVIDIA_A100_80G, NVIDIA_TESLA_A10G

from cluster import submit as jobs
from cluster.cli import build_parser, submit_options
from common.errors import InputError
from data.schema import SCHEMA_VERSION
from tests.ports import free_ports
from train.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
RAY_BIN = Path(sys.executable).with_name("ray")
TOKEN = secrets.token_hex(20)


@dataclass
class LocalCluster:
    url: str
    root: Path  # holds the token file, HOME, and Ray's temp dir (logs)
    token_file: Path


def _ray_logs(root: Path, log: Path) -> str:
    """What `ray start` printed and the end of the logs of the processes a job submission needs."""
    parts = [log.read_text()]
    for name in ("raylet.out", "dashboard_agent.log", "dashboard.log"):
        for path in sorted(root.glob(f"ray/session_*/logs/{name}")):
            parts.append(f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


def _wait_until_jobs_run(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until a job runs: the dashboard answers before the head node's job agent has registered."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {TOKEN}"}
    client = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        try:
            # /api/version sits behind token authentication, so this also proves the token works.
            client = client or JobSubmissionClient(url, headers=headers)
            job_id = client.submit_job(entrypoint="true")
            break
        except (ConnectionError, requests.RequestException, RuntimeError) as err:
            if isinstance(err, RuntimeError) and jobs.NO_AGENT_REPLY not in str(err):
                raise
            time.sleep(1)
    else:
        raise RuntimeError(f"no job could be submitted to {url} in {timeout_s:.0f} s")
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode} while the first job ran")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the first job on {url} did not end in {timeout_s:.0f} s")
        time.sleep(0.5)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"the first job on {url} ended {status}: {client.get_job_logs(job_id)}")


def _stop(process: subprocess.Popen, root: Path) -> None:
    process.terminate()  # `ray start --block` shuts down what it started on SIGTERM
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # our own session: whatever is left of it
    for leftover in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(root) in " ".join(leftover.info["cmdline"] or ()):
                leftover.kill()


def _start_cluster() -> tuple[subprocess.Popen, LocalCluster]:
    # A short path: Ray's unix sockets live under the temp dir and must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="polyrec-ray-"))
    (root / "home").mkdir()
    token_file = root / "auth_token"
    token_file.write_text(TOKEN)
    # Ports with a fixed default are chosen here, so that a Ray instance already on the machine
    # does not clash; the rest Ray picks itself (the agent's HTTP port 0: any free port).
    gcs, dashboard, client = free_ports(3)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # HOME is private so that no ~/.ray/auth_token of this machine is read or written. The venv
    # comes first on PATH, as polyrec's environment does on a cluster node: jobs run `python`.
    env.update(
        HOME=str(root / "home"),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        PATH=f"{RAY_BIN.parent}{os.pathsep}{env.get('PATH', '')}",
    )
    log = root / "ray-start.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [
                str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}", "--dashboard-agent-listen-port=0",
                f"--temp-dir={root / 'ray'}", "--disable-usage-stats",
            ],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_until_jobs_run(url, process)
    except BaseException as err:  # Ctrl-C too: nothing of this cluster is left behind
        failure = f"{err!r}\n{_ray_logs(root, log)}"
        _stop(process, root)
        shutil.rmtree(root, ignore_errors=True)
        if isinstance(err, Exception):  # an error from Ray's client as well (a head that went down mid-way)
            raise RuntimeError(failure) from None
        raise
    return process, LocalCluster(url=url, root=root, token_file=token_file)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # A port picked free can be taken before Ray binds it; a second start has fresh ports.
    try:
        process, local = _start_cluster()
    except RuntimeError as first_failure:
        warnings.warn(f"the local Ray cluster did not start; starting it again. First failure:\n{first_failure}", stacklevel=1)
        process, local = _start_cluster()
    try:
        yield local
    finally:
        _stop(process, local.root)
        shutil.rmtree(local.root, ignore_errors=True)


@pytest.fixture
def client_env(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> LocalCluster:
    """This process as a user's shell configured for the cluster: token mode, token in a file."""
    for name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_file))
    return cluster


def _python_job(code: str) -> str:
    return shlex.join(["python", "-c", code])


# --- Submitting and following jobs -----------------------------------------------------------

WORKING_DIR_PROBE = """
import os
from data.config import DEFAULT_DATASET_DIR
from data.schema import SCHEMA_VERSION
ratings = sum(1 for _ in open(DEFAULT_DATASET_DIR / "u.data"))
print(f"ratings={ratings} schema={SCHEMA_VERSION} venv={os.path.exists('.venv')} git={os.path.exists('.git')}")
"""


@pytest.mark.timeout(180)
def test_job_runs_repository_code_with_the_embedded_dataset_and_without_the_venv(client_env):
    job_id = jobs.submit_command(_python_job(WORKING_DIR_PROBE), address=client_env.url)
    streamed = io.StringIO()
    status = jobs.follow_job(job_id, address=client_env.url, out=streamed)

    assert status == JobStatus.SUCCEEDED, jobs.job_message(job_id, address=client_env.url)
    # MovieLens-100K has exactly 100,000 ratings; .venv and .git exist here but are not uploaded.
    assert f"ratings=100000 schema={SCHEMA_VERSION} venv=False git=False" in streamed.getvalue()
    assert jobs.job_status(job_id, address=client_env.url) == JobStatus.SUCCEEDED


def test_address_comes_from_RAY_ADDRESS(client_env, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", client_env.url)
    # A 404 for the job from that cluster: it was reached and authenticated to.
    with pytest.raises(InputError, match=f"no job 'polyrec-x' on the Ray cluster at {client_env.url}"):
        jobs.job_status("polyrec-x")


@pytest.mark.timeout(180)
@pytest.mark.skipif(not (REPO / "cluster" / "cli.py").exists(), reason="cluster/cli.py is not written yet")
def test_stage_submission_runs_the_polyrec_command(client_env):
    streamed = io.StringIO()
    job_id = jobs.submit("preprocess", ["--help"], address=client_env.url, follow=True, out=streamed)

    assert job_id.startswith("polyrec-preprocess-")
    assert jobs.job_status(job_id, address=client_env.url) == JobStatus.SUCCEEDED
    assert "--output" in streamed.getvalue()  # argparse's help for `polyrec preprocess`


@pytest.mark.timeout(180)
def test_failing_job_is_reported_failed_with_its_log_tail(client_env):
    code = "import sys\nfor i in range(30): print('line', i)\nprint('giving up'); sys.exit(3)"
    job_id = jobs.submit_command(_python_job(code), address=client_env.url)

    assert jobs.follow_job(job_id, address=client_env.url, out=io.StringIO()) == JobStatus.FAILED
    assert jobs.job_logs(job_id, address=client_env.url, tail_lines=2) == "line 29\ngiving up\n"
    assert "exit code 3" in jobs.job_message(job_id, address=client_env.url)


def test_stage_entrypoint_quotes_arguments():
    assert (
        jobs.stage_entrypoint("train", ["--config", "configs/my run.yaml", "--output", "s3://b/m"])
        == "python -m cluster.cli train --config 'configs/my run.yaml' --output s3://b/m"
    )
    with pytest.raises(InputError, match="unknown stage 'trian'"):
        jobs.stage_entrypoint("trian")


# --- Errors ----------------------------------------------------------------------------------


def test_unknown_job_is_an_input_error(client_env):
    with pytest.raises(InputError, match="no job 'polyrec-train-doesnotexist' on the Ray cluster"):
        jobs.job_status("polyrec-train-doesnotexist", address=client_env.url)


def test_unreachable_address_is_an_input_error(client_env):
    (port,) = free_ports(1)
    with pytest.raises(InputError, match=f"cannot reach the Ray dashboard at http://127.0.0.1:{port}"):
        jobs.job_status("any", address=f"http://127.0.0.1:{port}")


def test_missing_address_is_an_input_error(client_env):
    with pytest.raises(InputError, match="no Ray cluster address"):
        jobs.job_status("any")


def _no_agent_for(monkeypatch: pytest.MonkeyPatch, attempts: float) -> list[str]:
    """The head's reply while its job agent has not registered (Ray's text), for the first
    ``attempts`` submissions; the real submission after that. Returns the entrypoints tried."""
    real_submit = JobSubmissionClient.submit_job
    tried: list[str] = []

    def submit_job(self, **kwargs):
        tried.append(kwargs["entrypoint"])
        if len(tried) <= attempts:
            raise RuntimeError(f"Request failed with status code 500: {jobs.NO_AGENT_REPLY}, please try again later..")
        return real_submit(self, **kwargs)

    monkeypatch.setattr(JobSubmissionClient, "submit_job", submit_job)
    return tried


def test_a_submission_waits_for_the_head_nodes_job_agent(client_env, monkeypatch):
    tried = _no_agent_for(monkeypatch, attempts=2)
    job_id = jobs.submit_command(_python_job("print('ran')"), address=client_env.url)

    assert len(tried) == 3 and len(set(tried)) == 1
    assert jobs.follow_job(job_id, address=client_env.url, out=io.StringIO()) == JobStatus.SUCCEEDED


def test_a_head_that_never_gets_a_job_agent_is_an_input_error(client_env, monkeypatch):
    tried = _no_agent_for(monkeypatch, attempts=float("inf"))
    monkeypatch.setattr(jobs, "AGENT_WAIT_S", 1.0)
    with pytest.raises(InputError, match=f"the Ray cluster at {client_env.url} has no job agent on its head node after 1 s"):
        jobs.submit_command(_python_job("print('never')"), address=client_env.url)
    assert len(tried) >= 2  # retried before giving up


# --- Token authentication ---------------------------------------------------------------------


def test_token_mode_without_a_token_is_an_input_error(client_env, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    with pytest.raises(InputError, match="RAY_AUTH_MODE=token but no Ray auth token was found"):
        jobs.job_status("any", address=client_env.url)


def test_a_client_without_token_mode_is_told_how_to_authenticate(client_env, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE")
    # "rejected" when an earlier ray.init() in this process left Ray's own token handling on.
    with pytest.raises(InputError, match=r"(requires token authentication|rejected the token): set RAY_AUTH_MODE=token"):
        jobs.job_status("any", address=client_env.url)


def test_wrong_token_is_rejected_without_echoing_it(client_env, monkeypatch):
    wrong = secrets.token_hex(20)
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong)  # the variable wins over the token file
    with pytest.raises(InputError, match="rejected the token") as raised:
        jobs.job_status("any", address=client_env.url)
    assert wrong not in str(raised.value) and TOKEN not in str(raised.value)


@pytest.mark.timeout(180)
def test_token_is_never_printed_logged_or_sent_with_the_job(client_env, capfd, caplog):
    caplog.set_level("DEBUG")
    # A careless job that prints the cluster's token: what polyrec prints of its logs is blanked.
    leaky = "import os; print('token is', open(os.environ['RAY_AUTH_TOKEN_PATH']).read())"
    streamed = io.StringIO()
    job_id = jobs.submit_command(_python_job(leaky), address=client_env.url, metadata={"purpose": "leak test"})
    assert jobs.follow_job(job_id, address=client_env.url, out=streamed) == JobStatus.SUCCEEDED

    assert f"token is {jobs.REDACTED}" in streamed.getvalue()
    assert TOKEN not in streamed.getvalue() + jobs.job_logs(job_id, address=client_env.url)
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    # What was sent with the job: neither the entrypoint, the runtime env nor the metadata.
    info = JobSubmissionClient(client_env.url, headers={"Authorization": f"Bearer {TOKEN}"}).get_job_info(job_id)
    assert TOKEN not in json.dumps([info.entrypoint, info.runtime_env, info.metadata])
    # Ray's own logs, except the job's stdout (which the job itself wrote the token into).
    for log in (client_env.root / "ray").rglob("*"):
        if log.is_file() and not log.name.startswith("job-driver-") and log.suffix in (".log", ".out", ".err"):
            assert TOKEN not in log.read_text(errors="replace"), log


def test_token_is_read_from_RAY_AUTH_TOKEN_then_its_path_then_the_home_file(monkeypatch, tmp_path):
    home_token = tmp_path / ".ray" / "auth_token"
    home_token.parent.mkdir()
    home_token.write_text("from-home\n")
    path_token = tmp_path / "token"
    path_token.write_text("  from-path\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    assert jobs._auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert jobs._auth_token() == "from-path"
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert jobs._auth_token() == "from-home"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs._auth_token() is None


# --- Cluster-launcher configs ----------------------------------------------------------------

LAUNCHER_CONFIGS = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))
AWS_CONFIG = REPO / "cluster" / "launcher" / "aws-gpu.yaml"
#: (vCPUs, GPUs) of the EC2 instance types aws-gpu.yaml uses.
EC2_INSTANCES = {"m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "g5.12xlarge": (48, 4), "p4de.24xlarge": (96, 8)}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_own_checks_and_installs_polyrec(path):
    config = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does with it

    # The repository is mounted where setup installs it from, the token where Ray looks for it.
    (repo_mount,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any(f"pip install --python ~/polyrec-venv/bin/python -e {repo_mount}" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["rsync_filter"] == [".gitignore"]  # no .venv or runs/ uploaded
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)


def test_aws_node_types_declare_their_instances_resources_and_fit_the_8b_plan():
    config = yaml.safe_load(AWS_CONFIG.read_text())
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head only schedules
    for name, node_type in node_types.items():
        cpus, gpus = EC2_INSTANCES[node_type["node_config"]["InstanceType"]]
        if name != config["head_node_type"]:
            assert (node_type["resources"]["CPU"], node_type["resources"].get("GPU", 0)) == (cpus, gpus), name
    # Ray's accelerator names, so `accelerator_type=` requests scale up the right node type.
    assert node_types["gpu-a10g"]["resources"][f"accelerator_type:{NVIDIA_TESLA_A10G}"] == 1
    a100 = node_types["gpu-a100-80g"]["resources"]
    assert a100[f"accelerator_type:{NVIDIA_A100_80G}"] == 1
    # 8B with ZeRO-3: 8 Ray Train workers of 1 GPU + 8 CPUs on one node (cluster/README.md).
    assert a100["GPU"] >= 8 and a100["CPU"] >= 8 * 8 and node_types["gpu-a100-80g"]["max_workers"] >= 1
    assert sum(t.get("max_workers", 0) for t in node_types.values()) >= config["max_workers"]


# --- DeepSpeed configs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "zero_stage", "micro_batch", "batch_per_step"),
    [("zero2_default.json", 2, 128, 128), ("zero3_bf16_llm.json", 3, 4, 4 * 8)],
)
def test_deepspeed_configs_pass_deepspeeds_own_parser(name, zero_stage, micro_batch, batch_per_step):
    from deepspeed.runtime.config import DeepSpeedConfig as ParsedDeepSpeedConfig

    extra = json.loads((REPO / "cluster" / "deepspeed" / name).read_text())
    # The trainer supplies the micro batch (TrainConfig.batch_size) and merges these in as
    # TrainConfig.deepspeed.extra; one process here, so world size 1.
    parsed = ParsedDeepSpeedConfig({"train_micro_batch_size_per_gpu": micro_batch, **extra})
    assert parsed.zero_optimization_stage == zero_stage
    assert parsed.bfloat16_config.enabled
    assert parsed.train_batch_size == batch_per_step  # micro batch x accumulation steps
    if zero_stage == 3:  # the model artifact needs whole weights gathered at save time
        assert parsed.zero_config.gather_16bit_weights_on_model_save
    config = TrainConfig.model_validate({"deepspeed": {"zero_stage": zero_stage, "precision": "bf16", "extra": extra}})
    assert config.deepspeed.extra["zero_optimization"]["stage"] == config.deepspeed.zero_stage


def test_deepspeed_parser_catches_a_misspelt_zero_key():
    from deepspeed.runtime.config import DeepSpeedConfig as ParsedDeepSpeedConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="overlap_com"):
        ParsedDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "overlap_com": True}})


def test_the_main_job_refuses_a_folder_that_holds_a_finished_run(tmp_path, capsys):
    from cluster.cli import main

    (tmp_path / "model" / "artifact").mkdir(parents=True)
    (tmp_path / "model" / "artifact" / "model.safetensors").write_bytes(b"earlier run")
    assert main(["pipeline", "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already holds a finished run" in error and str(tmp_path) in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # nothing preprocessed or overwritten
    assert (tmp_path / "model" / "artifact" / "model.safetensors").read_bytes() == b"earlier run"


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "train", "--address", "http://head:8265", "--follow", "--config", "configs/train.yaml", "--pip", "x==1"],
        ["submit", "--address", "http://head:8265", "--follow", "--pip", "x==1", "train", "--config", "configs/train.yaml"],
        ["submit", "--follow", "train", "--config", "configs/train.yaml", "--address", "http://head:8265", "--pip", "x==1"],
    ],
)
def test_submit_reads_its_own_options_wherever_they_stand(argv: list[str]) -> None:
    args, stage_args = submit_options(build_parser().parse_args(argv))
    assert (args.job_stage, args.address, args.follow, args.pip) == ("train", "http://head:8265", True, ["x==1"])
    assert stage_args == ["--config", "configs/train.yaml"]
