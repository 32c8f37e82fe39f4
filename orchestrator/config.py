"""Experiment configuration: one YAML file, parsed into typed pydantic models and validated before any compute.

Every field carries a one-line description; pydantic names the offending field (dotted path) in its errors.
The SAE grid is validated against the architecture registry in `actors.sae`, so adding an architecture
needs no change here.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actors.sae.l1_target import HOLD_FRACTION
from actors.sae import ARCHITECTURES, import_architecture_modules
from actors.store.shards import held_out_rows

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = Field("tiny-gpt-neox", description="Hugging Face Hub id or local folder; a label when `build` is set.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    build: dict[str, Any] | None = Field(
        None, description="transformers config kwargs (with model_type): build the model locally, no download."
    )
    init_seed: int = Field(0, description="torch seed for the weights of a locally built model.")
    random_init_seed: int | None = Field(
        None, description="Random-model control: re-initialise the loaded model's weights with transformers' own "
        "init under this torch seed (a trained model's random-transformer baseline); None: the weights as loaded.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="dtype the model runs in.")
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub; off unless asked.")

    @field_validator("build")
    @classmethod
    def _build_has_model_type(cls, v):
        if v is not None and "model_type" not in v:
            raise ValueError("must contain 'model_type' (e.g. gpt_neox, gpt2, llama)")
        return v


class DatasetConfig(_Strict):
    kind: Literal["synthetic", "hub", "files"] = Field("synthetic", description="Where text comes from.")
    path: str | None = Field(None, description="Hub dataset name (kind=hub) or file glob of .txt/.jsonl/.parquet.")
    name: str | None = Field(None, description="Hub dataset config name.")
    split: str = Field("train", description="Dataset split.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    text_column: str = Field("text", description="Column holding the documents.")
    seed: int = Field(0, description="Seed of the synthetic corpus.")

    @model_validator(mode="after")
    def _path_when_needed(self):
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"dataset.path is required when dataset.kind is '{self.kind}'")
        return self


class GenerateConfig(_Strict):
    hookpoints: list[str] = Field(..., min_length=1, description="Module-name patterns, e.g. 'layers.1.mlp', "
                                  "'layers.*.mlp'; all are captured in one forward pass.")
    ctx_len: int = Field(128, gt=1, description="Tokens per packed chunk (documents joined with EOS).")
    num_tokens: int = Field(..., gt=0, description="Tokens of activations to generate.")
    shard_tokens: int = Field(65536, gt=0, description="Target tokens per Parquet shard (the unit of resumption).")
    batch_size: int = Field(16, gt=0, description="Chunks per forward pass (batch_size x ctx_len tokens).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Storage dtype of activations; bfloat16 is stored as its exact bits.")
    output_uri: str | None = Field(
        None, description="Where shards go: a folder or a pyarrow.fs URI (s3://bucket/prefix, gs://..., "
        "file://...) every node can reach; None: <output_dir>/activations.")
    num_actors: int | None = Field(None, gt=0, description="Model actors in the pool; None: one per GPU in the "
                                   "cluster, else 1.")
    gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per actor; None: 1 if the cluster has GPUs.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per actor (also its torch threads on CPU).")
    device_map: str | None = Field(None, description="transformers device_map (e.g. 'auto') for a model larger "
                                   "than one GPU; give each actor that many GPUs with gpus_per_actor.")
    nonfinite: Literal["fail", "drop"] = Field(
        "fail", description="Activation rows with NaN or inf: fail naming the shard, or drop them (counted).")
    verify: Literal["sha256", "size"] = Field(
        "sha256", description="How a re-run checks the shards it reuses before training: sha256 reads each once "
        "(catches any damage), size only stats them (a damaged byte is then caught when training reads it).")


class PlantedHierarchyConfig(_Strict):
    parents: int = Field(..., gt=0, description="Parent features: the most frequent ones (lowest indices).")
    children_per_parent: int = Field(..., gt=0, description="Child features per parent; they follow the parents in "
                                     "index order, each fires only on tokens where its parent fires.")
    child_probability: float = Field(0.3, gt=0, le=1, description="Probability that a child fires given its parent "
                                     "fires (independently per child).")


class PlantedConfig(_Strict):
    """Activations with a known answer: sparse non-negative combinations of F unit features in d dimensions."""

    hookpoint: str = Field("planted", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                           description="Name of this activation source: it is trained and compared like a hookpoint.")
    num_features: int = Field(256, gt=0, description="F, the number of true features (unit vectors).")
    d: int = Field(64, gt=1, description="Dimension of the activations.")
    num_tokens: int = Field(1_048_576, gt=0, description="Activation rows (tokens) to generate for this source.")
    shard_tokens: int = Field(65536, gt=0, description="Rows per Parquet shard (the unit of resumption).")
    active_per_token: float = Field(4.0, gt=0, description="Mean number of features firing per token.")
    zipf_exponent: float = Field(0.7, ge=0, description="Firing probability of feature i is proportional to "
                                 "(i + 1) ** -zipf_exponent (0: all equally frequent), scaled to active_per_token.")
    max_firing_probability: float = Field(0.5, gt=0, le=1, description="Cap on any feature's firing probability "
                                          "(the scaling is solved with the cap in place).")
    magnitude_min: float = Field(0.5, ge=0, description="Lower end of a firing feature's magnitude, uniform.")
    magnitude_max: float = Field(2.5, gt=0, description="Upper end of a firing feature's magnitude, uniform.")
    noise_std: float = Field(0.05, ge=0, description="Standard deviation of the Gaussian noise added per dimension.")
    hierarchy: PlantedHierarchyConfig | None = Field(
        None, description="Parents that gate children (child fires only with its parent); None: independent features.")
    seed: int = Field(0, description="Seed of the features, probabilities and every shard's rows.")

    @model_validator(mode="after")
    def _consistent(self):
        if self.magnitude_max < self.magnitude_min:
            raise ValueError(f"planted.magnitude_max ({self.magnitude_max}) must be at least planted.magnitude_min "
                             f"({self.magnitude_min})")
        if self.active_per_token > self.num_features * self.max_firing_probability:
            raise ValueError(f"planted.active_per_token ({self.active_per_token}) cannot exceed num_features x "
                             f"max_firing_probability ({self.num_features} x {self.max_firing_probability})")
        h = self.hierarchy
        if h is not None and h.parents * (1 + h.children_per_parent) > self.num_features:
            raise ValueError(f"planted.hierarchy: parents x (1 + children_per_parent) = "
                             f"{h.parents * (1 + h.children_per_parent)} exceeds planted.num_features "
                             f"({self.num_features})")
        return self


class SAEGridConfig(_Strict):
    architecture_modules: list[str] = Field(
        [], description="Python modules imported first (here and in every training worker) that register more "
        "architectures with actors.sae.register; each must be importable on every node.")
    architectures: list[dict[str, Any]] = Field(
        ..., min_length=1, description="Each {name: <registered architecture>, <hyper-parameter>: value or list}."
    )
    widths: list[int] = Field(..., min_length=1, description="Numbers of latents.")
    seeds: list[int] = Field(..., min_length=1, description="Init seeds; every configuration trains each one.")

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, v):
        bad = [w for w in v if w <= 0]
        if bad:
            raise ValueError(f"widths must be positive integers, got {bad}")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("architecture_modules")
    @classmethod
    def _import_architecture_modules(cls, modules):
        import_architecture_modules(modules)  # before `architectures` is checked against the registry
        return modules

    @field_validator("architectures")
    @classmethod
    def _known_architectures(cls, archs):
        for i, spec in enumerate(archs):
            name = spec.get("name")
            if name not in ARCHITECTURES:
                raise ValueError(
                    f"architectures[{i}].name={name!r} is not a registered architecture; "
                    f"allowed: {sorted(ARCHITECTURES)}"
                )
            if "target_l0" in spec and ARCHITECTURES[name].target_l0_controls is None:
                steerable = sorted(n for n, a in ARCHITECTURES.items() if a.target_l0_controls)
                raise ValueError(f"architectures[{i}].target_l0: {name} has no L1 coefficient to calibrate to a "
                                 f"target L0 (its sparsity is set by its own hyper-parameters); target_l0 applies to "
                                 f"{steerable}")
            ARCHITECTURES[name].validate_sweep({k: v for k, v in spec.items() if k != "name"}, where=f"architectures[{i}]")
        return archs


DEEPSPEED_INSTALL = ("DS_BUILD_OPS=0 pip install --no-build-isolation -c constraints.txt -e '.[deepspeed]' "
                     "(docs/deepspeed.md)")


def deepspeed_installed() -> bool:
    """Whether the deepspeed package can be imported here, without importing it (that is slow and probes for GPUs)."""
    return importlib.util.find_spec("deepspeed") is not None


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 replicates everything (plain data "
                                            "parallel), 1 partitions Adam's moments and fp32 master weights over "
                                            "the workers, 2 the gradients too; 3 is refused (docs/deepspeed.md).")
    reduce_bucket_size: int = Field(50_000_000, gt=0, description="Elements per gradient-reduction bucket "
                                    "(ZeRO 1-2): larger is fewer, bigger messages and more memory.")
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with the backward pass (ZeRO 1-2).")

    @field_validator("zero_stage")
    @classmethod
    def _not_stage_3(cls, v):
        if v == 3:
            raise ValueError("zero_stage 3 is not supported; allowed: 0, 1, 2. Stage 3 partitions the weights, but an "
                             "SAE is one layer that is gathered whole for every forward and backward pass, so it "
                             "saves no peak memory over stage 2 (and DeepSpeed does not re-gather the decoder for "
                             "the backward pass of an SAE's output)")
        return v


class TrainConfig(_Strict):
    backend: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch: configurations dealt over the workers, each SAE trained on one; deepspeed: one "
        "SAE at a time, data-parallel over all workers (each takes a slice of every batch), for SAEs too wide for one "
        "device's memory (optional extra, docs/deepspeed.md).")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig,
                                       description="DeepSpeed settings; used with backend: deepspeed.")
    batch_size: int = Field(1024, gt=0, description="Activation vectors (tokens) per step.")
    tokens: int | None = Field(None, gt=0, description="Training tokens per SAE; None: one pass over the activations.")
    data_seed: int = Field(0, description="Seed of the batch order; the same for every init seed.")
    shuffle_buffer_tokens: int = Field(65536, ge=0, description="Rows carried from shard to shard and shuffled "
                                       "with the next one (0: shuffle within each shard only).")
    lr: float | None = Field(None, gt=0, description="Learning rate; None: the architecture's recipe.")
    warmup_steps: int = Field(1000, ge=0, description="Linear lr warm-up steps, then linear decay to 0; the default "
                              "is sparsify's recipe (1,000), cut to half the run where a run is under 2,000 steps.")
    eval_tokens: int = Field(65536, gt=0, description="Held-out activation rows (the tail of each source in manifest "
                             "order, at most an eighth of it, the same for every seed) that no SAE trains on; FVU, L0 "
                             "and dead fraction are measured on them.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    dead_window_tokens: int | None = Field(
        None, gt=0, description="A latent not firing for this many tokens is dead; None: min(10M, tokens/5)."
    )
    checkpoint_tokens: list[int] = Field(
        default_factory=list, description="Training tokens at which an intermediate SAE is saved (overlap through "
        "training, e.g. log-spaced); the final SAE is always saved.")
    lm_eval_chunks: int = Field(8, ge=0, description="Token chunks on which the LM loss with each SAE spliced in "
                                "is measured (delta CE, CE recovered); 0 turns it off.")
    state_every_tokens: int | None = Field(
        None, gt=0, description="Training tokens between checkpoints of the full training state, from which a "
        "failed worker resumes; None: a tenth of the budget. At least one batch.")
    max_failures: int = Field(3, ge=-1, description="Worker failures Ray Train recovers from by restarting the "
                              "workers from the last training state; -1: unlimited, 0: fail at once.")
    stack_seeds: bool = Field(True, description="Train the seeds of a configuration as one stack: parameters stacked "
                              "so one batched matmul serves all seeds on each batch; each seed's weights are those it "
                              "gets trained alone (bitwise on CPU). Off: seed by seed.")
    max_stack_bytes: int = Field(8 * 2**30, gt=0, description="Estimated memory (weights, gradients, Adam moments, "
                                 "batch activations) one stack of seeds may use; a configuration whose seeds need more "
                                 "is split into several stacks, which the train stage deals to different workers.")
    target_l0_hold_fraction: float = Field(
        HOLD_FRACTION, ge=0, lt=1, description="Final fraction of training in which an L1 coefficient steered to a target L0 "
        "is held fixed (actors/train/calibration.py), so each such SAE ends as a fixed-coefficient SAE.")
    log_every: int = Field(50, gt=0, description="Steps between metric reports.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers; configurations are split across them "
                             "(backend deepspeed: every SAE is trained across all of them).")
    cpus_per_worker: int = Field(1, gt=0, description="CPUs (and torch threads) per training worker.")
    use_gpu: bool | None = Field(None, description="Train on GPU; None: when the cluster has one.")

    @field_validator("checkpoint_tokens")
    @classmethod
    def _increasing_checkpoints(cls, v):
        if any(t <= 0 for t in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"checkpoint_tokens must be positive and strictly increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _state_every_whole_batch(self):
        # Below one batch every step would write the whole training state.
        if self.state_every_tokens is not None and self.state_every_tokens < self.batch_size:
            raise ValueError(f"train.state_every_tokens ({self.state_every_tokens}) must be at least one batch "
                             f"(train.batch_size = {self.batch_size})")
        return self

    @model_validator(mode="after")
    def _deepspeed_usable(self):
        if self.backend != "deepspeed":
            return self
        if not deepspeed_installed():
            raise ValueError(f"train.backend=deepspeed needs the deepspeed package, which is not installed: "
                             f"{DEEPSPEED_INSTALL}; or set train.backend=torch")
        if self.stack_seeds:
            raise ValueError("train.stack_seeds must be false with train.backend=deepspeed: that backend trains one "
                             "SAE at a time across all workers (seed after seed)")
        if self.batch_size % self.num_workers:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.num_workers "
                             f"({self.num_workers}) with train.backend=deepspeed: each worker takes an equal slice "
                             "of every batch")
        if self.state_every_tokens is not None:
            raise ValueError("train.state_every_tokens is not supported with train.backend=deepspeed: it writes no "
                             "mid-run training state (a failed worker group retrains the SAE it was on); leave it "
                             "unset")
        return self


class CompareConfig(_Strict):
    threshold: float = Field(0.7, ge=-1, le=1, description="Cosine above which a matched latent counts as shared.")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs reserved by each pair-matching Ray task (the "
                                 "certified matcher runs that many candidate lanes, at most 4: docs/matching.md).")
    ground_truth_threshold: float = Field(0.9, gt=-1, lt=1, description="Decoder-row cosine above which a latent "
                                          "counts as a true feature (sources with a ground truth only).")


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else SQLite in the output folder.")
    experiment_name: str | None = Field(None, description="MLflow experiment; None: the config's name.")


class RayConfig(_Strict):
    address: str | None = Field(None, description="Cluster address; None: RAY_ADDRESS or a new local instance.")
    num_cpus: int | None = Field(None, gt=0, description="Logical CPUs of a new local instance.")
    object_store_memory_mb: int = Field(512, gt=64, description="Object store of a new local instance, MiB.")
    dashboard_host: str = Field("127.0.0.1", description="Interface the dashboard of a new local instance binds to.")
    bind_address: str | None = Field("127.0.0.1", description="Address every service of a new local instance "
                                     "listens on: 127.0.0.1 (loopback only), a node IP, or null for Ray's default "
                                     "(the node's network address; some services on all interfaces).")

    @field_validator("bind_address")
    @classmethod
    def _an_address_of_this_machine(cls, v):
        import ipaddress

        if v is None or v == "localhost":
            return v
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address; allowed: 127.0.0.1, an IP of this machine, or null") from None
        if ip.is_unspecified:
            raise ValueError(f"{v} is not one address; use null for Ray's default binding")
        return v


class PlanConfig(_Strict):
    """What `sae-seeds plan` (and the plan `sae-seeds run` prints first) sizes the run against; changes no result."""

    transformers_config: str | None = Field(
        None, description="A transformers config.json the plan builds the model's module tree from (on the meta "
        "device) instead of fetching the model's own, e.g. a vendored copy; relative to the YAML file. The run "
        "itself always loads the model's own config.")
    node_memory_gib: float | None = Field(None, gt=0, description="Memory of one node that runs pair-matching "
                                          "tasks and CPU training workers, GiB: a pair or worker estimated to need "
                                          "more is refused before anything starts; None: not checked.")
    gpu_memory_gib: float | None = Field(None, gt=0, description="Memory of one GPU, GiB: a GPU training worker "
                                         "whose SAEs are estimated to need more is refused; None: not checked.")
    device_tflops: float | None = Field(None, gt=0, description="Sustained TFLOP/s of one GPU (one CPU worker "
                                        "without GPUs) for the plan's time estimate; None: FLOPs only.")


class ExperimentConfig(_Strict):
    name: str = Field(..., min_length=1, description="Experiment name (MLflow experiment, output folder).")
    output_dir: str | None = Field(None, description="Where artifacts go; None: outputs/<name>.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    generate: GenerateConfig
    planted: PlantedConfig | None = Field(None, description="A planted-feature activation source with a known "
                                          "answer, trained and compared beside the model's hookpoints; None: none.")
    sae: SAEGridConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig, description="What the run is sized against (docs/planning.md).")

    @model_validator(mode="after")
    def _grid_fits_widths(self):
        for i, spec in enumerate(self.sae.architectures):
            arch = ARCHITECTURES[spec["name"]]
            for width in self.sae.widths:
                for params in arch.expand_sweep({k: v for k, v in spec.items() if k != "name"}):
                    problem = arch.check_width(params, width)
                    if problem:
                        raise ValueError(f"sae.architectures[{i}] with width {width}: {problem}")
        if self.train.backend == "deepspeed":
            for i, spec in enumerate(self.sae.architectures):
                arch = ARCHITECTURES[spec["name"]]
                for params in arch.expand_sweep({k: v for k, v in spec.items() if k != "name"}):
                    problem = arch.check_data_parallel(params)
                    if problem:
                        raise ValueError(f"sae.architectures[{i}] cannot train with train.backend=deepspeed: "
                                         f"{problem}")
        g = self.generate
        if g.num_tokens < g.ctx_len:
            raise ValueError(f"generate.num_tokens ({g.num_tokens}) is smaller than one chunk of generate.ctx_len "
                             f"({g.ctx_len}) tokens; raise generate.num_tokens or lower generate.ctx_len")
        for source, budget in self.source_tokens.items():
            if self.train.batch_size > budget:
                what = ("train.tokens" if self.train.tokens else
                        f"one pass over generate.num_tokens = {g.num_tokens // g.ctx_len} chunks of {g.ctx_len}, "
                        "less the rows held out for evaluation" if source == "model" else
                        "one pass over planted.num_tokens, less the rows held out for evaluation")
                raise ValueError(f"train.batch_size ({self.train.batch_size}) is larger than the training budget of "
                                 f"{budget} tokens ({what}): not one step could run; lower train.batch_size or give "
                                 "more tokens")
        budget = max(self.source_tokens.values())
        late = [t for t in self.train.checkpoint_tokens if t >= budget]
        if late:
            raise ValueError(f"train.checkpoint_tokens {late} must be below the training budget of {budget} tokens "
                             "(the largest over the activation sources: train.tokens, else one pass over a source's "
                             "rows less those held out for evaluation); the final SAE is saved anyway, and a source "
                             "with a smaller budget skips the checkpoints beyond its own")
        if self.planted is not None and self.planted.hookpoint in self.generate.hookpoints:
            raise ValueError(f"planted.hookpoint {self.planted.hookpoint!r} is also in generate.hookpoints; "
                             "give the planted source another name")
        return self

    @property
    def source_tokens(self) -> dict[str, int]:
        """Training tokens per SAE of each activation source ('model': the hookpoints; the planted source by its
        name): `train.tokens`, else one pass over that source's activations."""
        def one_pass(rows):
            return rows - held_out_rows(rows, self.train.eval_tokens)

        rows = (self.generate.num_tokens // self.generate.ctx_len) * self.generate.ctx_len
        out = {"model": self.train.tokens or one_pass(rows)}
        if self.planted is not None:
            out[self.planted.hookpoint] = self.train.tokens or one_pass(self.planted.num_tokens)
        return out

    @property
    def train_tokens(self) -> int:
        """Training tokens per SAE of the model's hookpoints: `train.tokens`, else one pass over the generated
        activations less the rows held out for evaluation."""
        return self.source_tokens["model"]

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir or f"outputs/{self.name}").resolve()

    def content_hash(self) -> str:
        """Hash of everything that decides the results (not where they go or how they are tracked)."""
        data = self.model_dump(exclude={"output_dir": True, "tracking": True, "ray": True, "plan": True,
                                      "generate": {"verify"}})  # how reuse is checked changes no result
        if self.train.backend == "torch":  # hashes from before the backend setting existed stay valid
            data["train"] = {k: v for k, v in data["train"].items() if k not in ("backend", "deepspeed")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line L, column C: problem' from a YAML error (1-based, as editors count)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if getattr(err, "context", None) and getattr(err, "problem", None):
        problem = f"{problem} ({err.context})"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _apply_override(data: dict, assignment: str) -> str:
    """Apply one `--set dotted.key=value`; returns the dotted key."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. --set sae.widths=[64,128]")
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[:i + 1])} is not a section")
    try:  # YAML parses the value so that numbers, booleans and lists get their types
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML: {_yaml_problem(err)}") from None
    return key


def _format_errors(err: ValidationError, set_by: dict[str, str] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        origin = next((a for k, a in (set_by or {}).items() if loc == k or loc.startswith(k + ".")), None)
        where = f" (from --set {origin!r})" if origin else ""
        lines.append(f"  {loc}: {msg}{where}" if loc else f"  {msg}{where}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                output_dir: str | None = None) -> ExperimentConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    plan = data.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("transformers_config"), str):
        plan["transformers_config"] = str((path.parent / Path(plan["transformers_config"]).expanduser()).resolve())
    return parse_config(data, overrides, output_dir)


def parse_config(data: dict, overrides: list[str] | None = None, output_dir: str | None = None) -> ExperimentConfig:
    data = copy.deepcopy(data)
    set_by = {_apply_override(data, assignment): assignment for assignment in overrides or []}
    if output_dir:
        data["output_dir"] = output_dir
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, set_by)) from None
