"""A third-party dataset for the architecture tests: tiny generated images, and a line
in ``$FEWBENCH_COUNT_FILE`` (process id, event) each time the dataset is checked
(``split_sizes``, what grid expansion's data check calls) or loaded (``load``, what a
worker calls). It imports only fewbench's public modules."""

from __future__ import annotations

import os

import torch

from fewbench.plugin import ClassPool, Dataset, Param, SplitSize, hookimpl

CLASSES, EXAMPLES = 6, 8


def _count(event: str) -> None:
    path = os.environ.get("FEWBENCH_COUNT_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {event}\n")


class Counted(Dataset):
    name = "counted"
    description = "Generated 4x4 images; counts checks and loads"
    params = {"variant": Param(0, help="distinct configurations")}
    needs_files = False

    def split_sizes(self, root):
        _count("split_sizes")
        return {split: SplitSize(CLASSES, EXAMPLES) for split in ("train", "val", "test")}

    def load(self, root, cache_dir):
        _count("load")
        sources = {}
        for i, split in enumerate(("train", "val", "test")):
            generator = torch.Generator().manual_seed(i)
            images = torch.randint(
                0, 256, (CLASSES, EXAMPLES, 1, 4, 4), dtype=torch.uint8, generator=generator
            )
            sources[split] = ClassPool(images)
        return sources


@hookimpl
def fewbench_register_datasets(register):
    register(Counted)
