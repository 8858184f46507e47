"""The backbone contract: a network built for any input shape and number of outputs."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from fewbench.plugin.base import Plugin


class Backbone(Plugin):
    """Base class of backbone plugins.

    A subclass implements :meth:`build_features`, returning a feature extractor and
    the size of its output; the core appends the linear layer. Learners that
    replace the head (pretrain + fine-tune, prototypical networks) use the
    feature extractor alone. Learners that compare spatial maps (relation networks)
    use :meth:`build_feature_map`, which a convolutional backbone implements.
    """

    kind: ClassVar[str] = "backbone"

    def build_features(self, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
        self.not_implemented("build_features")

    def build_feature_map(
        self, input_shape: tuple[int, ...]
    ) -> tuple[nn.Module, tuple[int, int, int]]:
        """The network up to its last spatial feature map (before any global pooling or
        flattening), and that map's shape ``(channels, height, width)``."""
        self.not_implemented(
            "build_feature_map", "it gives no spatial feature map; use a convolutional backbone"
        )

    def batch_norm_mode(self) -> str:
        """How its batch norms normalise, from its parameters alone: ``none``, ``running``
        (running statistics, used in eval mode at test time), ``batch`` (the batch at hand) or
        ``mixed``; empty when it cannot say. Only a cell's protocol card derived from a stored
        configuration reads it: a finished cell's card inspects the network that ran. By
        default the value of a ``batch_norm`` parameter of ``batch`` or ``running``."""
        mode = self.config.get("batch_norm")
        return mode if mode in ("batch", "running") else ""

    def pretraining(self) -> str:
        """External data its weights were pretrained on before the cell trained it, in words;
        ``none`` (the default): it starts from a random initialisation."""
        return "none"

    def build(self, input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
        features, width = self.build_features(input_shape)
        return nn.Sequential(features, nn.Linear(width, num_outputs))
