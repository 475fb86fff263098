"""What a polyrec command shows on its console: polyrec's own lines (stages, epochs, summaries) and one progress bar
per long step. Ray's and the libraries' logs go to the run folder's log file (``<run folder>/logs/polyrec.log``) and
to Ray's session logs instead; ``--verbose`` leaves every library's console output as the library has it.

The Ray processes a command starts learn the choice from the environment (``QUIET_ENV``, ``POLYREC_VERBOSE``), so
``console_session`` runs before Ray starts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

VERBOSE_ENV = "POLYREC_VERBOSE"
BARS_ENV = "POLYREC_PROGRESS_BARS"
LOG_FILE = "polyrec.log"
#: The top-level packages whose loggers speak on the console.
POLYREC_PACKAGES = frozenset({"common", "data", "train", "serve", "cluster", "bench"})
#: Read by the processes of a local Ray instance, which inherit this process's environment when it starts them.
QUIET_ENV = {
    # Ray Data's execution plans, progress lines and warnings go to ray-data.log only; its errors still show.
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
    # Ray Serve's controller, proxy and replicas (access logs, request errors) log to their files only.
    "RAY_SERVE_LOG_TO_STDERR": "0",
    # MLflow leaves its loggers to the application's configuration rather than giving them a console of their own.
    "MLFLOW_CONFIGURE_LOGGING": "false",
}
#: Loggers that libraries give a console handler of their own when first imported, possibly after the session starts.
_LATE_LIBRARY_LOGGERS = ("DeepSpeed", "ray.serve")
#: How polyrec's own lines begin, in this process and in the Ray workers whose output the driver prints.
STAGE_LINE_PREFIX = "[polyrec"
#: The logger that receives the Ray processes' other output (the log file's, not the console's).
WORKER_OUTPUT_LOGGER = "ray.worker_output"


T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """One progress bar over ``items`` on a terminal; none where the console is a file or a pipe (a log wants the
    stage lines, not a bar redrawn as a line per refresh)."""
    yield from tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, disable=not _bars_wanted())


def worker_bar(desc: str, total: int, unit: str):  # noqa: ANN201 (Ray's tqdm_ray.tqdm, or None)
    """A progress bar a Ray worker updates and the driver draws (Ray's ``tqdm_ray``), so that it does not arrive as
    lines of worker output; None where the command's console is not a terminal. One per long step, its description
    updated: with a bar per epoch, Ray 2.60 kept every finished epoch's bar on the console, redrawn."""
    if not _bars_wanted():
        return None
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    return ray_tqdm(desc=desc, total=total, unit=unit)


def _bars_wanted() -> bool:
    """Set by ``console_session`` in the command's process and inherited by the Ray processes it starts."""
    return os.environ.get(BARS_ENV, "1" if sys.stderr.isatty() else "0") == "1"


def quiet_train_worker() -> None:
    """In a Ray Train worker of a quiet command: Ray Train 2.60 logs each report (the whole ``TrainingReport``) under a
    logger named by its file, beyond the ``ray.train`` level that ``RunConfig.logging_config`` sets; held to warnings."""
    if verbose():
        return
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def verbose() -> bool:
    """Whether this command (or the command that started this Ray process) runs with ``--verbose``."""
    return os.environ.get(VERBOSE_ENV) == "1"


class _Console(logging.StreamHandler):
    """polyrec's records, on the ``sys.stderr`` of the moment (progress bars and test captures replace it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.addFilter(lambda record: record.name.partition(".")[0] in POLYREC_PACKAGES)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _to_root(record: logging.LogRecord) -> bool:
    logging.getLogger().handle(record)
    return False


def _route_libraries_to_root() -> None:
    """Every library logger's records to the root logger's handlers, not to a console handler of its own."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.partition(".")[0] in POLYREC_PACKAGES:
            continue
        consoles = [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        for handler in consoles:
            logger.removeHandler(handler)
        if consoles:
            logger.propagate = True
    for name in _LATE_LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        if _to_root not in library.filters:
            library.addFilter(_to_root)
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    # Their bars (each model save's shards) are not a step of the command.
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


@contextlib.contextmanager
def console_session(run_folder: Path | None, *, verbose: bool = False) -> Iterator[Path | None]:
    """The console of one command; yields its log file (``run_folder/logs/polyrec.log``; None without a run folder,
    or with ``verbose``, where nothing is rerouted). The environment it sets is put back afterwards."""
    saved_env = {name: os.environ.get(name) for name in (VERBOSE_ENV, BARS_ENV, *QUIET_ENV)}
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    os.environ[BARS_ENV] = "1" if sys.stderr.isatty() else "0"
    try:
        if verbose:
            yield None
        else:
            for name, value in QUIET_ENV.items():
                os.environ.setdefault(name, value)
            with _quiet_logging(run_folder) as log_file:
                yield log_file
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _LazyFileHandler(logging.FileHandler):
    """Creates the log file and its folder at the first record, so a command refused before doing anything (a run
    folder that already holds a finished run) leaves no trace in the folder it refused."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def _open(self):  # noqa: ANN202 (logging's signature)
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _print_worker_output(data: dict, ignore_prefix: bool) -> None:  # noqa: ARG001 (Ray's handler signature)
    """The driver's printer of what Ray's processes write (Ray's ``print_to_stdstream``), quiet: polyrec's lines and
    Ray's progress-bar updates reach the console, bare; the rest (DeepSpeed's build notes, deprecation warnings of
    Ray's own actors, the raylet's worker-count warnings, Serve's banner) goes to the log file with its process."""
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    lines = data.get("lines", [])
    shown = [line for line in lines if RAY_TQDM_MAGIC in line or line.lstrip().startswith(STAGE_LINE_PREFIX)]
    if len(shown) < len(lines):
        process = f"{data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')}".strip()
        to_file = logging.getLogger(WORKER_OUTPUT_LOGGER)
        for line in lines:
            if line not in shown:
                to_file.info("(%s) %s", process, line)
    if shown:
        _RAY_PRINT_TO_STDSTREAM({**data, "lines": shown}, ignore_prefix=True)


_RAY_PRINT_TO_STDSTREAM = None


@contextlib.contextmanager
def _quiet_worker_output() -> Iterator[None]:
    """Puts ``_print_worker_output`` in the place of Ray's printer of worker output: for a Ray instance the command
    starts or joins later (``ray.init`` registers the printer it finds then), and for one it has already joined."""
    global _RAY_PRINT_TO_STDSTREAM
    from ray._private import worker

    original = _RAY_PRINT_TO_STDSTREAM = worker.print_to_stdstream
    dispatcher = worker.global_worker_stdstream_dispatcher

    def swap(old, new) -> None:  # noqa: ANN001 (Ray's printer functions)
        with dispatcher._lock:
            dispatcher.handlers = [
                (name, functools.partial(new, *handler.args, **handler.keywords) if getattr(handler, "func", None) is old else handler)
                for name, handler in dispatcher.handlers
            ]

    worker.print_to_stdstream = _print_worker_output
    swap(original, _print_worker_output)
    try:
        yield
    finally:
        worker.print_to_stdstream = original
        swap(_print_worker_output, original)


@contextlib.contextmanager
def _quiet_logging(run_folder: Path | None) -> Iterator[Path | None]:
    import ray.data  # configures Ray's and Ray Data's loggers, rerouted below

    ray.data.DataContext.get_current().enable_progress_bars = False
    root = logging.getLogger()
    handlers: list[logging.Handler] = [_Console()]
    log_file = None
    if run_folder is not None:
        log_file = Path(run_folder).resolve() / "logs" / LOG_FILE
        to_file = _LazyFileHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    level = root.level
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    logging.captureWarnings(True)
    _route_libraries_to_root()
    try:
        with _quiet_worker_output():
            yield log_file
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
