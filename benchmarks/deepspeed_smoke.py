"""Smoke test of the DeepSpeed backend on GPUs: a wide TopK SAE stepped through Ray Train with ZeRO, against the torch
backend's single-worker step in the same run, with tokens/s and peak memory.

    python benchmarks/deepspeed_smoke.py                  # every GPU, ZeRO 2, d_in 4096, width 131072, batch 4096
    python benchmarks/deepspeed_smoke.py --zero-stage 1 --width 262144 --steps 5
    python benchmarks/deepspeed_smoke.py --cpu --workers 2 --d-in 64 --width 1024 --batch 512   # wiring check, CPU

Needs the `deepspeed` extra (docs/deepspeed.md). Rows, each a fresh Ray Train run (`TorchTrainer`):

- torch:     one worker, one `SAETrainer` (actors/train/training.py) on the whole batch: the torch backend's step.
- deepspeed: `--workers` workers (default: every GPU), each a `DataParallelSAE` (actors/train/deepspeed_backend.py) on its
             slice of the same batch, ZeRO stage `--zero-stage`: forward, backward with the decoder-gradient
             projection, gradient averaging, clip, Adam, schedule, unit-norm decoder, dead counters, digest.

tokens/s counts rows of the global batch per second over the timed steps (after `--warmup` untimed ones); peak
memory is torch.cuda.max_memory_allocated (ru_maxrss with --cpu), the largest over the workers. The batches are
synthetic (sparse combinations of random unit directions plus noise), the same on every worker. Modes are
interleaved over `--repeats`; medians are printed, with ratios to the torch row. A row that fails (e.g. the torch
row out of memory at a width only ZeRO fits) is reported as failed and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def _synthetic_batches(n: int, batch: int, d: int, device, seed: int = 0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=g), dim=1)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 4 * d, (batch, 8), generator=g)
        coef = torch.rand(batch, 8, generator=g) + 0.5
        x = torch.einsum("bk,bkd->bd", coef, dirs[idx]) + 0.05 * torch.randn(batch, d, generator=g)
        out.append(x.to(device))
    return out


def _worker(config: dict) -> None:
    import resource

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from actors.train.deepspeed_backend import DataParallelSAE, deepspeed_config
    from actors.train.training import build_trainer
    from orchestrator.config import TrainConfig
    from orchestrator.stages.train import worker_settings

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    a = config["args"]
    steps = a["warmup"] + a["steps"]
    settings = worker_settings(TrainConfig(batch_size=a["batch"], warmup_steps=1,
                                           deepspeed={"zero_stage": a["zero_stage"]}),
                               train_hash=None, trust_remote_code=False)
    job = {"architecture": "topk", "params": {"k": a["k"], "auxk_alpha": 0.0}, "width": a["width"], "seed": 0}
    trainer = build_trainer(job, a["d_in"], steps, settings, device)
    xs = _synthetic_batches(steps, a["batch"], a["d_in"], device)
    if config["mode"] == "deepspeed":
        model = DataParallelSAE(trainer, xs[0], deepspeed_config(settings, world), rank, world)
        step = model.step
    else:
        step = trainer.step
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for x in xs[:a["warmup"]]:
        step(x)
    sync()
    start = time.perf_counter()
    for x in xs[a["warmup"]:]:
        step(x)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dist.is_initialized() and world > 1:
        peaks = torch.tensor([float(peak), seconds], dtype=torch.float64, device=device)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)  # the largest worker, the slowest worker
        peak, seconds = peaks.tolist()
    if rank == 0:  # Ray Train keeps only metrics reported with a checkpoint; a file is simpler
        Path(config["out"]).write_text(json.dumps({"tokens_per_s": a["batch"] * a["steps"] / seconds,
                                                   "peak_bytes": float(peak)}))


def _fit(mode: str, workers: int, args: argparse.Namespace, storage: str) -> dict | None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(storage) / f"{mode}-{time.time_ns()}.json"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"mode": mode, "args": vars(args), "threads": args.cpus_per_worker, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=not args.cpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name=f"{mode}-{time.time_ns()}", storage_path=storage),
    )
    try:
        trainer.fit()
        return json.loads(out.read_text())
    except Exception as err:  # noqa: BLE001 - a failed row is reported, the others still run
        print(f"{mode}: failed: {str(err).splitlines()[0][:300]}", file=sys.stderr)
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=4096)
    p.add_argument("--width", type=int, default=131072)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096, help="global batch (rows); a multiple of --workers")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2])
    p.add_argument("--workers", type=int, default=None, help="DeepSpeed workers; default: every GPU (--cpu: 2)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="no GPU: check the wiring on CPU (gloo)")
    args = p.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(REPO))
    import ray
    import torch

    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and gpus == 0:
        sys.exit("no GPU visible; run with --cpu to check the wiring on CPU")
    workers = args.workers or (2 if args.cpu else gpus)
    if args.batch % workers:
        sys.exit(f"--batch {args.batch} must be a multiple of the {workers} workers")
    ray.init(address="local", num_cpus=max(2, workers * args.cpus_per_worker), num_gpus=gpus,
             include_dashboard=False, log_to_driver=True)
    rows = {"torch": [], "deepspeed": []}
    with tempfile.TemporaryDirectory(prefix="deepspeed-smoke-") as storage:
        try:
            for _ in range(args.repeats):
                for mode, n in (("torch", 1), ("deepspeed", workers)):
                    metrics = _fit(mode, n, args, storage)
                    if metrics is not None:
                        rows[mode].append(metrics)
        finally:
            ray.shutdown()

    params = 2 * args.d_in * args.width + args.width + args.d_in
    print(f"\nTopK SAE d_in {args.d_in}, width {args.width} ({params / 1e6:,.1f} M parameters, "
          f"{4 * params / GIB:.1f} GiB fp32), k {args.k}, batch {args.batch}, {args.steps} timed steps, "
          f"{'CPU' if args.cpu else f'{gpus} GPU(s)'}; medians of {args.repeats}")
    print(f"{'mode':<28}{'workers':>8}{'tokens/s':>14}{'peak GiB/worker':>18}{'vs torch':>10}")
    base = statistics.median(r["tokens_per_s"] for r in rows["torch"]) if rows["torch"] else None
    for mode, n in (("torch", 1), ("deepspeed", workers)):
        label = mode if mode == "torch" else f"deepspeed ZeRO {args.zero_stage}"
        if not rows[mode]:
            print(f"{label:<28}{n:>8}{'failed':>14}")
            continue
        tps = statistics.median(r["tokens_per_s"] for r in rows[mode])
        peak = statistics.median(r["peak_bytes"] for r in rows[mode]) / GIB
        ratio = f"{tps / base:.2f}x" if base else "-"
        print(f"{label:<28}{n:>8}{tps:>14,.0f}{peak:>18.2f}{ratio:>10}")


if __name__ == "__main__":
    main()
