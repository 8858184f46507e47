"""Features of a frozen backbone, computed once per split and kept in the cache folder.

A learner that classifies the features of a backbone that no longer changes (SimpleShot, the
probes, the transductive methods on given ``weights``) would embed every example of every
episode again: 600 test episodes of 20-way 5-shot are 240,000 forward passes, over a test
split of 33,840 Omniglot images. Instead the features of every example of the split are
computed once, stored as ``float32[classes, examples, D]`` in
``CACHE/features/<key>.npy``, memory-mapped, and an episode's features are looked up by the
indices its :class:`~fewbench.plugin.dataset.ClassPool` drew.

The key is a digest of everything the features depend on: the network (its architecture and
every value of its state: the weights file, whatever trained it), the split's examples (their
bytes, the per-channel normalisation, the class sizes: so the dataset, its split and the
resolution), and this module's format. Any change gives another key, so a stale table is never
read; tables are written atomically and checked for their shape on reading.

Only a network whose output for an example depends on that example alone can be looked up: in
eval mode, with batch norms that keep running statistics (or none). A network that normalises
with the batch at hand (``batch_norm: batch``) gets ``None``, and the learner embeds as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewbench.storage.atomic import write_atomically

FORMAT = "fewbench-features/1"
BATCH = 512  # examples per forward pass when a table is computed


def per_example(module: nn.Module) -> bool:
    """Whether ``module``'s output for an example depends on that example alone in eval mode:
    every batch norm keeps running statistics."""
    return all(
        m.track_running_stats
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )


def module_digest(module: nn.Module) -> str:
    """A digest of a network: its architecture (``repr``) and every tensor of its state."""
    digest = hashlib.sha256(FORMAT.encode())
    digest.update(repr(module).encode())
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        tensor = value.detach().cpu().contiguous().reshape(-1)  # 0-dim counters too
        digest.update(str((tuple(value.shape), str(tensor.dtype))).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def pool_digest(pool: Any) -> str:
    """A digest of a split's examples (``ClassPool``: bytes, normalisation, class sizes), kept
    on the pool so it is computed once per process."""
    known = getattr(pool, "_feature_cache_digest", None)
    if known is not None:
        return known
    digest = hashlib.sha256(type(pool).__name__.encode())
    images = pool.images.detach().cpu().contiguous()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    for extra in (pool.mean, pool.std, pool.counts):
        digest.update(b"-" if extra is None else extra.detach().cpu().numpy().tobytes())
    value = digest.hexdigest()
    pool._feature_cache_digest = value
    return value


def _batches(pool: Any) -> Iterator[Tensor]:
    """Every stored example of the pool, scaled as episodes hold them, class by class."""
    classes, stored = pool.images.shape[:2]
    flat = pool.images.reshape(classes * stored, *pool.images.shape[2:])
    for begin in range(0, len(flat), BATCH):
        yield pool._scale(flat[begin : begin + BATCH])


class FeatureCache:
    """Tables of a frozen network's features, in ``folder`` (None: in memory only)."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.tables: dict[str, np.ndarray] = {}

    # For plugins, which reach this class through LearnerContext.feature_cache only.
    digest = staticmethod(module_digest)

    def episode_features(
        self, module: nn.Module, module_key: str, episodes: Any
    ) -> tuple[Tensor, Tensor] | None:
        """Support ``[T, N*K, D]`` and query ``[T, N*Q, D]`` features of ``episodes`` as
        ``module`` (whose :func:`module_digest` is ``module_key``) computes them one example at a
        time, from the table of the episodes' pool; None when they cannot be looked up (episodes
        not drawn by a pool, or a network that normalises with the batch)."""
        pool, indices = getattr(episodes, "origin", None), getattr(episodes, "indices", None)
        if (
            pool is None
            or indices is None
            or not hasattr(pool, "images")
            or not per_example(module)
        ):
            return None
        table = self.table(module, module_key, pool)
        classes = indices.classes.cpu().numpy()
        examples = indices.examples.cpu().numpy()
        picked = torch.from_numpy(np.ascontiguousarray(table[classes[:, :, None], examples]))
        count, ways, per_class, width = picked.shape
        shots = episodes.support_x.shape[1] // ways
        device = episodes.support_x.device
        support = picked[:, :, :shots].reshape(count, ways * shots, width)
        query = picked[:, :, shots:].reshape(count, ways * (per_class - shots), width)
        return support.to(device), query.to(device)

    def table(self, module: nn.Module, module_key: str, pool: Any) -> np.ndarray:
        """``float32[classes, examples, D]``: read, or computed and written."""
        key = hashlib.sha256(f"{FORMAT}|{module_key}|{pool_digest(pool)}".encode()).hexdigest()
        if key in self.tables:
            return self.tables[key]
        path = self.folder / f"{key[:32]}.npy" if self.folder is not None else None
        shape = tuple(pool.images.shape[:2])
        table = None
        if path is not None and path.is_file():
            try:
                table = np.load(path, mmap_mode="r")
            except (OSError, ValueError):
                table = None
            if table is not None and (table.ndim != 3 or table.shape[:2] != shape):
                table = None  # not what this key stores: computed again
        if table is None:
            table = self.compute(module, pool)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(path, lambda out: np.save(out, table))
        self.tables[key] = table
        return table

    @staticmethod
    @torch.no_grad()
    def compute(module: nn.Module, pool: Any) -> np.ndarray:
        """Every stored example of ``pool`` through ``module`` in eval mode, on its device."""
        was_training = module.training
        module.eval()
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        try:
            parts = [module(batch.to(device)).float().cpu() for batch in _batches(pool)]
        finally:
            module.train(was_training)
        features = torch.cat(parts)
        return features.reshape(*pool.images.shape[:2], -1).numpy()
