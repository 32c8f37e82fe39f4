"""One SAE's trainer: its optimizer, learning-rate schedule and the running state its metrics need."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..sae import ARCHITECTURES, SparseAutoencoder
from .settings import TrainSettings
from .train_state import SAEState, pack, unpack


class BatchDigest:
    """SHA-256 chained over the batches (h = sha256(h || batch)): which data an SAE saw, in which order.

    Unlike a running hashlib object, its whole state is the current 32-byte value, so a run resumed from a
    checkpoint ends with the digest of an uninterrupted one."""

    def __init__(self, value: str | None = None):
        self.value = bytes.fromhex(value) if value else bytes(32)

    def update(self, data: bytes) -> None:
        h = hashlib.sha256(self.value)
        h.update(data)
        self.value = h.digest()

    def hexdigest(self) -> str:
        return self.value.hex()


@dataclass
class SAETrainer:
    """One SAE, its optimizer and schedule, and the running state its metrics need."""

    job: dict
    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float
    dead_window: int  # tokens without firing after which a latent is dead
    last_fired: torch.Tensor  # tokens seen when each latent last fired
    digest: BatchDigest = field(default_factory=BatchDigest)
    tokens_seen: int = 0
    initialised: bool = False

    def step(self, x: torch.Tensor) -> dict[str, float]:
        self.digest.update(x.detach().cpu().numpy().tobytes())
        return self.train_on(x)

    def train_on(self, x: torch.Tensor, **forward_inputs) -> dict[str, float]:
        """The step without the digest (a stack of seeds hashes each batch once for all of them); `forward_inputs`
        go to the SAE's forward (a stack passes the TopK family its precomputed encoder outputs)."""
        if not self.initialised:
            self.sae.init_from_batch(x)
            self.initialised = True
        self.sae.dead_mask = (self.tokens_seen - self.last_fired) >= self.dead_window
        out = self.sae(x, **forward_inputs)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.sae.after_optimizer_step()
        self.tokens_seen += x.shape[0]
        self.last_fired[out.fired] = self.tokens_seen
        return {"loss": out.loss.item(), "fvu": out.fvu.item(), "l0": out.l0.item()}

    def state(self) -> SAEState:
        """Everything that decides the rest of this SAE's training. Architectures keep their training state
        (e.g. BatchTopK's threshold) in buffers, so the state dict covers it."""
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()} | {"last_fired": self.last_fired}
        meta = {"optimizer": pack(self.optimizer.state_dict(), tensors, "optimizer"),
                "scheduler": pack(self.scheduler.state_dict(), tensors, "scheduler"),
                "digest": self.digest.hexdigest(), "tokens_seen": self.tokens_seen, "initialised": self.initialised}
        return tensors, meta

    def load_state(self, state: SAEState) -> None:
        tensors, meta = state
        device = self.last_fired.device
        self.sae.load_state_dict({k.removeprefix("sae."): v for k, v in tensors.items() if k.startswith("sae.")})
        self.optimizer.load_state_dict(unpack(meta["optimizer"], tensors))
        self.scheduler.load_state_dict(unpack(meta["scheduler"], tensors))
        self.last_fired = tensors["last_fired"].to(device)
        self.digest = BatchDigest(meta["digest"])
        self.tokens_seen, self.initialised = meta["tokens_seen"], meta["initialised"]


def build_trainer(job: dict, d_in: int, num_steps: int, settings: TrainSettings, device: torch.device) -> SAETrainer:
    arch = ARCHITECTURES[job["architecture"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job["seed"])  # the init seed: the only thing that differs between seeds
        sae = arch(d_in, job["width"], arch.Params.model_validate(job["params"]))
    sae = sae.to(device)
    lr = effective_lr(job, settings)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=arch.adam_betas, fused=use_fused_adam(sae, device))
    scheduler = lr_schedule(optimizer, settings.warmup_steps, num_steps)
    return SAETrainer(job=job, sae=sae, optimizer=optimizer, scheduler=scheduler, grad_clip=settings.grad_clip,
                      dead_window=dead_window_tokens(settings.dead_window_tokens, num_steps * settings.batch_size),
                      last_fired=torch.zeros(job["width"], dtype=torch.long, device=device))


def effective_lr(job: dict, settings: TrainSettings) -> float:
    """The learning rate an SAE trains with: its architecture's own `lr` hyper-parameter where it has one, else
    `train.lr`, else the architecture's recipe."""
    return job["params"].get("lr") or settings.lr or ARCHITECTURES[job["architecture"]].recipe_lr(job["width"])


FUSED_ADAM_MIN_NUMEL = 1 << 16


def use_fused_adam(sae: torch.nn.Module, device: torch.device) -> bool:
    """torch's fused Adam updates each tensor in one pass; the default loop of elementwise ops allocates and rereads
    [n, d] temporaries, a quarter of a large CPU step. Small SAEs keep the default: the fused CPU kernel opens a
    parallel region per tensor whatever its size, and on oversubscribed cores each region waits a scheduler slice
    (95 ms per step measured for a width-96 SAE with 2 threads on a loaded 2-core box)."""
    largest = max(p.numel() for p in sae.parameters())
    return device.type == "cuda" or (device.type == "cpu" and largest >= FUSED_ADAM_MIN_NUMEL)


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                num_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up (`warmup_steps`, at most half the run), then linear decay to 0 at the last step."""
    warmup = max(1, min(warmup_steps, num_steps // 2))
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup),
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0,
                                          total_iters=max(1, num_steps - warmup)),
    ], milestones=[warmup])


def dead_window_tokens(configured: int | None, tokens: int) -> int:
    """A latent is dead after this many tokens without firing: the `configured` window (`train.dead_window_tokens`),
    else min(10M, tokens/5) of a run of `tokens`."""
    return configured or max(1, min(10_000_000, tokens // 5))
