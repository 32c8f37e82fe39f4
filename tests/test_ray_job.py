"""`ray job submit` of a tiny experiment to a head node started (and stopped, by PID) by the test."""

import json
import sys

import pytest
from mlflow.tracking import MlflowClient

from .ray_cluster import LocalCluster

# A Ray head start-up and a full run through the job server: outside the default suite, run by CI (-m slow).
pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    # A single node that runs the work itself, as `ray start --head` on a workstation does.
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=4)
        yield cluster
    finally:
        cluster.stop()


def test_ray_job_submit_runs_the_experiment(ray_head, tmp_path):
    out = tmp_path / "out"
    proc = ray_head.submit([sys.executable, "-m", "orchestrator", "run", "configs/tiny.yaml", "--output", str(out),
                            "--set", "sae.widths=[64]", "--set", "sae.seeds=[0,1]"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    saes = json.loads((out / "saes" / "manifest.json").read_text())["saes"]
    assert len(saes) == 2 * 2  # two architectures x one width x two seeds
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "sae-seeds/tiny"]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 + 4 and all(r.info.status == "FINISHED" for r in runs)
