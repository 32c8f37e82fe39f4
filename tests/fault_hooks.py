"""Fault injection for the resumption tests, installed in Ray workers from outside the production code.

`install` is a Ray `worker_process_setup_hook`: with $SAE_SEEDS_FAULT = {"point", "shard", "action": "exit"|"hang",
"marker"} it wraps `ActivationStore.write_json` in that worker so that, once (the marker file records it), the
process dies or hangs at that point of that shard: "files_written" is just before the shard's record is written
(its Parquet files are complete, it is not committed), "committed" is just after; "planted_files_written" and
"planted_committed" are the same points of the planted source's shards.

With {"point": "train_step", "after_steps", "marker"} it wraps the torch backend's `TorchRun.step` instead: once, a
training worker is SIGKILLed after that many steps, as soon as Ray Train has committed the training state the
workers last reported, so that the restarted group deterministically resumes from it.
"""

import json
import os
import signal
import time

FAULT_ENV = "SAE_SEEDS_FAULT"


def runtime_env(fault: dict | None, repo: str) -> dict:
    """The Ray runtime env of a driver whose workers get `fault` (None: the hook installs nothing). The hook is
    imported when a worker process starts, before Ray adds the driver's directories to its sys.path: PYTHONPATH is
    what makes `tests.fault_hooks` importable there (without it every worker of the job fails to start and an
    actor pool waits for ever)."""
    env_vars = {"PYTHONPATH": repo} | ({FAULT_ENV: json.dumps(fault)} if fault else {})
    return {"env_vars": env_vars, "worker_process_setup_hook": "tests.fault_hooks.install"}


def _first(fault: dict) -> bool:
    """Whether this is the fault's first firing (the marker file records it): the restarted worker must get through."""
    try:
        fd = os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _fire(fault: dict) -> None:
    if not _first(fault):
        return
    if fault["action"] == "exit":
        os._exit(1)
    time.sleep(3600)  # the test kills the driver meanwhile; Ray reaps this worker with the job


def install() -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault = json.loads(spec)
    if fault["point"] == "train_step":
        _kill_training_worker(fault)
        return
    _fail_writing_shard(fault)


def _kill_training_worker(fault: dict) -> None:
    from actors.train.training import TorchRun

    step = TorchRun.step

    def faulty_step(self, index, batch):
        step(self, index, batch)
        if index + 1 == fault["after_steps"] and _first(fault):
            import ray.train

            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            os.kill(os.getpid(), signal.SIGKILL)

    TorchRun.step = faulty_step


def _fail_writing_shard(fault: dict) -> None:
    from actors.store.shards import record_rel
    from actors.store.storage import ActivationStore

    point = fault["point"]
    if point.startswith("planted_"):  # the planted source's shard records (its "hookpoint", default "planted")
        from actors.generate.planted import record_rel as planted_record_rel

        point = point.removeprefix("planted_")
        target = planted_record_rel(fault.get("hookpoint", "planted"), fault["shard"])
    else:
        target = record_rel(fault["shard"])
    write_json = ActivationStore.write_json

    def faulty_write_json(self, rel, obj):
        if rel == target and point == "files_written":
            _fire(fault)
        write_json(self, rel, obj)
        if rel == target and point == "committed":
            _fire(fault)

    ActivationStore.write_json = faulty_write_json
