"""A real Ray cluster on this machine for tests: a head and named worker nodes, started and stopped by PID.

Every node is a `ray start --block` process group (never `ray stop`, which would stop every Ray instance on the
machine), and every port is chosen here: another Ray instance on this machine (such as the session's
`ray_local` fixture, whose dashboard agent holds Ray's default port 52365) must not keep a node's agents
from starting.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .conftest import REPO

BIN = Path(sys.executable).parent


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
        with open(self.temp / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                 "--object-store-memory=100000000", f"--temp-dir={self.temp / name}", *ports, *args],
                env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def start_head(self, num_cpus: int = 0) -> None:
        """The head; with the default `num_cpus=0` no task or actor is scheduled on it."""
        self._start("head", ["--head", f"--num-cpus={num_cpus}", f"--port={self.gcs}", "--dashboard-host=127.0.0.1",
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
            exited = [name for name, p in self.procs.items() if p.poll() is not None]
            if exited:
                tail = (self.temp / f"{exited[0]}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} did not come up: `ray start` of {exited} exited; {exited[0]}'s output:\n"
                                   f"{tail}")
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")
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

    def submit(self, entrypoint: list[str], *job_args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit` with the repository as working dir; waits for the job unless `--no-wait` is given.

        The dashboard answers before the head's job agent has registered; until then a submission is refused
        (and no job is created), so a refused one is sent again for up to two minutes.
        """
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.url, "--working-dir", str(REPO), *job_args,
               "--", *entrypoint]
        deadline = time.time() + 120
        while True:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
            if "No available agent to submit job" not in proc.stdout + proc.stderr or time.time() > deadline:
                return proc
            time.sleep(3)
