"""Reader benchmark: rows/s of the activation stream against rows/s of the TopK training step it feeds.

    python benchmarks/reader.py                       # d_in 768, 16 shards of 32,768 rows, float32 and bfloat16
    python benchmarks/reader.py --width 4096 --repeats 3

The stream does everything training asks of it: reads each Parquet shard, checks its sha256 against the
manifest, decodes the activation column (bfloat16 bits included), permutes through the shuffle buffer and
slices batches; the next shard is read on a background thread. The training step is one TopK SAE (with
Adam) at the given width and k on batches of the same size, in the same process. The ratio reader/trainer
must be above 1 for the trainer, not the reader, to set the pace; it is printed for one SAE, and a worker
training S seeds needs the reader S times less.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def write_shards(root: Path, shards: int, rows: int, d: int, dtype: str) -> list[dict]:
    from actors.store.shards import PARQUET_OPTIONS, activation_table, to_storage
    from actors.store.storage import ActivationStore

    store = ActivationStore(root)
    g = torch.Generator().manual_seed(0)
    out = []
    for sid in range(shards):
        acts = torch.randn(rows, d, generator=g)
        rel = f"h/shard-{sid:05d}.parquet"
        zeros = np.zeros(rows)
        store.write_table(rel, activation_table(to_storage(acts, dtype), zeros, zeros, zeros, dtype), **PARQUET_OPTIONS)
        out.append({"shard_id": sid, "path": rel, "rows": rows, "sha256": store.sha256(rel)})
    return out


def reader_rate(root: Path, shards: list[dict], batch: int, buffer: int) -> float:
    from actors.train.data import ActivationStream

    total = sum(s["rows"] for s in shards) // batch * batch
    stream = ActivationStream(str(root), shards, batch, 0, total, shuffle_buffer=buffer)
    t = time.perf_counter()
    n = sum(len(b) for b in stream)
    return n / (time.perf_counter() - t)


def trainer_rate(d: int, width: int, k: int, batch: int, steps: int) -> float:
    from actors.train.training import build_trainer
    from orchestrator.config import TrainConfig
    from orchestrator.stages.train import worker_settings

    settings = worker_settings(TrainConfig(batch_size=batch, warmup_steps=10), train_hash=None, trust_remote_code=False)
    job = {"architecture": "topk", "params": {"k": k}, "width": width, "seed": 0}
    trainer = build_trainer(job, d, steps + 1, settings, torch.device("cpu"))
    x = torch.randn(batch, d)
    trainer.step(x)  # init from the first batch, warm-up
    t = time.perf_counter()
    for _ in range(steps):
        trainer.step(x)
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--rows", type=int, default=32768, help="rows per shard")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--buffer", type=int, default=65536, help="shuffle buffer rows (train.shuffle_buffer_tokens)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    rates: dict[str, list[float]] = {"trainer": [], "float32": [], "bfloat16": []}
    with tempfile.TemporaryDirectory() as tmp:
        shards = {dt: write_shards(Path(tmp) / dt, args.shards, args.rows, args.d_in, dt) for dt in ("float32", "bfloat16")}
        for _ in range(args.repeats):
            rates["trainer"].append(trainer_rate(args.d_in, args.width, args.k, args.batch, args.steps))
            for dt in ("float32", "bfloat16"):
                rates[dt].append(reader_rate(Path(tmp) / dt, shards[dt], args.batch, args.buffer))
    trainer = statistics.median(rates["trainer"])
    print(f"d_in {args.d_in}, batch {args.batch}, {args.shards} shards x {args.rows:,} rows, shuffle buffer "
          f"{args.buffer:,}; TopK width {args.width}, k {args.k}; {torch.get_num_threads()} threads; medians of "
          f"{args.repeats}")
    print(f"{'':40s}{'rows/s':>12s}{'ratio vs trainer':>18s}")
    print(f"{'TopK training step (one SAE)':40s}{trainer:12,.0f}{1.0:18.2f}")
    for dt in ("float32", "bfloat16"):
        r = statistics.median(rates[dt])
        print(f"{'activation stream, ' + dt + ' shards':40s}{r:12,.0f}{r / trainer:18.2f}")


if __name__ == "__main__":
    main()
