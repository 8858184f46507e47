"""``shapes_example``: a small few-shot image dataset drawn from a seeded generator.

Each class is a glyph of two to four strokes (straight polylines and circular arcs),
drawn at random by ``numpy.random.default_rng([seed, class])``; each of its examples is
that glyph under a random rotation, scaling, shift and stroke width, rendered
anti-aliased into a 1x28x28 image, so a class looks like a handwritten character and
its examples like different hands writing it. The first ``train_classes`` classes are
the training split, the next ``val_classes`` the validation split and the last
``test_classes`` the test split: no class is seen in two splits.

Nothing is downloaded and nothing is stored (``needs_files = False``, like the built-in
``sinusoid``): the images take milliseconds to draw, and the same parameters draw the
same images on every machine, so the core's fixed validation and test episodes are as
reproducible as for a dataset on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewbench.plugin import CLASSIFICATION, ClassPool, Dataset, EpisodeSource, Param, SplitSize

SIZE = 28  # image side, pixels
ARC_SEGMENTS = 6  # an arc is drawn as this many straight segments


def draw_glyph(rng: np.random.Generator) -> np.ndarray:
    """One class's strokes as line segments ``[S, 2 (ends), 2 (x, y)]`` in [-0.7, 0.7]^2."""
    segments = []
    for _ in range(rng.integers(2, 5)):
        if rng.random() < 0.5:  # a polyline of one or two straight segments
            points = rng.uniform(-0.7, 0.7, size=(rng.integers(2, 4), 2))
        else:  # a circular arc
            radius = rng.uniform(0.2, 0.5)
            centre = rng.uniform(-0.7 + radius, 0.7 - radius, size=2)
            start = rng.uniform(0, 2 * np.pi)
            sweep = rng.uniform(0.5 * np.pi, 1.8 * np.pi)
            angles = start + sweep * np.linspace(0, 1, ARC_SEGMENTS + 1)
            points = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        segments.extend(zip(points[:-1], points[1:], strict=True))
    return np.array(segments)


def render(segments: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distorted drawings of one glyph, ``uint8[count, 1, SIZE, SIZE]``."""
    angle = rng.uniform(-0.3, 0.3, size=count)
    scale = rng.uniform(0.85, 1.1, size=count)
    shift = rng.uniform(-0.12, 0.12, size=(count, 1, 1, 2))
    width = rng.uniform(0.9, 1.7, size=(count, 1, 1))  # half the stroke width, pixels
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    transform = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [C, 2, 2]
    ends = np.einsum("cij,sej->csei", transform, segments) + shift  # [C, S, 2, 2]
    ends = (ends + 1) / 2 * (SIZE - 1)  # to pixel coordinates
    a, b = ends[:, :, None, 0], ends[:, :, None, 1]  # [C, S, 1, 2]
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="xy"), -1)
    pixels = grid.reshape(1, 1, -1, 2).astype(float)  # [1, 1, P, 2]
    # Distance from each pixel centre to each segment: project onto it, clamp to its ends.
    direction = b - a
    t = ((pixels - a) * direction).sum(-1) / np.maximum((direction**2).sum(-1), 1e-9)
    nearest = a + np.clip(t, 0, 1)[..., None] * direction
    distance = np.sqrt(((pixels - nearest) ** 2).sum(-1)).min(axis=1)  # [C, P]
    ink = np.clip(width[:, 0] + 0.5 - distance, 0, 1)  # anti-aliased edge one pixel wide
    return np.round(ink * 255).astype(np.uint8).reshape(count, 1, SIZE, SIZE)


class ShapesExample(Dataset):
    name = "shapes_example"
    description = "Generated stroke glyphs, 1x28x28, example plugin; no download"
    task_type = CLASSIFICATION
    needs_files = False
    params = {
        "train_classes": Param(32, minimum=1, help="classes of the training split"),
        "val_classes": Param(8, minimum=1, help="classes of the validation split"),
        "test_classes": Param(8, minimum=1, help="classes of the test split"),
        "examples": Param(20, minimum=1, help="examples per class"),
        "seed": Param(0, help="seed of the glyphs and their drawings"),
    }

    def _counts(self) -> dict[str, int]:
        c = self.config
        return {
            "train": c["train_classes"],
            "val": c["val_classes"],
            "test": c["test_classes"],
        }

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        return {
            split: SplitSize(classes, self.config["examples"])
            for split, classes in self._counts().items()
        }

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        sources, first = {}, 0
        for split, classes in self._counts().items():
            images = []
            for label in range(first, first + classes):
                rng = np.random.default_rng([self.config["seed"], label])
                images.append(render(draw_glyph(rng), self.config["examples"], rng))
            sources[split] = ClassPool(torch.from_numpy(np.stack(images)))
            first += classes
        return sources
