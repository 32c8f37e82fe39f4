"""Generate-stage benchmark: tokens/s of the whole stage against a bare loop of forward passes.

    python benchmarks/generate.py                  # 4-layer GPT-2-style model (d 256), 393,216 tokens, 3 repeats
    python benchmarks/generate.py --tokens 65536 --repeats 1

In one run on one machine, alternating, `--repeats` times each:
  bare     `model(input_ids)` over the same token batches, in this process, torch using every core;
  stage    `run_generate` on a local Ray instance (Ray Data actor pool of one actor with every core, forward
           hooks, Parquet writes, checksums, records), hookpoint = the last block (no early stop to gain);
  stage-mid  the same with the hookpoint in the middle of the model (the forward stops there).
Stage tokens/s is taken over the compute phase (actor pool start, model load and every shard; tokenising and
planning excluded), over the whole stage call, and over the shards alone (the sum of the shards' own times:
the steady state, without the fixed cost of starting the actor pool). Ratios are medians of stage / median bare.
Also printed: bytes written per token and per hookpoint, and the actor's peak RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def config(out: Path, args, hookpoint: str):
    from orchestrator.config import parse_config

    return parse_config({
        "name": "bench-generate", "output_dir": str(out),
        "model": {"build": {"model_type": "gpt2", "n_embd": args.hidden, "n_layer": args.layers,
                            "n_head": args.hidden // 64, "n_positions": args.ctx_len}},
        "generate": {"hookpoints": [hookpoint], "ctx_len": args.ctx_len, "num_tokens": args.tokens,
                     "shard_tokens": args.shard_tokens, "batch_size": args.batch_size, "num_actors": 1,
                     "cpus_per_actor": args.cpus},
        "sae": {"architectures": [{"name": "topk", "k": 4}], "widths": [64], "seeds": [0]},
    })


def bare_loop(model_folder: Path, activations: Path, batch_size: int) -> float:
    """Seconds for forward passes over every batch of the stage's token chunks, nothing else."""
    from actors.generate.models import load_model
    from actors.store.storage import ActivationStore
    from actors.store.tokens import read_chunks

    model = load_model(str(model_folder), None, "float32", False, "cpu")
    store = ActivationStore(activations)
    plan = store.read_json("plan.json")
    ids = torch.from_numpy(read_chunks(store, plan["token_files"], 0, plan["num_chunks"]))
    with torch.inference_mode():
        model(ids[:batch_size])  # warm-up, like the stage's first batch
        t = time.perf_counter()
        for i in range(0, len(ids), batch_size):
            model(ids[i:i + batch_size])
        return time.perf_counter() - t


def stage(out: Path, args, hookpoint: str) -> dict:
    from orchestrator.stages.generate import run_generate

    cfg = config(out, args, hookpoint)
    t = time.perf_counter()
    manifest = run_generate(cfg)
    whole = time.perf_counter() - t
    root = Path(manifest["root"])
    written = sum(f.stat().st_size for f in root.glob("*/shard-*.parquet"))
    records = [json_load(p) for p in (root / "shards").glob("*.json")]
    return {"compute_s": manifest["throughput"]["seconds"], "whole_s": whole, "tokens": manifest["num_tokens"],
            "shards_s": sum(r["seconds"] for r in records),
            "bytes_per_token": written / manifest["num_tokens"],
            "peak_rss": max(r["actor_peak_rss_bytes"] for r in records),
            "d_in": next(iter(manifest["hookpoints"].values()))["d_in"]}


def json_load(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=393216)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="chunks per forward pass")
    p.add_argument("--shard-tokens", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2, help="cores for the actor and for the bare loop")
    args = p.parse_args()

    import ray

    from actors.generate.models import build_local_model

    torch.set_num_threads(args.cpus)
    ray.init(address="local", num_cpus=args.cpus, object_store_memory=256 * 2**20, include_dashboard=False,
             log_to_driver=False)
    last, mid = f"h.{args.layers - 1}", f"h.{args.layers // 2 - 1}"
    results: dict[str, list] = {"bare": [], "stage": [], "stage-mid": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.repeats):
            for name, hook in (("stage", last), ("stage-mid", mid)):
                results[name].append(stage(tmp / f"{name}-{r}", args, hook))
            model_folder = tmp / f"stage-{r}" / "model"
            build_local_model(config(tmp, args, last).model.build, 0, model_folder)
            results["bare"].append(bare_loop(model_folder, tmp / f"stage-{r}" / "activations",
                                             args.batch_size))
            print(f"repeat {r + 1}: bare {results['bare'][-1]:.1f} s, stage {results['stage'][-1]['compute_s']:.1f} s "
                  f"(whole {results['stage'][-1]['whole_s']:.1f} s), stage-mid {results['stage-mid'][-1]['compute_s']:.1f} s",
                  flush=True)
    ray.shutdown()

    tokens = results["stage"][0]["tokens"]
    bare = tokens / statistics.median(results["bare"])
    print(f"\nmodel: GPT-2 style, {args.layers} layers, d {args.hidden}, ctx {args.ctx_len}, batch {args.batch_size} "
          f"chunks; {tokens:,} tokens; {args.cpus} cores; medians of {args.repeats}")
    print(f"{'':50s}{'tokens/s':>12s}{'ratio vs bare':>15s}")
    print(f"{'bare forward loop':50s}{bare:12,.0f}{1.0:15.2f}")
    for name, label in (("stage", f"stage, hookpoint {last} (last)"), ("stage-mid", f"stage, hookpoint {mid} (mid)")):
        for key, what in (("compute_s", "compute phase"), ("whole_s", "whole call"), ("shards_s", "shards only")):
            rate = tokens / statistics.median(x[key] for x in results[name])
            print(f"{label + ', ' + what:50s}{rate:12,.0f}{rate / bare:15.2f}")
    s = results["stage"][0]
    print(f"\nbytes written per token per hookpoint: {s['bytes_per_token']:.0f} (d_in {s['d_in']} x 4 bytes = "
          f"{4 * s['d_in']} + provenance)")
    print(f"actor peak RSS: {max(x['peak_rss'] for x in results['stage']) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
