"""A real multi-node Ray cluster on this machine: a head that runs no work and two worker nodes.

Every node is a `ray start --block` process group that the test starts and stops by PID (never `ray stop`,
which would stop every Ray instance on the machine). The tiny experiment is submitted with `ray job submit`;
the node ids recorded in the activation manifest and in each SAE's metrics show where the work ran. A worker
node is then killed in the middle of a run and replaced, and the job re-submitted until it succeeds: the
outputs must come out complete, with nothing lost or duplicated.
"""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import REPO

BIN = Path(sys.executable).parent
HOOKPOINT = "gpt_neox.layers.0.mlp"
# Two architectures x one width x two seeds; two model actors so that generation can use both workers.
OVERRIDES = ["--set", "sae.widths=[64]", "--set", "sae.seeds=[0,1]", "--set", "generate.num_actors=2",
             "--set", "train.num_workers=2"]
EXPECTED_SAES = 2 * 1 * 2


T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)  # shown by pytest when a test fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head (num-cpus 0) and named worker nodes, each its own process group, all on 127.0.0.1."""

    def __init__(self):
        # Jobs log to the SQLite store in their output folder and join only this cluster.
        inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
        self.env = inherited | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                                # A killed node is declared dead after ~3 s instead of ~15 s.
                                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[str, str] = {}  # every node ever alive: name -> Ray node id
        # One temp dir per node: nodes sharing one would share (and re-extract) the job's working_dir under
        # the driver's feet. Short, because Ray's unix socket paths live inside it.
        self.temp = Path(tempfile.mkdtemp(prefix="sae-mn-", dir="/tmp"))
        self.gcs = free_port()
        self.url = f"http://127.0.0.1:{free_port()}"

    def _start(self, name: str, args: list[str]) -> None:
        # Every port chosen here, so that nodes on one host (and other clusters on it) never collide.
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        self.procs[name] = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             "--object-store-memory=100000000", f"--temp-dir={self.temp / name}", *ports, *args],
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_head(self) -> None:
        self._start("head", ["--head", "--num-cpus=0", f"--port={self.gcs}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.url.rsplit(':', 1)[1]}"])
        self._wait(lambda: urllib.request.urlopen(f"{self.url}/api/version", timeout=2), "the head")

    def start_workers(self, *names: str, wait: bool = True) -> None:
        for name in names:
            # One CPU each, so that two training workers (or two pair-matching tasks) need two nodes. A custom
            # resource named after the worker ties Ray's node id to the process group started here.
            self._start(name, [f"--address=127.0.0.1:{self.gcs}", "--num-cpus=1",
                               f"--resources={json.dumps({name: 1})}"])
        if wait:
            self.wait_for_workers(*names)

    def wait_for_workers(self, *names: str) -> None:
        self._wait(lambda: set(names) <= set(self.node_ids()), f"workers {names}")

    def _wait(self, probe, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if probe():
                    return
            except Exception:  # not answering yet
                pass
            if time.time() > deadline or any(p.poll() is not None for p in self.procs.values()):
                raise RuntimeError(f"{what} did not come up")
            time.sleep(1)

    def node_ids(self) -> dict[str, str]:
        """Alive nodes: name given here ("head" or the worker's name) -> Ray node id."""
        from ray.util.state import list_nodes

        names = {}
        for n in list_nodes(address=self.url, raise_on_missing_output=False):
            if n.state != "ALIVE":
                continue
            if n.is_head_node:
                names["head"] = n.node_id
            names |= {r: n.node_id for r in n.resources_total if r in self.procs}
        self.seen |= names
        return names

    def kill(self, name: str) -> None:
        """A node crash: SIGKILL to the node's whole process group."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Stop every job and node started here, and only those, then remove the nodes' temp dirs.

        Job drivers run in sessions of their own, so an unfinished job is stopped through the job API first.
        Each node's process group gets SIGTERM and, after a short grace (a head takes ~30 s to stop on its
        own), SIGKILL. Last, any process still working inside this cluster's temp dir is killed by PID.
        """
        if "head" in self.procs:
            try:
                from ray.job_submission import JobSubmissionClient

                client = JobSubmissionClient(self.url)
                running = [j.submission_id for j in client.list_jobs() if not j.status.is_terminal()]
                for job in running:
                    client.stop_job(job)
                deadline = time.time() + 30
                while running and time.time() < deadline:
                    running = [j for j in running if not client.get_job_status(j).is_terminal()]
                    time.sleep(1)
            except Exception as err:  # the head may be gone already; the sweep below still runs
                print(f"stopping jobs: {err!r}")
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there
            except ProcessLookupError:
                pass
            proc.wait()
        self.procs.clear()
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """Processes whose working directory or command line lies in this cluster's temp dir."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cwd.startswith(str(self.temp)) or str(self.temp) in cmdline:
                found.append(int(entry.name))
        return found

    def submit(self, out: Path, *job_args: str, overrides: list[str] = ()) -> subprocess.CompletedProcess:
        """`ray job submit` of the tiny experiment; waits for it to end unless `--no-wait` is in job_args."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.url, "--working-dir", str(REPO),
               *job_args, "--", sys.executable, "-m", "orchestrator", "run", "configs/tiny.yaml",
               "--output", str(out), *OVERRIDES, *overrides]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start_head()
        c.start_workers("w1", "w2")
        yield c
    finally:
        c.stop()


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
    folders = sorted(str(p.parent) for p in (out / "saes").rglob("metrics.json")
                     if not any(part.endswith(".tmp") for part in p.parts))
    assert folders == sorted(s["path"] for s in saes)  # one complete folder per SAE, no other
    for s in saes:
        assert (Path(s["path"]) / "sae.safetensors").is_file()

    assert (out / "overlap" / "pairs.parquet").is_file() and (out / "overlap" / "nway.parquet").is_file()
    assert len(list((out / "overlap" / "assignments").rglob("*.parquet"))) == 2  # one seed pair per config
    return manifest, saes


def check_mlflow(out: Path) -> None:
    """The last parent run of the experiment and its children finished."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "tiny"]
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
    proc = cluster.submit(out)
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
    proc = cluster.submit(out, "--no-wait", "--submission-id", "killed", overrides=longer)
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
    trained_before = len(list((out / "saes").rglob("metrics.json")))
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
        proc = cluster.submit(out, overrides=longer)
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
