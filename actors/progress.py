"""Progress of work spread over Ray workers, shown by the driver as one line per stage.

Workers add to a `ProgressCounter` actor (fire-and-forget calls, a few per second at most); the driver polls it
and draws the bar. This replaces per-worker progress bars forwarded through Ray's logs, which print every
redraw as a new line wherever the output is not a terminal.
"""

from __future__ import annotations

import logging
import os
import time

import ray

# Set by the driver (in the runtime environment of a local Ray instance) unless the run is verbose.
QUIET_ENV = "SAE_SEEDS_QUIET_WORKERS"


def quiet_worker() -> None:
    """In a worker of a quiet run: INFO logging (Ray Train's per-report lines) and library progress bars off.
    Called after Ray Train has configured the worker's loggers, which sets the root logger to INFO."""
    if os.environ.get(QUIET_ENV) != "1":
        return
    logging.getLogger().setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Running totals: work planned (workers add theirs as they learn it) and work done."""

    def __init__(self):
        self.total = 0
        self.done = 0

    def add(self, done: int = 0, total: int = 0) -> None:
        self.done += done
        self.total += total

    def read(self) -> tuple[int, int]:
        return self.done, self.total


class RemoteProgress:
    """The worker's side, shaped like a tqdm bar (`update`, `close`); batches updates to one call per interval."""

    def __init__(self, counter, total: int, interval_s: float = 1.0):
        self.counter, self.interval_s = counter, interval_s
        self.pending, self.last = 0, time.monotonic()
        counter.add.remote(total=total)

    def update(self, n: int = 1) -> None:
        self.pending += n
        if time.monotonic() - self.last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.counter.add.remote(done=self.pending)
        self.pending, self.last = 0, time.monotonic()

    def close(self) -> None:
        # Waits for this call, and so for every earlier one (an actor runs one caller's calls in order): the driver
        # reads the totals once the work returns, and a call still in flight would be missing from them.
        ray.get(self.counter.add.remote(done=self.pending))
        self.pending = 0
