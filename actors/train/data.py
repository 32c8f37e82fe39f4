"""The activation stream every seed of a configuration trains on: same batches, same order.

Order depends only on the manifest, `data_seed` and the shuffle-buffer size: per epoch, shards are visited in a
seeded permutation; each shard's rows join the rows carried over in the shuffle buffer, the pool is permuted
with the seeded generator, and batches are taken from it, keeping `shuffle_buffer` rows back to mix with the
next shard. Batches run across shard and epoch boundaries. The next shard is read (and its checksum checked)
on a background thread while the current one is consumed, so the trainer, not the reader, sets the pace.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..store.shards import read_activations
from ..store.storage import ActivationStore


def split_held_out(shards: list[dict], held_out: int) -> tuple[list[dict], list[dict]]:
    """(training shards, held-out shards): the last `held_out` rows in manifest order are held out, the same rows
    for every seed and architecture. A shard cut in two appears in both with a row range (`row_start`,
    `row_stop`), which `read_rows` honours; `rows` counts the rows of each part."""
    train, held, remaining = [], [], held_out
    for shard in reversed(shards):
        take = min(remaining, shard["rows"])
        remaining -= take
        if take:
            held.insert(0, shard | {"row_start": shard["rows"] - take, "rows": take})
        if take < shard["rows"]:
            train.insert(0, shard | ({"row_stop": shard["rows"] - take, "rows": shard["rows"] - take} if take else {}))
    return train, held


def read_rows(store: ActivationStore, shard: dict) -> np.ndarray:
    """A shard's rows (checksum checked), cut to its row range when `split_held_out` gave it one."""
    rows = read_activations(store, shard["path"], shard.get("sha256"))
    if "row_start" in shard or "row_stop" in shard:
        rows = rows[shard.get("row_start", 0):shard.get("row_stop")]
    return rows


class ActivationStream:
    def __init__(self, root: str, shards: list[dict], batch_size: int, data_seed: int, total_tokens: int,
                 scale: float = 1.0, shuffle_buffer: int = 0):
        self.store, self.shards = ActivationStore(root), shards
        self.batch_size, self.data_seed, self.scale = batch_size, data_seed, scale
        # A buffer as large as the data would only grow the carried pool, epoch after epoch.
        self.shuffle_buffer = min(shuffle_buffer, max(0, sum(s["rows"] for s in shards) - batch_size))
        self.num_steps = total_tokens // batch_size
        if self.num_steps == 0:
            raise ValueError(f"train.tokens ({total_tokens}) is smaller than one batch ({batch_size})")

    def __len__(self) -> int:
        return self.num_steps

    def _read(self, shard: dict) -> np.ndarray:
        return read_rows(self.store, shard)

    def _shards(self, order: np.ndarray) -> Iterator[np.ndarray]:
        """The shards in `order`, each read while the previous one is being consumed."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-reader") as pool:
            pending = pool.submit(self._read, self.shards[order[0]])
            for i in range(len(order)):
                rows = pending.result()
                if i + 1 < len(order):
                    pending = pool.submit(self._read, self.shards[order[i + 1]])
                yield rows

    def __iter__(self) -> Iterator[np.ndarray]:
        emitted, epoch = 0, 0
        carry = None
        while True:
            rng = np.random.default_rng([self.data_seed, epoch])
            for rows in self._shards(rng.permutation(len(self.shards))):
                pool = rows if carry is None or len(carry) == 0 else np.concatenate([carry, rows])
                pool = pool[rng.permutation(len(pool))]
                usable = max(0, len(pool) - self.shuffle_buffer) // self.batch_size * self.batch_size
                for start in range(0, usable, self.batch_size):
                    batch = pool[start:start + self.batch_size]
                    yield batch * self.scale if self.scale != 1.0 else batch
                    emitted += 1
                    if emitted == self.num_steps:
                        return
                carry = pool[usable:]
            epoch += 1
