"""Open an experiment's results the way a reader would: serve its MLflow store with `mlflow server` on 127.0.0.1,
load the URL `sae-seeds run` prints in headless Chromium, and check that the page is the runs table listing the
child runs (their names are in the rendered page). Optionally saves a screenshot.

    python scripts/check_mlflow_ui.py outputs/default [--screenshot ui.png] [--expect "topk k16 · 512 · seed 0"]

Needs Debian's `chromium` (apt-get install -y chromium); exits 2 without it, 1 when a check fails. Every process it
starts (the server's process group, the browser) is stopped by PID before it returns.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(backend_store_uri: str, workdir: Path):
    """`mlflow server` on a free loopback port (without its job-execution subsystem); yields its base URL."""
    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = str(Path(sys.executable).parent / "mlflow")
    log = open(workdir / "server.log", "wb")
    server = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", backend_store_uri],
                              cwd=workdir, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
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
                raise RuntimeError("mlflow server did not come up:\n" + (workdir / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: it and its workers
            server.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def render(url: str, workdir: Path, screenshot: Path | None = None, wait_ms: int = 20000,
           size: str = "1600,1000") -> str:
    """The page's DOM after its scripts ran for `wait_ms` of virtual time (and a screenshot, if asked)."""
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found (apt-get install -y chromium)")
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
                              f"--window-size={size}"]
    if screenshot is not None:
        subprocess.run([browser, *flags, f"--screenshot={screenshot.resolve()}", url],
                       capture_output=True, timeout=180, check=True)
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True)
    return dom.stdout


def check(dom: str, expected: list[str]) -> list[str]:
    """What is missing from the rendered runs table."""
    problems = [f"run {name!r} not shown" for name in expected if name not in dom]
    if "Overview" in dom and "Detect Issues" in dom and not expected:
        problems.append("the page is the GenAI overview, not the runs table")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="an experiment's output folder (holds mlflow.db)")
    parser.add_argument("--screenshot", type=Path, help="save a PNG of the page")
    parser.add_argument("--expect", action="append", default=[], help="a run name that must be shown (repeatable); "
                        "default: every child run of the experiment's latest parent run")
    args = parser.parse_args(argv)
    if chromium() is None:
        print("chromium not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from orchestrator.tracking import runs_table_url

    uri = f"sqlite:///{Path(args.output).resolve() / 'mlflow.db'}"
    client = MlflowClient(uri)
    [exp] = [e for e in client.search_experiments() if e.name.startswith("sae-seeds/")][:1] or [None]
    if exp is None:
        print(f"no sae-seeds experiment in {uri}", file=sys.stderr)
        return 1
    expected = args.expect
    if not expected:
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        expected = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as tmp, mlflow_server(uri, Path(tmp)) as base:
        url = runs_table_url(base, exp)
        print(url)
        problems = check(render(url, Path(tmp), args.screenshot), expected)
    for p in problems:
        print("FAIL:", p)
    if not problems:
        print(f"OK: the runs table shows the {len(expected)} child runs")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
