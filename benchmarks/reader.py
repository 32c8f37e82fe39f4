"""Reader benchmark: rows/s of the activation stream against rows/s of the TopK training step it feeds.

    python benchmarks/reader.py                       # d_in 768, 16 shards of 32,768 rows, float32 and bfloat16
    python benchmarks/reader.py --width 4096 --repeats 3
    python benchmarks/reader.py --stores local file s3 --dtypes bfloat16   # also through pyarrow.fs URIs

The stream does everything training asks of it: reads each Parquet shard, checks its sha256 against the
manifest, decodes the activation column (bfloat16 bits included), permutes through the shuffle buffer and
slices batches; the next shard is read on a background thread. The training step is one TopK SAE (with
Adam) at the given width and k on batches of the same size, in the same process. The ratio reader/trainer
must be above 1 for the trainer, not the reader, to set the pace; it is printed for one SAE, and a worker
training S seeds needs the reader S times less.

`--stores` names where the shards are read from, each a root the pipeline accepts (`actors/store/storage.py`):
`local` a folder path (pyarrow's LocalFileSystem), `file` the same kind of folder as a `file://` URI (pyarrow's
filesystem layer resolving a URI), `s3` an `s3://` URI on a local S3 emulator (moto's server, started here as a
subprocess on 127.0.0.1 and stopped at the end; `pip install "moto[server]"`, the `bench` extra) through pyarrow's
S3FileSystem: every request goes over HTTP as it would to a bucket, but on loopback, so the figure is the client
path's cost (requests, copies, the checksum read, decoding), not a network's bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

STORES = ("local", "file", "s3")


def write_shards(root: str, shards: int, rows: int, d: int, dtype: str) -> list[dict]:
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


def reader_rate(root: str, shards: list[dict], batch: int, buffer: int) -> float:
    from actors.train.data import ActivationStream

    total = sum(s["rows"] for s in shards) // batch * batch
    stream = ActivationStream(root, shards, batch, 0, total, shuffle_buffer=buffer)
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


@contextlib.contextmanager
def s3_emulator():
    """A moto S3 server on a free loopback port, as a subprocess (its request handling then does not share this
    process's interpreter with the reader); yields the query string that points pyarrow's S3FileSystem at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the S3 emulator did not start: pip install 'moto[server]' (the bench extra)")
            time.sleep(0.2)
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def store_root(kind: str, dtype: str, tmp: Path, s3_query: str | None) -> str:
    if kind == "local":
        return str(tmp / "local" / dtype)
    if kind == "file":
        return (tmp / "file" / dtype).as_uri()
    return f"s3://sae-seeds-bench/{dtype}?{s3_query}"


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
    p.add_argument("--stores", nargs="+", choices=STORES, default=["local"],
                   help="where the shards are read from: a folder, a file:// URI, an s3:// URI on a local emulator")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    args = p.parse_args()

    cases = [(kind, dt) for kind in args.stores for dt in args.dtypes]
    rates: dict = {"trainer": []} | {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp, (s3_emulator() if "s3" in args.stores else contextlib.nullcontext()) as q:
        roots = {case: store_root(*case, Path(tmp), q) for case in cases}
        shards = {case: write_shards(roots[case], args.shards, args.rows, args.d_in, case[1]) for case in cases}
        for _ in range(args.repeats):
            rates["trainer"].append(trainer_rate(args.d_in, args.width, args.k, args.batch, args.steps))
            for case in cases:
                rates[case].append(reader_rate(roots[case], shards[case], args.batch, args.buffer))
    trainer = statistics.median(rates["trainer"])
    print(f"d_in {args.d_in}, batch {args.batch}, {args.shards} shards x {args.rows:,} rows, shuffle buffer "
          f"{args.buffer:,}; TopK width {args.width}, k {args.k}; {torch.get_num_threads()} threads; medians of "
          f"{args.repeats}")
    print(f"{'':44s}{'rows/s':>12s}{'MB/s':>9s}{'ratio vs trainer':>18s}")
    print(f"{'TopK training step (one SAE)':44s}{trainer:12,.0f}{'':>9s}{1.0:18.2f}")
    for kind, dt in cases:
        r = statistics.median(rates[kind, dt])
        mb = r * args.d_in * (4 if dt == "float32" else 2) / 1e6
        print(f"{f'activation stream, {kind}, {dt} shards':44s}{r:12,.0f}{mb:9,.0f}{r / trainer:18.2f}")


if __name__ == "__main__":
    main()
