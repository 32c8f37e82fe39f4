"""The activation stream every seed of a configuration trains on: same batches, same order.

Order depends only on the manifest and `data_seed`: per epoch, shards are visited in a seeded permutation and
each shard's rows in a seeded permutation; batches run across shard boundaries. Memory holds one shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .activations import read_activations


class ActivationStream:
    def __init__(self, root: str | Path, shards: list[dict], batch_size: int, data_seed: int, total_tokens: int,
                 scale: float = 1.0):
        self.root, self.shards = Path(root), shards
        self.batch_size, self.data_seed, self.scale = batch_size, data_seed, scale
        self.num_steps = total_tokens // batch_size
        if self.num_steps == 0:
            raise ValueError(f"train.tokens ({total_tokens}) is smaller than one batch ({batch_size})")

    def __len__(self) -> int:
        return self.num_steps

    def _epoch(self, epoch: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.data_seed, epoch])
        for shard_idx in rng.permutation(len(self.shards)):
            shard = self.shards[shard_idx]
            acts = read_activations(self.root / shard["path"], shard.get("sha256"))
            yield acts[rng.permutation(len(acts))]

    def __iter__(self) -> Iterator[np.ndarray]:
        emitted, epoch = 0, 0
        buffer = np.empty((0, 0), dtype=np.float32)
        while True:
            for rows in self._epoch(epoch):
                buffer = rows if buffer.size == 0 else np.concatenate([buffer, rows])
                while len(buffer) >= self.batch_size:
                    batch, buffer = buffer[: self.batch_size], buffer[self.batch_size:]
                    yield batch * self.scale if self.scale != 1.0 else batch
                    emitted += 1
                    if emitted == self.num_steps:
                        return
            epoch += 1
