"""Peak memory of the generate stage's token path at one token budget, in a fresh process (used by
tests/test_tokenize.py and benchmarks/packing.py).

    python -m tests.memory_probe plan  FOLDER NUM_TOKENS   # tokenise + pack + plan (the driver's work)
    python -m tests.memory_probe actor FOLDER NUM_TOKENS   # one model actor computing the plan's last shard

Prints one JSON line, in bytes: `baseline_rss` (after imports and the model build, before the measured work),
`peak_rss` (the process's peak, `getrusage`: imports included) and `work_peak_rss` (the peak during the measured
work alone: the kernel's high-water mark is reset before it, through /proc/self/clear_refs); and `seconds`. Without Ray
the tokenising tasks run in this process, so `plan` counts a task's memory together with the driver's.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

TINY = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 256}


def probe_config(folder: Path, num_tokens: int):
    from orchestrator.config import parse_config

    return parse_config({
        "name": "memory", "output_dir": str(folder), "model": {"build": TINY},
        "generate": {"hookpoints": ["layers.0.mlp"], "ctx_len": 128, "num_tokens": num_tokens,
                     "shard_tokens": 65536, "batch_size": 16, "num_actors": 1},
        "sae": {"architectures": [{"name": "topk", "k": 2}], "widths": [32], "seeds": [0]},
        "train": {"batch_size": 64},
    })


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def current_rss() -> int:
    return _status("VmRSS")


def reset_peak() -> int:
    """Reset the process's resident high-water mark (VmHWM) to its current RSS; returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return current_rss()


def main(mode: str, folder: str, num_tokens: int) -> dict:
    from actors.generate.activations import ActivationShardWriter
    from actors.generate.models import build_local_model
    from actors.store.storage import ActivationStore
    from orchestrator.stages.generate import _load_plan, activation_uri

    cfg = probe_config(Path(folder), num_tokens)
    model = str(build_local_model(cfg.model.build, cfg.model.init_seed, cfg.output_path / "model"))
    store = ActivationStore(activation_uri(cfg))
    if mode == "actor":
        plan = store.read_json("plan.json")  # written by a `plan` probe on the same folder
        writer = ActivationShardWriter(model, None, "float32", False, None, cfg.generate.hookpoints, store.uri,
                                       "float32", cfg.generate.batch_size, "fail", plan["plan_hash"],
                                       torch_threads=1, token_files=plan["token_files"])
        shard = plan["shards"][-1]
        baseline, t = reset_peak(), time.perf_counter()
        writer.write_shard(shard["shard_id"], shard["start"], shard["stop"])
    else:
        baseline, t = reset_peak(), time.perf_counter()
        plan = _load_plan(cfg, store, model, None)
    seconds = time.perf_counter() - t
    return {"mode": mode, "num_tokens": plan["num_chunks"] * plan["ctx_len"], "baseline_rss": baseline,
            "work_peak_rss": _status("VmHWM"), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
