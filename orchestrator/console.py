"""What a person sees while a run works: one progress line per stage, warnings and errors, then the summary.

By default Ray's INFO logging, Ray Data's periodic status blocks, Ray Train's start-up lines and the progress bars
of transformers and of workers are off; `--verbose` (or `SAE_SEEDS_VERBOSE=1`) leaves Ray's and the libraries'
own output as it is. Warnings and errors are shown either way.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager

import ray
from ray.util.debug import log_once
from tqdm.auto import tqdm

from actors.progress import QUIET_ENV

VERBOSE_ENV = "SAE_SEEDS_VERBOSE"
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by ray.init when it starts a local instance
# Loggers of the driver process that speak at INFO about their own work (store creation, execution plans).
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "transformers", "datasets",
                   "huggingface_hub", "filelock", "urllib3")
# Set in every worker of a local Ray instance: library progress bars off (the driver draws one bar per stage).
QUIET_WORKER_ENV = {QUIET_ENV: "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error"}


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(verbose: bool) -> None:
    """The CLI's --verbose; an environment variable so that code far from the CLI (and tests) can read it."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def quiet_driver() -> None:
    """Library logging on the driver down to warnings, Ray Data's progress output off."""
    if is_verbose():
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # Ray Data would warn once that we turned its bars off
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # transformers is a dependency; a stripped-down install just keeps its bars
        pass


def ray_init_options(local: bool) -> dict:
    """Extra `ray.init` arguments: Ray's logging at WARNING; for a local instance also the workers' quiet
    environment. A cluster joined under `ray job submit` keeps the job's runtime environment: its workers' output
    goes to the job's logs. Ray's C++ core still prints its own warnings at ERROR level (one or two lines a run
    about actor arguments kept in the object store); setting its log level by environment would print a line per
    process instead."""
    if is_verbose():
        return {}
    options = {"logging_level": logging.WARNING,
               "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="WARNING")}
    if local:
        options["runtime_env"] = {"env_vars": dict(QUIET_WORKER_ENV)}
    return options


@contextmanager
def own_local_instance(options: dict, host: str | None = None):
    """Start a local instance whose workers know its address. Ray Train's placement-group monitor looks the
    cluster up by address and, with two Ray instances on one machine (two experiments, or a test session's
    instance beside a run), cannot tell which is its own and prints a traceback each run. The GCS port is chosen
    here so that `RAY_ADDRESS` can be put in the workers' environment before they start. `host`: the address the
    instance binds to (`ray.bind_address`; None: all interfaces, reachable on loopback)."""
    host = host or "127.0.0.1"
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": f"{host}:{port}"}
    previous = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)
    try:
        yield options | {"runtime_env": runtime_env}
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = previous


def train_logging_config():
    """Ray Train's own status lines (resources requested, worker group started) at WARNING unless verbose."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


@contextmanager
def stage_progress(description: str, unit: str, poll_s: float = 0.5):
    """A bar on the driver fed by a `ProgressCounter` actor that workers add to; yields the actor handle."""
    from actors.progress import ProgressCounter

    counter = ProgressCounter.remote()
    stop = threading.Event()
    bar = tqdm(total=0, desc=description, unit=unit, dynamic_ncols=True)

    def poll() -> None:
        while not stop.wait(poll_s):
            try:
                done, total = ray.get(counter.read.remote(), timeout=poll_s * 20)
            except ray.exceptions.GetTimeoutError:  # a busy machine: try again
                continue
            except Exception:  # the cluster is going away; the stage reports its own error
                return
            if total != bar.total:
                bar.total = total
                bar.refresh()
            if done != bar.n:
                bar.update(done - bar.n)

    thread = threading.Thread(target=poll, daemon=True, name=f"progress-{description}")
    thread.start()
    try:
        yield counter
        done, total = ray.get(counter.read.remote())
        bar.total = total
        bar.update(done - bar.n)
    finally:
        stop.set()
        thread.join(timeout=5)
        bar.close()
        ray.kill(counter)


def gather(refs: list, description: str, unit: str) -> list:
    """`ray.get(refs)` with a bar that advances as each task finishes; results in the order of `refs`."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=description, unit=unit, dynamic_ncols=True) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                results[index[ref]] = ray.get(ref)
            bar.update(len(ready))
    return results
