"""The console: one progress line per stage fed by Ray workers, and a quiet run's output."""

from __future__ import annotations

import io
import re

import pytest

import ray
from tqdm.auto import tqdm

from actors.progress import RemoteProgress
from orchestrator import console


@ray.remote(num_cpus=0.5)
def work(counter, steps: int) -> int:
    bar = RemoteProgress(counter, steps, interval_s=0.0)
    for _ in range(steps):
        bar.update(1)
    bar.close()
    return steps


def test_stage_progress_sums_every_workers_steps(ray_local, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(console, "tqdm", lambda **kw: tqdm(file=out, **kw))
    with console.stage_progress("train", "step", poll_s=0.05) as counter:
        assert ray.get([work.remote(counter, n) for n in (3, 5, 7)]) == [3, 5, 7]
    final = out.getvalue().split("\r")[-1]
    assert re.search(r"\b15/15\b", final), final


def test_gather_returns_results_in_order_and_counts_them(ray_local, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(console, "tqdm", lambda **kw: tqdm(file=out, **kw))

    @ray.remote(num_cpus=0.5)
    def square(x):
        return x * x

    assert console.gather([square.remote(i) for i in range(6)], "compare", "pair") == [0, 1, 4, 9, 16, 25]
    assert re.search(r"\b6/6\b", out.getvalue().split("\r")[-1])


RAY_INFO_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*(\(\w+ pid=\d+\)\s*)?(\d{4}-\d\d-\d\d[ T][\d:,.]+\s+INFO\b|\[[^\]]* I \d+ \d+\])")
FORWARDED_BAR = re.compile(r"\(\w*\s*pid=\d+\).*\d+%\|")
STATUS_BLOCK = re.compile(r"Running Dataset|Total Progress|Active & requested resources|Execution plan of Dataset")


@pytest.mark.slow  # a whole CLI run in a subprocess (~2 min): run by CI's slow set (scripts/test.sh -m slow)
def test_a_quiet_run_prints_progress_lines_and_the_summary(tmp_path):
    """The CLI at default verbosity: no Ray INFO lines, no Ray Data status blocks, no worker progress bars
    forwarded through Ray's logs, a few dozen lines in all; --verbose brings Ray's own lines back."""
    import subprocess
    import sys

    from .conftest import REPO, TINY

    args = [sys.executable, "-m", "orchestrator", "run", str(TINY), "--output", str(tmp_path / "out"),
            "--set", "sae.architectures=[{name: topk, k: 4}]", "--set", "sae.widths=[64]",
            "--set", "sae.seeds=[0,1]", "--set", "train.checkpoint_tokens=[]", "--set", "generate.num_tokens=8192"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    lines = [line for line in output.split("\n") if line.strip()]
    redraws = [part for line in lines for part in line.split("\r") if part.strip()]
    assert not [p for p in redraws if RAY_INFO_LINE.search(p)], "\n".join(p for p in redraws if RAY_INFO_LINE.search(p))
    assert not [p for p in redraws if STATUS_BLOCK.search(p)]
    assert not [p for p in redraws if FORWARDED_BAR.search(p)]
    assert len(lines) <= 40, f"{len(lines)} lines:\n" + "\n".join(lines)
    for stage in ("generate", "train", "compare"):
        assert any(p.startswith(stage) for p in redraws), f"no progress line for {stage}"
    assert "stage wall time" in output and "MLflow" in output
