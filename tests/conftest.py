"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from dataclasses import dataclass

import pytest
import ray
import torch

from cluster.cli import main as polyrec
from tests.tiny import tiny_config, tiny_preprocess_config

# Ray Train's controller sees each report (one per epoch) and the run's end at a poll: every 0.5 s as polyrec sets it
# (common.ray_connect.ray_train_fit, unless set), here every 0.25 s, because the tests' epochs take under a second
# and would otherwise spend more time waiting on polls than training. Set before any test starts Ray.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


_exit_status = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_exit_status] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave a finished session without the interpreter's finalisation. Every result is reported by then, but the
    process still holds the threads of Ray's core worker, gRPC, torch's and faiss's OpenMP pools and the tokenizers'
    pool, and a CI run with all 351 tests passed ended in a segmentation fault after its summary, while those were
    torn down. The exit status stays pytest's own."""
    if _exit_status not in config.stash:  # --help, --version: no session ran
        return
    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[_exit_status])


@pytest.fixture(autouse=True)
def ctrl_c_stays_ctrl_c():
    """Reports a test after which Ctrl-C no longer does what it did before: code that leaves its SIGINT handler behind
    breaks every later stage of the same process (Ray Train did, and the main job's Ctrl-C after its training raised
    Ray's "Can't find actor"). A warning names the test; the handler is put back for the tests after it."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        warnings.warn(f"the test left SIGINT handled by {after!r} (it was {before!r})", stacklevel=1)
        if before is not None:  # None: a handler installed from C, which Python cannot put back
            signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the shared 2-core machine stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class TrainedRun:
    data: str  # the preprocessing output
    artifact: str  # the model artifact `polyrec train` exported


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """A real run of `polyrec preprocess` and `polyrec train` (the CLI, config files as a user writes
    them) on the tiny slice of ml-100k, shared by every test that needs what users serve."""
    root = tmp_path_factory.mktemp("trained")
    preprocess = tiny_preprocess_config(root)
    (root / "preprocess.yaml").write_text(preprocess.to_yaml())
    data = root / "data"
    (root / "train.yaml").write_text(tiny_config(str(data), root / "model", epochs=2).to_yaml())
    started_ray = not ray.is_initialized()
    try:
        assert polyrec(["preprocess", "--config", str(root / "preprocess.yaml"), "--output", str(data)]) == 0
        assert polyrec(["train", "--config", str(root / "train.yaml")]) == 0
    finally:
        if started_ray:
            ray.shutdown()
    return TrainedRun(str(data), str(root / "model" / "artifact"))
