"""The run's plan and what it costs, from the config alone, in seconds and without a GPU or the model's weights:
`sae-seeds plan` and the plan `sae-seeds run` prints first (docs/planning.md).

Every figure comes from the code that does the work: hookpoints resolve on the model's module tree on the meta
device (their width from a forward pass of meta tensors through the generate stage's own hooks), shards from the
generate stage's shard plans, stacks from the train stage's own split of seeds, pair tasks as the compare stage
enumerates them, memory from the estimates the stages request from Ray (orchestrator/resources.py). A config whose
estimates exceed the resources it names is refused (`PlanError`, exit code 2), naming the field to change.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field

from actors.store.shards import held_out_rows
from actors.train.stacked import stack_bytes_per_seed

from .config import ConfigError, ExperimentConfig
from .plan import plan_configurations
from .resources import (GIB, STORAGE_BYTES, compare_task_bytes, dealt_jobs, sae_bytes, stream_count,
                        train_worker_bytes)

PROVENANCE_BYTES = 16  # per activation row: chunk id (8), position (4), token id (4)
TOKEN_BYTES = 4  # the token files (tokens/source-*.parquet): one int32 per token


class PlanError(ConfigError):
    """The config's estimates exceed a resource it names; the message names the field."""


@dataclass
class ModelShape:
    """What the plan needs of the model: each hookpoint's width, and the forward pass's cost per token."""

    d_in: dict[str, int]  # resolved hookpoint -> width of its output
    forward_params: int  # non-embedding parameters up to the deepest hookpoint (the forward stops there)
    layers_run: int  # transformer blocks up to the deepest hookpoint
    d_model: int | None
    total_params: int
    source: str  # where the module tree came from
    notes: list[str] = field(default_factory=list)


@dataclass
class Source:
    name: str
    kind: str  # "model" or "planted"
    d_in: int
    rows: int
    shards: int
    shard_rows: int  # rows of the largest shard
    storage_bytes: int
    held_out_rows: int
    train_tokens: int  # per SAE
    steps: int
    passes: float  # over the training rows (rows less held out): above 1 when train.tokens exceeds one pass


@dataclass
class Worker:
    seeds: int
    stacks: int
    sae_bytes: int  # SAE training state held at once (GPU memory when training on GPUs)
    lm_bytes: int  # the language model a worker loads to measure the LM loss with each SAE spliced in
    host_bytes: int  # the worker's Ray `memory=` request


@dataclass
class TrainSource:
    source: str
    configurations: int
    stacks: list[dict]  # {"configuration", "title", "width", "seeds", "bytes"}
    workers: list[Worker]
    request_bytes: int  # Ray memory= per worker (the largest worker's need)


@dataclass
class CompareConfiguration:
    configuration: str
    source: str  # the hookpoint or planted source its SAEs were trained on
    title: str
    width: int
    d_in: int
    seeds: int
    pair_tasks: int
    task_bytes: int  # Ray memory= of each of its tasks
    pair_flops: float


@dataclass
class RunPlan:
    name: str
    model: ModelShape | None
    sources: list[Source]
    tokens_bytes: int  # the token files
    train: list[TrainSource]
    compare: list[CompareConfiguration]
    tasks: dict[str, int]  # compare tasks by kind
    resources: dict[str, str]  # what each stage requests, in words
    flops: dict[str, float]
    device_hours: float | None
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def sae_count(self) -> int:
        return sum(len(s["seeds"]) for t in self.train for s in t.stacks)

    def to_json(self) -> dict:
        return asdict(self)


# ---- the model, on the meta device ----

def model_shape(cfg: ExperimentConfig) -> ModelShape:
    """The model's module tree on the meta device (no weights): from `plan.transformers_config` when set, else the model's
    own config (a built model's `model.build`, a local folder's or a Hub model's config.json, nothing else)."""
    from actors.generate.models import build_config, skeleton_from_config, skeleton_model

    m = cfg.model
    try:
        if cfg.plan.transformers_config is not None:
            from transformers import AutoConfig

            model = skeleton_from_config(AutoConfig.from_pretrained(cfg.plan.transformers_config), m.trust_remote_code)
            source = _shown_path(cfg.plan.transformers_config)
        elif m.build is not None:
            model, source = skeleton_from_config(build_config(m.build)), "model.build"
        else:
            model = skeleton_model(m.name, m.revision, m.trust_remote_code)
            source = f"{m.name}@{m.revision or 'default'}"
    except (OSError, ValueError, TypeError, KeyError) as err:
        field_name = "plan.transformers_config" if cfg.plan.transformers_config is not None else "model.name"
        raise PlanError(f"{field_name}: cannot build the model's module tree: {str(err).strip().splitlines()[0]}") \
            from None
    return shape_of(model, cfg.generate.hookpoints, source)


def _shown_path(path: str) -> str:
    from pathlib import Path

    try:
        return Path(path).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path


def shape_of(model, patterns: list[str], source: str) -> ModelShape:
    import torch
    from torch import nn

    from actors.generate.activations import HookpointCapture

    try:
        capture = HookpointCapture(model, patterns)
    except ValueError as err:
        raise PlanError(f"generate.hookpoints: {err}") from None
    config = getattr(model, "config", None)
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    notes = []
    try:
        outputs = capture(torch.zeros(1, 8, dtype=torch.long, device="meta"))
        d_in = {h: int(t.shape[-1]) for h, t in outputs.items()}
    except Exception as err:  # noqa: BLE001 - a model whose forward has no meta kernels: plan on, say so
        if not d_model:
            raise PlanError(f"generate.hookpoints: cannot find the width of {capture.hookpoints} without weights "
                            f"({type(err).__name__}: {err})") from None
        d_in = {h: int(d_model) for h in capture.hookpoints}
        notes.append(f"hookpoint widths taken as the model's hidden size ({d_model}): its forward pass does not run "
                     f"on the meta device ({type(err).__name__})")
    names = [n for n, _ in model.named_modules()]
    deepest = max(names.index(h) for h in capture.hookpoints)
    modules = dict(model.named_modules())
    forward = sum(p.numel() for n in names[:deepest + 1] if not isinstance(modules[n], nn.Embedding)
                  for p in modules[n].parameters(recurse=False))
    layers = {int(x) for n in names[:deepest + 1] for x in re.findall(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)", n)}
    return ModelShape(d_in, int(forward), len(layers), d_model, int(sum(p.numel() for p in model.parameters())),
                      source, notes)


# ---- the plan ----

def sae_flops_per_token(architecture: str, params: dict, width: int, d_in: int) -> float:
    """Training FLOPs of one SAE per token: sparse codes (a `k`): the dense encoder matmul (2 n d) plus decoding,
    its backward and the encoder's gradient on the k chosen latents (8 k d); dense codes: 3x a forward of two
    n x d matmuls (12 n d)."""
    k = params.get("k")
    if isinstance(k, int):
        return 2 * width * d_in + 8 * k * d_in
    return 12 * width * d_in


def build_plan(cfg: ExperimentConfig, shape: ModelShape | None = None) -> RunPlan:
    """The plan of `cfg` (its model's shape from `model_shape` unless given)."""
    from .stages.generate import shard_plan
    from .stages.planted import planted_plan
    from .stages.train import _split_groups

    shape = shape or model_shape(cfg)
    g, t = cfg.generate, cfg.train
    item = STORAGE_BYTES[g.dtype]
    num_chunks = g.num_tokens // g.ctx_len
    model_shards = shard_plan(num_chunks, g.ctx_len, g.shard_tokens)
    sources = []
    for h, d in shape.d_in.items():
        rows = num_chunks * g.ctx_len
        sources.append(_source(cfg, h, "model", d, rows, len(model_shards),
                               max(s["stop"] - s["start"] for s in model_shards) * g.ctx_len, item))
    if cfg.planted is not None:
        p = cfg.planted
        shards = planted_plan(p.num_tokens, p.shard_tokens)
        sources.append(_source(cfg, p.hookpoint, "planted", p.d, p.num_tokens, len(shards),
                               max(s["stop"] - s["start"] for s in shards), item))
    configurations = plan_configurations(cfg, [s.name for s in sources])
    on_gpu = t.use_gpu is not False and (t.use_gpu or cfg.plan.gpu_memory_gib is not None)

    train, compare = [], []
    tasks = {"pairs": 0, "chance": 0, "through_training": 0, "ground_truth": 0}
    flops = {"generate (model forward)": 0.0, "train (SAEs)": 0.0, "compare (cosine matmuls)": 0.0}
    for src in sources:
        confs = [c for c in configurations if c.hookpoint == src.name]
        groups = [c.jobs() for c in confs]
        if t.stack_seeds:
            groups = _split_groups(groups, src.d_in, t.batch_size, t.max_stack_bytes)
        world = t.num_workers if t.backend == "deepspeed" else min(t.num_workers, len(groups))
        titles = {c.name: c.title for c in confs}
        stacks = [{"configuration": grp[0]["configuration"], "title": titles[grp[0]["configuration"]],
                   "width": grp[0]["width"], "seeds": [j["seed"] for j in grp if not j.get("l0_pilot")],
                   "pilots": sum(1 for j in grp if j.get("l0_pilot")),
                   "bytes": sae_bytes(grp, src.d_in, t.batch_size)} for grp in groups]
        dealt = dealt_jobs(groups, world, t.backend)
        lm = shape.total_params * STORAGE_BYTES[cfg.model.dtype] if src.kind == "model" and t.lm_eval_chunks else 0
        workers = [Worker(seeds=len(jobs), stacks=sum(1 for i in range(len(groups)) if i % world == rank),
                          sae_bytes=sae_bytes(jobs, src.d_in, t.batch_size), lm_bytes=lm,
                          host_bytes=train_worker_bytes(jobs, src.d_in, t.batch_size, src.shard_rows, g.dtype,
                                                        t.shuffle_buffer_tokens, src.held_out_rows, on_gpu,
                                                        stream_count(jobs)))
                   for rank, jobs in enumerate(dealt)]
        train.append(TrainSource(src.name, len(confs), stacks, workers, max(w.host_bytes for w in workers)))
        flops["train (SAEs)"] += sum(src.steps * t.batch_size * sae_flops_per_token(j["architecture"], j["params"],
                                                                                    j["width"], src.d_in)
                                     for grp in groups for j in grp)
        reached = [n for n in t.checkpoint_tokens if n <= src.steps * t.batch_size]
        for c in confs:
            n = len(c.seeds)
            pairs = n * (n - 1) // 2
            pair_flops = 2 * 2.0 * c.point.width ** 2 * src.d_in  # encoder and decoder cosine matrices
            tasks["pairs"] += pairs
            tasks["chance"] += 1 if n > 1 else 0
            tasks["through_training"] += pairs if reached else 0
            tasks["ground_truth"] += n if src.kind == "planted" else 0
            flops["compare (cosine matmuls)"] += pair_flops * (pairs * (1 + len(reached)) + (2 if n > 1 else 0))
            compare.append(CompareConfiguration(c.name, src.name, c.title, c.point.width, src.d_in, n, pairs,
                                                compare_task_bytes(c.point.width, c.point.width, src.d_in,
                                                                   cfg.compare.cpus_per_task),
                                                pair_flops))
    model_sources = [s for s in sources if s.kind == "model"]
    if model_sources:
        attention = 2 * shape.layers_run * g.ctx_len * (shape.d_model or 0)
        flops["generate (model forward)"] = num_chunks * g.ctx_len * (2 * shape.forward_params + attention)
    total = sum(flops.values())
    hours = total / (cfg.plan.device_tflops * 1e12) / 3600 if cfg.plan.device_tflops else None
    plan = RunPlan(
        name=cfg.name, model=shape if model_sources else None, sources=sources,
        tokens_bytes=num_chunks * g.ctx_len * TOKEN_BYTES if model_sources else 0, train=train, compare=compare,
        tasks=tasks, resources=_resources(cfg, on_gpu, train), flops=flops, device_hours=hours,
        assumptions=_assumptions(cfg), warnings=_warnings(cfg) + shape.notes)
    return plan


def _source(cfg: ExperimentConfig, name: str, kind: str, d_in: int, rows: int, shards: int, shard_rows: int,
            item: int) -> Source:
    budget = cfg.source_tokens["model" if kind == "model" else name]
    steps = budget // cfg.train.batch_size
    held = held_out_rows(rows, cfg.train.eval_tokens)
    return Source(name, kind, d_in, rows, shards, shard_rows, rows * (d_in * item + PROVENANCE_BYTES), held,
                  steps * cfg.train.batch_size, steps, steps * cfg.train.batch_size / (rows - held))


def _resources(cfg: ExperimentConfig, on_gpu: bool, train: list[TrainSource]) -> dict[str, str]:
    g, t, c = cfg.generate, cfg.train, cfg.compare
    gpus = f"{g.gpus_per_actor:g} GPU" if g.gpus_per_actor is not None else "1 GPU if the cluster has GPUs"
    actors = f"{g.num_actors} model actor(s)" if g.num_actors is not None else "one model actor per GPU (else 1)"
    worker_gpu = "1 GPU" if t.use_gpu else ("no GPU" if t.use_gpu is False else "1 GPU if the cluster has GPUs")
    if t.backend == "deepspeed":
        workers = f"{t.num_workers} workers (deepspeed: every SAE across all of them)"
    else:
        workers = f"up to {max((len(ts.workers) for ts in train), default=0)} worker(s), one source after another"
    largest = max((ts.request_bytes for ts in train), default=0)
    return {
        "generate": f"{actors}, each {gpus} and {g.cpus_per_actor:g} CPU",
        "train": f"{workers}, each {worker_gpu}, {t.cpus_per_worker} CPU, memory= up to {_gib(largest)}",
        "compare": f"one task per seed pair, each {c.cpus_per_task:g} CPU and memory= sized per pair (above), no GPU",
    }


def _assumptions(cfg: ExperimentConfig) -> list[str]:
    out = [
        "forward FLOPs per token = 2 x non-embedding parameters up to the deepest hookpoint (the forward stops "
        "there) + 2 x blocks run x ctx_len x d_model (attention scores, Kaplan et al. 2020's count)",
        "SAE FLOPs per token: TopK family 2 n d + 8 k d (dense encoder matmul, sparse decode and backward), "
        "others 12 n d (3 x a forward of two n x d matmuls); L1 calibration probes and evaluation not counted",
        "matching FLOPs: 2 n^2 d per cosine matrix, two per pair, once per checkpoint and for the two chance "
        "baselines; the certified matcher measured about 1.5x its matmul time (docs/matching.md)",
        "memory: actors/train/stacked.py's per-seed estimate (x seeds a worker holds at once) and actors/compare/"
        "matching.py's pair model, calibrated in docs/planning.md",
    ]
    if cfg.plan.device_tflops:
        out.append(f"time: total FLOPs at a sustained {cfg.plan.device_tflops:g} TFLOP/s per device "
                   "(plan.device_tflops), summed over devices")
    return out


def _warnings(cfg: ExperimentConfig) -> list[str]:
    out = []
    commit = re.compile(r"^[0-9a-f]{40}$")
    if cfg.model.build is None and not commit.match(cfg.model.revision or ""):
        out.append(f"model.revision ({cfg.model.revision}) is not a commit hash: the activations can change when "
                   "that branch moves; the manifest records the commit it resolved to")
    if cfg.dataset.kind == "hub" and not commit.match(cfg.dataset.revision or ""):
        out.append(f"dataset.revision ({cfg.dataset.revision}) is not a commit hash: the token chunks can change "
                   "when that branch moves")
    return out


# ---- fitting the resources the config names ----

def check_fits(cfg: ExperimentConfig, plan: RunPlan) -> None:
    """Refuse a plan whose estimates exceed a resource the config names (train.max_stack_bytes,
    plan.gpu_memory_gib, plan.node_memory_gib); the message names the field and what to change."""
    t = cfg.train
    for ts in plan.train:
        src = next(s for s in plan.sources if s.name == ts.source)
        if t.backend == "torch" and t.stack_seeds:
            for stack in ts.stacks:
                one = stack_bytes_per_seed(src.d_in, stack["width"], t.batch_size)
                if one > t.max_stack_bytes:
                    raise PlanError(
                        f"train.max_stack_bytes: one seed of {stack['title']} on {ts.source} (d_in {src.d_in}) needs "
                        f"an estimated {_gib(one)}, more than train.max_stack_bytes ({_gib(t.max_stack_bytes)}); "
                        "raise train.max_stack_bytes (to what a device holds), or lower sae.widths or "
                        "train.batch_size")
        gpu = cfg.plan.gpu_memory_gib
        if gpu is not None and t.use_gpu is not False:
            for rank, w in enumerate(ts.workers):
                if w.sae_bytes + w.lm_bytes > gpu * GIB:
                    lm = f" and the {_gib(w.lm_bytes)} language model (train.lm_eval_chunks)" if w.lm_bytes else ""
                    raise PlanError(
                        f"plan.gpu_memory_gib: training worker {rank} of {ts.source} holds {w.seeds} SAEs at once "
                        f"({w.stacks} stacks, an estimated {_gib(w.sae_bytes)}){lm}, more than one GPU's {gpu:g} "
                        "GiB; raise train.num_workers so that fewer stacks share a worker, or lower "
                        "train.max_stack_bytes")
        node = cfg.plan.node_memory_gib
        if node is not None and t.use_gpu is False:
            for rank, w in enumerate(ts.workers):
                if w.host_bytes > node * GIB:
                    raise PlanError(
                        f"plan.node_memory_gib: CPU training worker {rank} of {ts.source} needs an estimated "
                        f"{_gib(w.host_bytes)}, more than a node's {node:g} GiB; raise train.num_workers or lower "
                        "train.max_stack_bytes")
    node = cfg.plan.node_memory_gib
    if node is not None:
        for c in sorted(plan.compare, key=lambda c: -c.task_bytes):  # the largest pair first
            if c.pair_tasks and c.task_bytes > node * GIB:
                raise PlanError(
                    f"plan.node_memory_gib: matching a seed pair of {c.title} (d_in {c.d_in}) needs an estimated "
                    f"{_gib(c.task_bytes)}, more than a node's {node:g} GiB: no node could run it; use nodes with "
                    "more memory, or lower sae.widths")


def cluster_warnings(plan: RunPlan, nodes: list[dict]) -> list[str]:
    """Requests that no node of the running cluster can hold (`ray.nodes()`): Ray would leave them pending. Warnings,
    not errors: an autoscaling cluster may add larger nodes when asked."""
    largest = max((n.get("Resources", {}).get("memory", 0) for n in nodes if n.get("Alive")), default=0)
    if not largest:
        return []
    out = [f"matching a seed pair of {c.title} requests {_gib(c.task_bytes)} of memory; the largest node has "
           f"{_gib(largest)}: Ray will not start it until a larger node joins"
           for c in plan.compare if c.pair_tasks and c.task_bytes > largest]
    out += [f"training workers of {t.source} request {_gib(t.request_bytes)} of memory each; the largest node has "
            f"{_gib(largest)}" for t in plan.train if t.request_bytes > largest]
    return out


# ---- text ----

def _gib(n: float) -> str:
    if n >= 2**40:
        return f"{n / 2**40:.1f} TiB"
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def format_plan(plan: RunPlan, compact: bool = False) -> str:
    """The plan in words; `compact`: the few lines `sae-seeds run` starts with."""
    total_storage = sum(s.storage_bytes for s in plan.sources) + plan.tokens_bytes
    workers = max((len(t.workers) for t in plan.train), default=0)
    stacks = sum(len(t.stacks) for t in plan.train)
    flops = sum(plan.flops.values())
    if compact:
        worst = max(plan.compare, key=lambda c: c.task_bytes, default=None)
        lines = [
            f"plan: {len(plan.sources)} source(s), {sum(s.shards for s in plan.sources)} shards, "
            f"{_count(sum(s.rows for s in plan.sources))} rows, {_gib(total_storage)} of activations",
            f"plan: {plan.sae_count} SAEs in {stacks} stacks on up to {workers} worker(s); "
            f"{plan.tasks['pairs']} pair tasks (largest {_gib(worst.task_bytes) if worst else '-'} each); "
            f"~{flops:.2g} FLOPs (sae-seeds plan for details)",
        ]
        return "\n".join(lines + [f"plan: WARNING {w}" for w in plan.warnings])
    out = [f"plan of {plan.name}"]
    if plan.model:
        m = plan.model
        out.append(f"model: {_count(m.total_params)} parameters ({m.source}); the forward runs {m.layers_run} "
                   f"block(s), to the deepest hookpoint: {_count(m.forward_params)} non-embedding parameters")
    out.append("\nactivation sources")
    out.append(f"  {'source':<28} {'d_in':>6} {'rows':>8} {'shards':>7} {'rows/shard':>10} {'storage':>10} "
               f"{'train tok/SAE':>13} {'steps':>8}")
    for s in plan.sources:
        out.append(f"  {s.name:<28} {s.d_in:>6} {_count(s.rows):>8} {s.shards:>7} {_count(s.shard_rows):>10} "
                   f"{_gib(s.storage_bytes):>10} {_count(s.train_tokens):>13} {s.steps:>8}")
    if plan.tokens_bytes:
        out.append(f"  + token files (tokens/) {_gib(plan.tokens_bytes)}; total {_gib(total_storage)}")
    for s in plan.sources:
        if s.passes > 1:  # fewer tokens cached, more passes over them (docs/storage.md)
            out.append(f"  {s.name}: {s.passes:.2f} passes over {_count(s.rows - s.held_out_rows)} training rows; "
                       f"one pass of {_count(s.train_tokens)} tokens would store "
                       f"{_gib(s.storage_bytes * (s.train_tokens + s.held_out_rows) / s.rows)}")
    out.append("\ntrain (stacks of seeds, dealt round-robin to the workers; each worker holds all its SAEs at once)")
    for ts in plan.train:
        out.append(f"  {ts.source}: {ts.configurations} configurations -> {len(ts.stacks)} stacks on "
                   f"{len(ts.workers)} worker(s); Ray memory= {_gib(ts.request_bytes)} per worker")
        by_conf = itertools.groupby(ts.stacks, key=lambda s: s["configuration"])
        for _, parts in by_conf:
            parts = list(parts)
            sizes = [str(len(p["seeds"])) + (f" (+{p['pilots']} pilot)" if p["pilots"] else "") for p in parts]
            sizes = f"{len(sizes)} x {sizes[0]}" if len(sizes) > 2 and len(set(sizes)) == 1 else " + ".join(sizes)
            out.append(f"    {parts[0]['title']:<44} seeds {sizes:<16} {_gib(parts[0]['bytes']):>10} per stack")
        worst = max(ts.workers, key=lambda w: w.sae_bytes)
        out.append(f"    largest worker: {worst.seeds} SAEs in {worst.stacks} stacks, {_gib(worst.sae_bytes)} of SAE "
                   "state" + (f" + {_gib(worst.lm_bytes)} language model (LM-loss evaluation)" if worst.lm_bytes
                              else ""))
    out.append("\ncompare (one Ray task per seed pair; memory= from the pair's widths and d_in)")
    for i, c in enumerate(plan.compare):
        if i == 0 or plan.compare[i - 1].source != c.source:
            out.append(f"  {c.source}:")
        out.append(f"    {c.title:<44} {c.seeds} seeds, {c.pair_tasks:>3} pairs, {_gib(c.task_bytes):>10} per task")
    out.append(f"  tasks: {plan.tasks['pairs']} pairs, {plan.tasks['chance']} chance baselines, "
               f"{plan.tasks['through_training']} through-training, {plan.tasks['ground_truth']} ground-truth")
    out.append("\nresources requested")
    out += [f"  {stage}: {text}" for stage, text in plan.resources.items()]
    out.append("\ncompute")
    out += [f"  {k:<26} {v:.3g} FLOPs" for k, v in plan.flops.items()]
    out.append(f"  {'total':<26} {flops:.3g} FLOPs"
               + (f" = {plan.device_hours:.3g} device-hours" if plan.device_hours is not None else ""))
    out.append("  assumptions:")
    out += [f"  - {a}" for a in plan.assumptions]
    out += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(out)


def plan_run(cfg: ExperimentConfig) -> RunPlan:
    """Build the plan and refuse it if it cannot fit the resources the config names."""
    plan = build_plan(cfg)
    check_fits(cfg, plan)
    return plan
