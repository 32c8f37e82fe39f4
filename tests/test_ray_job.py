"""`ray job submit` of a tiny experiment to a head node started (and stopped, by PID) by the test."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import REPO

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    # The job's `python` must be this environment's, as it is for a user with the venv activated.
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    gcs, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--object-store-memory=200000000",
         "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError("Ray head did not come up")
                time.sleep(1)
        yield url, env
    finally:
        # Stop only what this test started: the head's process group.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def test_ray_job_submit_runs_the_experiment(ray_head, tmp_path):
    url, env = ray_head
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
           "python", "-m", "orchestrator", "run", "configs/tiny.yaml", "--output", str(out),
           "--set", "sae.widths=[64]", "--set", "sae.seeds=[0,1]"]
    # The dashboard answers before the head's job agent is up; until then a submission is refused (and no job
    # is created), so a refused one is sent again for up to a minute.
    deadline = time.time() + 60
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in proc.stderr + proc.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    saes = json.loads((out / "saes" / "manifest.json").read_text())["saes"]
    assert len(saes) == 2 * 2  # two architectures x one width x two seeds
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "tiny"]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 + 4 and all(r.info.status == "FINISHED" for r in runs)
