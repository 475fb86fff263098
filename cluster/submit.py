"""Run polyrec's stages on a remote Ray cluster through the Ray Jobs API.

A job is ``python -m cluster.cli <stage> ...`` run on the cluster with this repository as its
``working_dir`` (uploaded by Ray, without virtual environments, run outputs and caches). The
cluster's nodes are expected to have polyrec's dependencies installed already (the launcher's
``setup_commands``, the container image); ``extra_pip`` installs more into the job's own
environment when asked.

The cluster address is the dashboard URL (``http://<head>:8265``), from the argument or
``RAY_ADDRESS``; as with ``ray job submit``, ``RAY_API_SERVER_ADDRESS`` and ``RAY_ADDRESS``
take precedence over the argument when set.

Token authentication follows Ray's own clients: the token is sent only when
``RAY_AUTH_MODE=token``, and is read from ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. It travels in the ``Authorization`` header
only; it is never put in the job's runtime environment, printed, or logged, and it is blanked out
of the job logs this module prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from common.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent

STAGES = ("preprocess", "pretrain", "train", "evaluate", "retrain", "pipeline", "serve")

#: gitignore-style patterns, relative to the working_dir, left out of the upload. The embedded
#: MovieLens-100K under data/datasets/ is deliberately kept: jobs run on it by default.
WORKING_DIR_EXCLUDES = (
    "/.venv/",
    "/runs/",
    "/bench/_work/",
    "/bench/.venv-peers/",
    "/.git/",
    "/build/",
    "/dist/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
)

AUTH_SETUP_HINT = (
    "set RAY_AUTH_MODE=token and give the cluster's token in a file named by RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token, or the RAY_AUTH_TOKEN variable)"
)
REDACTED = "[ray-auth-token]"

#: Ray's reply while the head node's job agent is not registered, and how long a submission retries it.
NO_AGENT_REPLY = "No available agent to submit job"
AGENT_WAIT_S = 60.0


def runtime_env(working_dir: str | Path = REPO_ROOT, extra_pip: Sequence[str] | None = None) -> dict[str, Any]:
    """The job's runtime environment: the code as ``working_dir``, plus ``pip`` only when asked."""
    working_dir = Path(working_dir)
    if not working_dir.is_dir():
        raise InputError(f"working_dir {working_dir}: not a directory")
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
    if extra_pip:
        env["pip"] = list(extra_pip)
    return env


def stage_entrypoint(stage: str, args: Sequence[str] = ()) -> str:
    """The shell command a job runs for ``polyrec <stage> <args>``."""
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    # "python" is the cluster's interpreter, not this machine's sys.executable.
    return shlex.join(["python", "-m", "cluster.cli", stage, *args])


def submit(
    stage: str,
    args: Sequence[str] = (),
    *,
    address: str | None = None,
    follow: bool = False,
    working_dir: str | Path = REPO_ROOT,
    extra_pip: Sequence[str] | None = None,
    out: TextIO = sys.stdout,
) -> str:
    """Submit ``polyrec <stage> <args>`` as a Ray job and return its submission id.

    With ``follow``, the job's logs are streamed to ``out`` until it ends; ask ``job_status``
    for how it ended.
    """
    job_id = submit_command(
        stage_entrypoint(stage, args),
        address=address,
        working_dir=working_dir,
        extra_pip=extra_pip,
        submission_id=f"polyrec-{stage}-{uuid.uuid4().hex[:12]}",
        metadata={"polyrec_stage": stage},
    )
    if follow:
        follow_job(job_id, address=address, out=out)
    return job_id


def submit_command(
    entrypoint: str,
    *,
    address: str | None = None,
    working_dir: str | Path = REPO_ROOT,
    extra_pip: Sequence[str] | None = None,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit any shell command as a Ray job with polyrec's working_dir; return its submission id."""
    env = runtime_env(working_dir, extra_pip)
    with _cluster_errors(address) as client:
        # A head node that has just started answers before its job agent has registered; Ray waits
        # 10 s for it on each attempt, then asks the client to try again later.
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id, metadata=metadata)
            except RuntimeError as err:
                if NO_AGENT_REPLY not in str(err) or time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)


def follow_job(job_id: str, *, address: str | None = None, out: TextIO = sys.stdout) -> JobStatus:
    """Stream a job's logs to ``out`` until it ends; return its final status."""
    with _cluster_errors(address, job_id) as client:
        client.get_job_status(job_id)  # an unknown job fails here, before the websocket opens
        token = _auth_token()

        async def stream() -> None:
            async for chunk in client.tail_job_logs(job_id):
                out.write(_redact(chunk, token))
                out.flush()

        asyncio.run(stream())
        # The log stream can close a moment before the status turns terminal.
        while not (status := client.get_job_status(job_id)).is_terminal():
            time.sleep(0.5)
        return status


def job_status(job_id: str, *, address: str | None = None) -> JobStatus:
    with _cluster_errors(address, job_id) as client:
        return client.get_job_status(job_id)


def job_logs(job_id: str, *, address: str | None = None, tail_lines: int | None = None) -> str:
    """A job's logs so far (the last ``tail_lines`` lines when given)."""
    with _cluster_errors(address, job_id) as client:
        logs = _redact(client.get_job_logs(job_id), _auth_token())
    if tail_lines is not None:
        logs = "".join(logs.splitlines(keepends=True)[-tail_lines:])
    return logs


def job_message(job_id: str, *, address: str | None = None) -> str:
    """Ray's one-line account of how a job ended (exit code and last log lines for a failure)."""
    with _cluster_errors(address, job_id) as client:
        return _redact(client.get_job_info(job_id).message or "", _auth_token())


def stop_job(job_id: str, *, address: str | None = None) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    with _cluster_errors(address, job_id) as client:
        return client.stop_job(job_id)


def _auth_token() -> str | None:
    """The token Ray's clients would send, or None when token authentication is not asked for."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    # Ray's own loader (ray._raylet) is private and caches per process; this follows its
    # documented order instead, and reads the environment afresh on every call.
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if token_path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(token_path).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise InputError(f"RAY_AUTH_TOKEN_PATH={token_path}: no token in that file")
        return token
    default_path = Path.home() / ".ray" / "auth_token"
    if default_path.is_file() and (token := default_path.read_text().strip()):
        return token
    raise InputError(f"RAY_AUTH_MODE=token but no Ray auth token was found: {AUTH_SETUP_HINT}")


def _client(address: str, headers: dict[str, str] | None) -> JobSubmissionClient:
    try:
        return JobSubmissionClient(address, headers=headers)
    except ValueError as err:  # Ray's "Invalid address format"
        raise InputError(f"{address}: not a Ray dashboard address ({err}); expected http://<head>:8265") from None
    except RuntimeError as err:
        if "parsed from address" in str(err):  # a scheme other than http(s), which Ray takes for a module to import
            raise InputError(f"{address}: not a Ray dashboard address; expected http://<head>:8265") from None
        raise


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, REDACTED) if token else text


@contextlib.contextmanager
def _cluster_errors(address: str | None, job_id: str | None = None) -> Iterator[JobSubmissionClient]:
    """A client for the cluster; Ray's connection, authentication and unknown-job errors become
    one-line InputErrors that never carry the token."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise InputError("no Ray cluster address: pass the dashboard URL (http://<head>:8265) or set RAY_ADDRESS")
    token = _auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        yield _client(address, headers)
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise InputError(f"cannot reach the Ray dashboard at {address}: is the cluster up and its dashboard (default port 8265) reachable from here?") from None
    except AuthenticationError as err:
        verdict = "rejected the token" if "Forbidden" in str(err) else "requires token authentication"
        raise InputError(f"the Ray cluster at {address} {verdict}: {AUTH_SETUP_HINT}") from None
    except RuntimeError as err:
        if job_id is not None and ("404" in str(err) or "does not exist" in str(err)):
            raise InputError(f"no job {job_id!r} on the Ray cluster at {address}") from None
        if NO_AGENT_REPLY in str(err):
            raise InputError(
                f"the Ray cluster at {address} has no job agent on its head node after {AGENT_WAIT_S:.0f} s: "
                "see dashboard_agent.log and raylet.out in the head's Ray logs (/tmp/ray/session_latest/logs)"
            ) from None
        raise
