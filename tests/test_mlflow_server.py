"""The pipeline against a real `mlflow server` (SQLite backend, artifacts proxied by the server), started and
stopped by PID by the test; and many writers logging to one parent's child runs through it at once."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.pipeline import run_experiment

from .conftest import TINY

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    # Without the job-execution subsystem the server is 2 worker processes (~0.5 GB) instead of ~10.
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "2",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("mlflow server did not come up:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url, root
    finally:
        # Stop only what this test started: the server's process group (gunicorn/uvicorn and its workers).
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        try:
            os.killpg(server.pid, signal.SIGKILL)  # any worker that outlived the leader
        except ProcessLookupError:
            pass
        log.close()


def test_pipeline_logs_runs_metrics_and_figures_to_the_server(ray_local, mlflow_server, tmp_path, monkeypatch):
    url, root = mlflow_server
    # The config names the server; whatever MLFLOW_TRACKING_URI holds is restored afterwards.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    cfg = load_config(TINY, ["sae.widths=[64]", "sae.seeds=[0,1]", f"tracking.tracking_uri={url}"], str(out))
    result = run_experiment(cfg)
    assert result["tracking_uri"] == url
    assert not (out / "mlflow.db").exists()  # nothing was logged to a local store

    client = MlflowClient(url)
    exp = client.get_experiment(result["experiment_id"])
    assert exp.name == "sae-seeds/tiny" and exp.artifact_location.startswith("mlflow-artifacts:")
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {"pipeline.seconds.generate", "pipeline.seconds.train", "pipeline.seconds.compare"} <= set(parent.data.metrics)
    assert result["ui_url"] == f"{url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" \
        "&viewStateShareKey=sae_seeds_results"
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 * 1 * 2  # two architectures x one width x two seeds
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"fvu", "l0", "dead_fraction", "mean_shared_fraction"} <= set(run.data.metrics)
        assert {"architecture", "width", "seed"} <= set(run.data.params)
        # Curves logged by the Ray Train worker, through the server.
        assert len(client.get_metric_history(run.info.run_id, "train/fvu")) >= 2

    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/shared_vs_width.png" in figures
    assert sum(p.startswith("figures/heatmap_") for p in figures) == 2
    tables = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert {"tables/pairs.json", "tables/nway.json"} <= tables
    # Downloaded through the server's artifact proxy; stored under --artifacts-destination.
    png = Path(client.download_artifacts(parent.info.run_id, "figures/shared_vs_width.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((root / "artifacts").rglob("shared_vs_width.png"))
    pairs = Path(client.download_artifacts(parent.info.run_id, "tables/pairs.json", str(tmp_path)))
    pairs = json.loads(pairs.read_text())
    assert len(pairs["data"]) == 2  # one seed pair per configuration


def test_concurrent_writers_to_child_runs(mlflow_server):
    url, _ = mlflow_server
    n_writers, steps = 16, 25
    client = MlflowClient(url)
    exp = client.create_experiment("concurrent-writers")
    parent = client.create_run(exp, run_name="parent").info.run_id
    children = [client.create_run(exp, run_name=f"child{i}", tags={"mlflow.parentRunId": parent}).info.run_id
                for i in range(n_writers)]
    start = threading.Barrier(n_writers)

    def write(i: int) -> None:
        own = MlflowClient(url)  # one client per writer, as in separate Ray workers
        start.wait()  # all writers hit the server at once
        for step in range(steps):
            own.log_metric(children[i], "loss", i * 1000.0 + step, step=step)
        own.log_batch(children[i], metrics=[Metric(f"final.{k}", float(i), int(time.time() * 1000), 0)
                                            for k in ("fvu", "l0", "dead_fraction")])
        own.set_terminated(children[i])

    with ThreadPoolExecutor(n_writers) as pool:
        list(pool.map(write, range(n_writers)))  # re-raises the first error of any writer

    found = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    assert sorted(r.info.run_id for r in found) == sorted(children)
    for i, run_id in enumerate(children):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics == {"loss": i * 1000.0 + steps - 1, "final.fvu": i, "final.l0": i,
                                    "final.dead_fraction": i}
        history = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(s, i * 1000.0 + s) for s in range(steps)]
