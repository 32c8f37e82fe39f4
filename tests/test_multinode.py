"""A real multi-node Ray cluster on this machine: a head that runs no work and two worker nodes.

The cluster (`tests/ray_cluster.py`) is started and stopped by PID. The tiny experiment is submitted with `ray job submit`;
the node ids recorded in the activation manifest and in each SAE's metrics show where the work ran. A worker
node is then killed in the middle of a run and replaced, and the job re-submitted until it succeeds: the
outputs must come out complete, with nothing lost or duplicated.
"""

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .ray_cluster import LocalCluster

# Minutes of cluster start-up and two full runs: outside the default suite, run by CI (`bash scripts/test.sh -m slow`).
pytestmark = pytest.mark.slow

HOOKPOINT = "gpt_neox.layers.0.mlp"
# Two architectures x one width x two seeds; two model actors so that generation can use both workers.
OVERRIDES = ["--set", "sae.widths=[64]", "--set", "sae.seeds=[0,1]", "--set", "generate.num_actors=2",
             "--set", "train.num_workers=2"]
EXPECTED_SAES = 2 * 1 * 2


T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)  # shown by pytest when a test fails


def submit(cluster: LocalCluster, out: Path, *job_args: str, overrides: list[str] = ()) -> subprocess.CompletedProcess:
    """`ray job submit` of the tiny experiment; waits for it to end unless `--no-wait` is in job_args."""
    return cluster.submit([sys.executable, "-m", "orchestrator", "run", "configs/tiny.yaml", "--output", str(out),
                           *OVERRIDES, *overrides], *job_args)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start_head()
        c.start_workers("w1", "w2")
        yield c
    finally:
        c.stop()


def final_metrics(out: Path) -> list[Path]:
    """metrics.json of every complete final SAE folder (not temporary, not an intermediate checkpoint)."""
    return [p for p in (out / "saes").rglob("metrics.json")
            if not any(part.endswith(".tmp") or part == "checkpoints" for part in p.relative_to(out).parts)]


def check_outputs(out: Path) -> tuple[dict, list[dict]]:
    """Complete results, nothing missing or duplicated; returns the activation manifest and the SAEs."""
    manifest = json.loads((out / "activations" / "manifest.json").read_text())
    entry = manifest["hookpoints"][HOOKPOINT]
    assert entry["rows"] == manifest["num_tokens"] == sum(s["rows"] for s in entry["shards"])
    ids = [s["shard_id"] for s in entry["shards"]]
    assert ids == list(range(16384 // 4096)), ids  # every planned shard (tiny.yaml's shard_tokens) once
    on_disk = sorted(p.relative_to(out / "activations").as_posix()
                     for p in (out / "activations" / HOOKPOINT).glob("shard-*.parquet"))
    assert on_disk == sorted(s["path"] for s in entry["shards"])  # no missing, extra or duplicate shard file

    saes = json.loads((out / "saes" / "manifest.json").read_text())["saes"]
    assert len(saes) == EXPECTED_SAES
    assert len({s["path"] for s in saes}) == EXPECTED_SAES
    folders = sorted(str(p.parent) for p in final_metrics(out))
    assert folders == sorted(str(out / s["path"]) for s in saes)  # one complete folder per SAE, no other
    for s in saes:
        assert (out / s["path"] / "sae.safetensors").is_file()

    assert (out / "overlap" / "pairs.parquet").is_file() and (out / "overlap" / "nway.parquet").is_file()
    assert len(list((out / "overlap" / "assignments").rglob("*.parquet"))) == 2  # one seed pair per config
    return manifest, saes


def check_mlflow(out: Path) -> None:
    """The last parent run of the experiment and its children finished."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "sae-seeds/tiny"]
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == EXPECTED_SAES
    assert all(r.info.status == "FINISHED" and "fvu" in r.data.metrics for r in children)


def test_job_runs_on_several_worker_nodes(cluster, tmp_path):
    out = tmp_path / "out"
    log("submitting")
    proc = submit(cluster, out)
    log(f"job ended: {proc.returncode}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    manifest, saes = check_outputs(out)
    check_mlflow(out)

    workers = {cluster.node_ids()[n] for n in ("w1", "w2")}
    shard_nodes = {s["node_id"] for s in manifest["hookpoints"][HOOKPOINT]["shards"]}
    train_nodes = {s["metrics"]["node_id"] for s in saes}
    used = shard_nodes | train_nodes
    names = {node: name for name, node in cluster.node_ids().items()}
    log(f"shards written on {sorted(names.get(n, n) for n in shard_nodes)}, "
        f"SAEs trained on {sorted(names.get(n, n) for n in train_nodes)}")
    assert used <= workers, "work landed on the head or on an unknown node"
    assert len(used) >= 2, f"all work ran on one node: shards {shard_nodes}, training {train_nodes}"


def training_has_logged(out: Path) -> bool:
    """True once a training worker has logged a `train/` metric; read-only, so it never creates the store."""
    db = out / "mlflow.db"
    if not db.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM metrics WHERE key LIKE 'train/%'").fetchone()[0] > 0
    except sqlite3.Error:  # tables not created yet, or a writer holds the lock
        return False


def test_killed_worker_node_is_replaced_and_resubmission_completes(cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    out = tmp_path / "out"
    jobs = JobSubmissionClient(cluster.url)
    # Eight times the default training tokens keep each training worker busy for several seconds: the window
    # in which its node is killed.
    longer = ["--set", "train.tokens=131072"]
    proc = submit(cluster, out, "--no-wait", "--submission-id", "killed", overrides=longer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log("submitted the job that loses a node")

    deadline = time.time() + 300
    while not training_has_logged(out):
        assert not jobs.get_job_status("killed").is_terminal(), jobs.get_job_logs("killed")[-3000:]
        assert time.time() < deadline
        time.sleep(0.5)
    workers = list_actors(address=cluster.url, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                          raise_on_missing_output=False)
    names = {node: name for name, node in cluster.node_ids().items()}
    victim = names[workers[0].node_id]
    assert victim != "head"
    trained_before = len(final_metrics(out))
    assert jobs.get_job_status("killed") == JobStatus.RUNNING and trained_before < EXPECTED_SAES
    cluster.kill(victim)  # the node dies in the middle of training
    log(f"killed {victim} with {trained_before} of {EXPECTED_SAES} SAEs trained")
    cluster.start_workers("w3", wait=False)  # a fresh node joins while Ray notices the loss

    while not jobs.get_job_status("killed").is_terminal():
        assert time.time() < deadline
        time.sleep(1)
    status = jobs.get_job_status("killed")
    log(f"first attempt: {status}")
    cluster.wait_for_workers("w3")
    assert victim not in cluster.node_ids()
    # Configurations finished by the first attempt (by the surviving worker) must be reused, not trained again;
    # one with a seed missing is retrained whole.
    survivors = {}
    for label in (out / "saes").iterdir() if (out / "saes").is_dir() else []:
        folders = [label / f"seed{seed}" / HOOKPOINT for seed in (0, 1)]
        if all((f / "metrics.json").is_file() for f in folders):
            survivors |= {f / "sae.safetensors": (f / "sae.safetensors").stat().st_mtime_ns for f in folders}
    for _ in range(2):  # at most two re-submissions of the same command, same output folder
        if status == JobStatus.SUCCEEDED:
            break
        proc = submit(cluster, out, overrides=longer)
        status = JobStatus.SUCCEEDED if proc.returncode == 0 else JobStatus.FAILED
        log(f"re-submission: {status}")
    assert status == JobStatus.SUCCEEDED, proc.stdout[-3000:] + proc.stderr[-3000:]

    manifest, saes = check_outputs(out)
    check_mlflow(out)
    assert {p: p.stat().st_mtime_ns for p in survivors} == survivors
    by_conf: dict[str, set] = {}
    for s in saes:
        by_conf.setdefault(s["configuration"], set()).add(s["data_digest"])
    assert all(len(d) == 1 for d in by_conf.values())  # seeds of a configuration still saw the same batches
    recorded = {s["node_id"] for s in manifest["hookpoints"][HOOKPOINT]["shards"]}
    recorded |= {s["metrics"]["node_id"] for s in saes}
    assert recorded <= {node for name, node in cluster.seen.items() if name != "head"}
    leftovers = [p.relative_to(out) for p in out.rglob("*.tmp")]
    log(f"{len(survivors)} SAEs reused, temporary files left by the kill (never read): {leftovers}")
