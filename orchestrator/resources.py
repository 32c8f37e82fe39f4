"""Memory that the train and compare stages ask Ray for (`memory=`), from the estimates of the code that does the
work: actors/train/stacked.py's per-seed stack estimate and actors/compare/matching.py's pair-matching model. The
plan (orchestrator/sizing.py) prints the same numbers; docs/planning.md has their calibration.
"""

from __future__ import annotations

from actors.compare.matching import pair_memory_bytes
from actors.train.stacked import stack_bytes_per_seed

MIB, GIB = 2**20, 2**30
# Resident memory of a worker process before it holds any data: the interpreter and the libraries it imports
# (measured: 285 MiB for a matching task's imports, 400 MiB for a training worker's, docs/planning.md), rounded up
# for Ray's own per-worker share.
COMPARE_TASK_BASE = 512 * MIB
TRAIN_WORKER_BASE = 1 * GIB
STORAGE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def compare_task_bytes(width_a: int, width_b: int, d_in: int, cpus: float = 1.0) -> int:
    """Ray `memory=` of a task that matches two SAEs (one pair, its chance baseline or its checkpoints: they match
    one pair at a time) with `cpus` CPUs reserved: Ray gives the task as many threads (OMP_NUM_THREADS)."""
    return COMPARE_TASK_BASE + pair_memory_bytes(width_a, width_b, d_in, threads=max(1, int(cpus)))


def worker_jobs(groups: list[list[dict]], world: int) -> list[list[dict]]:
    """The jobs each of `world` training workers trains: groups dealt round-robin, as actors/train/worker.py deals
    them (all of a worker's SAEs train at once, on one stream)."""
    return [[job for i, group in enumerate(groups) if i % world == rank for job in group] for rank in range(world)]


def dealt_jobs(groups: list[list[dict]], world: int, backend: str) -> list[list[dict]]:
    """The SAEs each training worker holds at once: torch, the groups dealt round-robin (`worker_jobs`); deepspeed,
    every worker takes part in every SAE, one at a time, so the widest (its ZeRO partitions not counted)."""
    if backend == "deepspeed":
        return [[max((j for g in groups for j in g), key=lambda j: j["width"])]] * world
    return worker_jobs(groups, world)


def stream_count(jobs: list[dict]) -> int:
    """Activation streams a worker reads: one per input normalisation among its SAEs."""
    from actors.sae import ARCHITECTURES

    return len({ARCHITECTURES[j["architecture"]].normalize_inputs for j in jobs}) or 1


def sae_bytes(jobs: list[dict], d_in: int, batch_size: int) -> int:
    """Estimated training memory of these SAEs held at once (weights, gradients, Adam moments, step tensors)."""
    return sum(stack_bytes_per_seed(d_in, job["width"], batch_size) for job in jobs)


def stream_bytes(d_in: int, shard_rows: int, storage_dtype: str, shuffle_buffer: int, streams: int = 1) -> int:
    """Host memory of the activation stream(s) a worker reads (actors/train/data.py): per stream the shard being
    consumed and the next one (float32), the pool of a shard plus the carried shuffle buffer and its permuted copy,
    and the stored column of the shard being read."""
    rows = 4 * shard_rows + 2 * shuffle_buffer
    return streams * (rows * d_in * 4 + shard_rows * d_in * STORAGE_BYTES[storage_dtype])


def train_worker_bytes(jobs: list[dict], d_in: int, batch_size: int, shard_rows: int, storage_dtype: str,
                       shuffle_buffer: int, eval_rows: int, on_gpu: bool, streams: int = 1) -> int:
    """Ray `memory=` (host memory) of a training worker: its process, its streams, and, training on the CPU, its
    SAEs and the held-out evaluation rows (on a GPU those live in GPU memory, which Ray does not count)."""
    host = TRAIN_WORKER_BASE + stream_bytes(d_in, shard_rows, storage_dtype, shuffle_buffer, streams)
    if not on_gpu:
        host += sae_bytes(jobs, d_in, batch_size) + streams * eval_rows * d_in * 4
    return host


def train_request_bytes(groups: list[list[dict]], world: int, entry: dict, train, storage_dtype: str,
                        on_gpu: bool) -> int:
    """The train stage's per-worker `memory=` for one activation source (`entry`: its generate-manifest entry; Ray
    Train gives every worker the same resources, so the largest worker's need)."""
    from actors.store.shards import held_out_rows

    shard_rows = max(s["rows"] for s in entry["shards"])
    eval_rows = held_out_rows(entry["rows"], train.eval_tokens)
    return max(train_worker_bytes(jobs, entry["d_in"], train.batch_size, shard_rows, storage_dtype,
                                  train.shuffle_buffer_tokens, eval_rows, on_gpu, stream_count(jobs))
               for jobs in dealt_jobs(groups, world, train.backend))
