"""Fault injection for the resumption tests, installed in Ray workers from outside the production code.

`install` is a Ray `worker_process_setup_hook`: with $SAE_SEEDS_FAULT = {"point", "shard", "action": "exit"|"hang",
"marker"} it wraps `ActivationStore.write_json` in that worker so that, once (the marker file records it), the
process dies or hangs at that point of that shard: "files_written" is just before the shard's record is written
(its Parquet files are complete, it is not committed), "committed" is just after; "planted_files_written" and
"planted_committed" are the same points of the planted source's shards.
"""

import json
import os
import time

FAULT_ENV = "SAE_SEEDS_FAULT"


def _fire(fault: dict) -> None:
    try:  # fire once: the restarted actor must get through
        fd = os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    if fault["action"] == "exit":
        os._exit(1)
    time.sleep(3600)  # the test kills the driver meanwhile; Ray reaps this worker with the job


def install() -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    from actors.store.shards import record_rel
    from actors.store.storage import ActivationStore

    fault = json.loads(spec)
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
