"""Sinusoid regression (Finn, Abbeel & Levine 2017, section 5.1).

Each task is a sine wave ``y = A sin(x - phase)`` with the amplitude ``A`` uniform
in [0.1, 5.0] and the phase uniform in [0, pi]; inputs are uniform in [-5, 5]. A
K-shot episode gives K points of one wave as the support set and asks for the
wave's values at the query points; the loss and the metric are the mean squared
error. Nothing is stored on disk: tasks come from the seeded generator, so the
fixed validation and test episodes are as reproducible as for image datasets.
Episodes are 1-way (one function per task): ``tasks.ways`` must be 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fewbench.plugin import (
    REGRESSION,
    SPLITS,
    Dataset,
    EpisodeBatch,
    EpisodeSource,
    LabelledBatch,
    Param,
    SplitSize,
    hookimpl,
)

UNLIMITED = 10**12  # points per "class": any number of support and query points


class SinusoidTasks(EpisodeSource):
    input_shape = (1,)
    num_classes = 1  # one output: the regression target

    def __init__(self, config: dict, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)

    def to(self, device: torch.device | str) -> SinusoidTasks:
        return SinusoidTasks(self.config, device)

    def _uniform(self, shape: tuple[int, ...], low: float, high: float, generator) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    def _waves(self, count: int, points: int, generator: torch.Generator):
        c = self.config
        amplitude = self._uniform((count, 1, 1), c["amplitude_min"], c["amplitude_max"], generator)
        phase = self._uniform((count, 1, 1), c["phase_min"], c["phase_max"], generator)
        x = self._uniform((count, points, 1), c["x_min"], c["x_max"], generator)
        return x, amplitude * torch.sin(x - phase)

    def sample_episodes(
        self, count: int, ways: int, shots: int, query: int, generator: torch.Generator
    ) -> EpisodeBatch:
        if ways != 1:
            raise ValueError(f"sinusoid episodes are 1-way (one function per task), got {ways}-way")
        x, y = self._waves(count, shots + query, generator)
        x, y = x.to(self.device), y.to(self.device)
        return EpisodeBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], 1)

    def sample_labelled(self, batch_size: int, generator: torch.Generator) -> LabelledBatch:
        """Points of many waves, one wave each: what a pretrained regressor learns from."""
        x, y = self._waves(batch_size, 1, generator)
        return LabelledBatch(x[:, 0].to(self.device), y[:, 0].to(self.device))


class Sinusoid(Dataset):
    name = "sinusoid"
    description = "Sine-wave regression tasks (Finn et al. 2017, section 5.1); generated, no files"
    task_type = REGRESSION
    needs_files = False
    params = {
        "amplitude_min": Param(0.1, help="smallest amplitude"),
        "amplitude_max": Param(5.0, help="largest amplitude"),
        "phase_min": Param(0.0, help="smallest phase"),
        "phase_max": Param(math.pi, help="largest phase"),
        "x_min": Param(-5.0, help="smallest input"),
        "x_max": Param(5.0, help="largest input"),
    }

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        return {split: SplitSize(1, UNLIMITED) for split in SPLITS}

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        for low, high in (
            ("amplitude_min", "amplitude_max"),
            ("phase_min", "phase_max"),
            ("x_min", "x_max"),
        ):
            if self.config[low] > self.config[high]:
                raise ValueError(
                    f"sinusoid: {low} {self.config[low]} is above {high} {self.config[high]}"
                )
        return {split: SinusoidTasks(dict(self.config)) for split in SPLITS}


@hookimpl
def fewbench_register_datasets(register):
    register(Sinusoid)
