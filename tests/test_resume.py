"""Fault tolerance: a training worker killed mid-run resumes from its last training state and ends with the
weights of an uninterrupted run; a finished experiment is not trained again."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actors.store.checkpoint import METRICS, WEIGHTS, checkpoint_folder
from actors.train.train_state import read_training_state
from actors.train.training import train_saes
from orchestrator.config import ConfigError, load_config
from orchestrator.plan import plan_configurations
from orchestrator.stages import train as train_stage

from .conftest import REPO, TINY
from .fault_hooks import runtime_env
from .test_generate import DriverProcess
from .test_training import planted_data, settings, write_manifest

HOOKPOINT = "layers.0.mlp"
# Three architectures: BatchTopK keeps training state in buffers; ReLU+L1 with a target L0 is calibrated first.
ARCHS = [("topk", {"k": 4}), ("batchtopk", {"k": 4}), ("relu_l1", {"l1_coefficient": None, "target_l0": 6.0})]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), (a, key)


class Crash(Exception):
    pass


class Steps:
    """A progress bar (`progress(total)` gives it to the loop) that records the step count after each update and
    stops training (raises `Crash`) when it reaches `stop_at`."""

    def __init__(self, stop_at: int | None = None):
        self.seen, self.stop_at = [], stop_at

    def __call__(self, total: int) -> "Steps":
        return self

    def update(self, n: int) -> None:
        self.seen.append((self.seen[-1] if self.seen else 0) + n)
        if self.seen[-1] == self.stop_at:
            raise Crash

    def close(self) -> None:
        pass


def test_resume_in_process_is_bit_identical(tmp_path):
    """Without Ray: stop after 11 of 24 steps, resume from the state of step 8, compare with a run that never
    stopped (weights, digest, and the intermediate SAE saved after the resume point)."""
    x, _ = planted_data(3072)
    manifest = write_manifest(tmp_path / "acts", x, rows_per_shard=1024)
    # 24 batches of 256 rows; a state every 8 steps.
    hp = settings(tokens=6144, state_every_tokens=2048, checkpoint_tokens=[1024, 4096], train_hash="h")

    def jobs(out):
        return [{"configuration": arch, "architecture": arch, "params": params, "width": 32, "seed": seed,
                 "path": str(tmp_path / out / arch / f"seed{seed}" / HOOKPOINT), "run_id": None}
                for arch, params in ARCHS for seed in (0, 1)]

    reference = train_saes(jobs("ref"), manifest, HOOKPOINT, hp, torch.device("cpu"))

    states = {}

    def keep(folder, step):
        states[step] = shutil.copytree(folder, tmp_path / "states" / folder.name)

    with pytest.raises(Crash):
        train_saes(jobs("run"), manifest, HOOKPOINT, hp, torch.device("cpu"), save_state=keep, progress=Steps(11))
    assert sorted(states) == [8]
    resume = read_training_state(states[8], jobs("run"))
    steps = Steps()
    resumed = train_saes(jobs("run"), manifest, HOOKPOINT, hp, torch.device("cpu"), resume=resume, progress=steps)
    assert steps.seen == list(range(8, 25))  # continued at the data position of the state, not from the start
    for ref, res in zip(reference, resumed):
        assert res["data_digest"] == ref["data_digest"]
        assert res["metrics"]["resumed_from_tokens"] == 8 * 256 and ref["metrics"]["resumed_from_tokens"] == 0
        if ref["job"]["architecture"] == "relu_l1":  # the calibration came back with the state
            assert res["job"]["calibration"] == ref["job"]["calibration"]
            # and the L0 controller's state: it steered the coefficient after the resume point as it did before
            assert res["metrics"]["calibrated_l1_coefficient"] == ref["metrics"]["calibrated_l1_coefficient"]
            assert ref["metrics"]["calibrated_l1_coefficient"] != ref["metrics"]["initial_l1_coefficient"]
        assert_same_weights(Path(ref["job"]["path"]), Path(res["job"]["path"]))
        assert_same_weights(checkpoint_folder(ref["job"]["path"], 4096), checkpoint_folder(res["job"]["path"], 4096))
    # A state for other jobs is not used: training starts from the beginning.
    other = [j | {"seed": 5} for j in jobs("run")[:1]]

    steps = Steps(stop_at=1)
    with pytest.raises(Crash):
        train_saes(other, manifest, HOOKPOINT, hp, torch.device("cpu"),
                   resume={other[0]["path"]: resume[other[0]["path"]]}, progress=steps)
    assert steps.seen == [1]


def test_state_every_tokens_is_validated():
    with pytest.raises(ConfigError, match="state_every_tokens"):
        load_config(TINY, ["train.state_every_tokens=100"])  # below one batch of 256
    with pytest.raises(ConfigError, match="max_failures"):
        load_config(TINY, ["train.max_failures=-2"])


def _experiment(tmp_path, name, x):
    """tiny.yaml's training on a planted synthetic manifest: 2 workers, 3 configurations x 2 seeds, 24 steps."""
    cfg = load_config(TINY, [
        "sae.architectures=[{name: topk, k: 4}, {name: batchtopk, k: 4}, {name: relu_l1, target_l0: 6}]",
        "sae.widths=[32]", "sae.seeds=[0,1]", "train.tokens=6144", "train.state_every_tokens=2048",
        "train.checkpoint_tokens=[1024,4096]", "train.lm_eval_chunks=0", "train.num_workers=2",
        "train.max_failures=3"], str(tmp_path / name))
    manifest = write_manifest(cfg.output_path / "activations", x, rows_per_shard=1024, hookpoint=HOOKPOINT)
    manifest["config_hash"] = "planted"
    (cfg.output_path / "activations" / "manifest.json").write_text(json.dumps(manifest))
    return cfg, manifest, plan_configurations(cfg, [HOOKPOINT])


def _train_driver(cfg, address: str, fault: dict) -> DriverProcess:
    """run_train of `cfg` (on the manifest `_experiment` wrote) in a driver subprocess joined to the test's Ray
    instance, with `fault` installed in its workers by tests/fault_hooks.py; its stderr in <output>-driver.log."""
    code = ("import json, sys, ray\n"
            "from orchestrator.config import parse_config\n"
            "from orchestrator.plan import plan_configurations\n"
            "from orchestrator.stages.train import run_train\n"
            "ray.init(address=sys.argv[1], runtime_env=json.loads(sys.argv[2]), log_to_driver=False)\n"
            "cfg = parse_config(json.loads(sys.stdin.read()))\n"
            "manifest = json.loads((cfg.output_path / 'activations' / 'manifest.json').read_text())\n"
            "run_train(cfg, manifest, plan_configurations(cfg, [sys.argv[3]]), None)\n")
    proc = DriverProcess([sys.executable, "-c", code, address, json.dumps(runtime_env(fault, str(REPO))), HOOKPOINT],
                         cfg.output_path.with_name(cfg.output_path.name + "-driver.log"), cwd=REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=os.environ | {"PYTHONPATH": str(REPO)})
    proc.stdin.write(json.dumps(cfg.model_dump(mode="json")))
    proc.stdin.close()
    return proc


@pytest.mark.slow  # kill-and-resume (~1.5 min): run by CI's slow set (scripts/test.sh -m slow)
def test_worker_killed_mid_training_resumes_to_identical_weights(ray_local, tmp_path, monkeypatch):
    x, _ = planted_data(3072, seed=3)
    # The uninterrupted reference, in this process (one torch thread, as in the workers): each SAE's training is
    # independent of which worker runs it and of the other SAEs there.
    cfg, manifest, configurations = _experiment(tmp_path, "reference", x)
    reference = train_saes([j for c in configurations for j in c.jobs()], manifest, HOOKPOINT,
                           train_stage.train_settings(cfg, manifest), torch.device("cpu"))

    cfg, manifest, configurations = _experiment(tmp_path, "killed", x)
    marker = tmp_path / "killed-once"
    # SIGKILL a worker after 11 of 24 steps, once the state of step 8 is committed (tests/fault_hooks.py).
    proc = _train_driver(cfg, ray_local.get_runtime_context().gcs_address,
                         {"point": "train_step", "after_steps": 11, "marker": str(marker)})
    assert proc.wait(timeout=600) == 0, proc.log_tail()
    assert marker.exists()  # the fault did fire
    killed = json.loads(train_stage.train_manifest_path(cfg).read_text())
    for sae in killed["saes"]:
        sae["path"] = str(cfg.output_path / sae["path"])

    assert len(killed["saes"]) == len(reference) == 6
    # Every worker resumed from one state (the group restarts together), not from scratch. Normally that of step 8;
    # a later one if Ray restarted the group once more (Ray's placement-group cleaner can misjudge the controller
    # dead on a busy machine and tear a live group down; max_failures absorbs that).
    resumed = {s["metrics"]["resumed_from_tokens"] for s in killed["saes"]}
    assert len(resumed) == 1 and 8 * 256 <= resumed.pop() <= 24 * 256
    for ref, res in zip(reference, killed["saes"]):
        assert (res["configuration"], res["seed"]) == (ref["job"]["configuration"], ref["job"]["seed"])
        assert res["data_digest"] == ref["data_digest"] and ref["metrics"]["resumed_from_tokens"] == 0
        assert_same_weights(Path(ref["job"]["path"]), Path(res["path"]))
        for tokens in cfg.train.checkpoint_tokens:
            assert_same_weights(checkpoint_folder(ref["job"]["path"], tokens), checkpoint_folder(res["path"], tokens))

    # Re-running the finished experiment trains nothing.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished experiment was trained again")

    monkeypatch.setattr(train_stage, "SAETrainer", no_training)
    saes = [Path(s["path"]) for s in killed["saes"]]
    mtimes = {p: (p / WEIGHTS).stat().st_mtime_ns for p in saes}
    again = train_stage.run_train(cfg, manifest, configurations, None)
    assert {p: (p / WEIGHTS).stat().st_mtime_ns for p in saes} == mtimes
    assert [s["metrics"] for s in again["saes"]] == [json.loads((p / METRICS).read_text()) for p in saes]
