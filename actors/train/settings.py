"""What a training worker is told: the validated `train` config as frozen dataclasses.

The train stage builds them once from `orchestrator.config.TrainConfig` (orchestrator/stages/train.py,
`train_settings`), where every default and every full description lives; here nothing has a default, so a worker
can never fall back on a value of its own. Plain frozen dataclasses: Ray pickles them into the workers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeepSpeedSettings:
    """`train.deepspeed`: ZeRO settings of the DeepSpeed backend."""

    zero_stage: int
    """ZeRO stage: 0 none, 1 Adam's moments partitioned, 2 gradients too."""
    reduce_bucket_size: int
    """Elements per gradient all-reduce bucket."""
    overlap_comm: bool
    """Overlap the gradient reduction with the backward pass."""


@dataclass(frozen=True)
class TrainSettings:
    """`train` as the workers use it, plus what the stage derives for them (reuse key, model trust)."""

    batch_size: int
    """Activation vectors (tokens) per step."""
    tokens: int | None
    """Training tokens per SAE; None: one pass over the training rows."""
    data_seed: int
    """Seed of the batch order; the same for every init seed."""
    shuffle_buffer_tokens: int
    """Rows carried from shard to shard and shuffled with the next one."""
    lr: float | None
    """Learning rate; None: the architecture's recipe."""
    warmup_steps: int
    """Linear lr warm-up steps (at most half the run), then linear decay to 0."""
    eval_tokens: int
    """Held-out rows (the tail of each source) on which every SAE is evaluated."""
    grad_clip: float
    """Gradient-norm clip."""
    dead_window_tokens: int | None
    """Tokens without firing after which a latent is dead; None: min(10M, tokens/5)."""
    checkpoint_tokens: tuple[int, ...]
    """Training tokens at which an intermediate SAE is saved (those this source reaches)."""
    lm_eval_chunks: int
    """Token chunks for the spliced-in LM loss; 0: none."""
    state_every_tokens: int | None
    """Training tokens between full training-state checkpoints; None: a tenth of the budget."""
    stack_seeds: bool
    """Train the seeds of a configuration as one stack."""
    max_stack_bytes: int
    """Estimated memory one stack of seeds may use."""
    target_l0_hold_fraction: float
    """Final fraction of training in which a steered L1 coefficient is held fixed."""
    log_every: int
    """Steps between metric reports."""
    deepspeed: DeepSpeedSettings
    """DeepSpeed backend settings."""
    train_hash: str | None
    """Reuse key of the SAEs (saved in cfg.json and training states); None outside the pipeline."""
    trust_remote_code: bool
    """Whether the LM-loss evaluation may run the model repository's own code."""

    def state_every_steps(self, num_steps: int) -> int:
        """Steps between training-state checkpoints: `state_every_tokens` in whole batches (at least one)."""
        return max(1, (self.state_every_tokens or num_steps * self.batch_size // 10) // self.batch_size)
