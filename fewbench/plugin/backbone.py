"""The backbone contract: a network built for any input shape and number of outputs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

from torch import nn

from fewbench.errors import FewbenchError
from fewbench.plugin.base import Plugin
from fewbench.plugin.params import Param

WEIGHTS_PARAM = Param(
    None,
    type=str,
    nullable=True,
    added_later=True,
    help="a file of trained weights for the feature extractor (a state_dict, as fewbench "
    "export --backbone writes); learners of frozen features then train nothing",
)


def weights_digest(path: str | Path) -> str:
    """The first 12 hex digits of a weights file's SHA-256, so a card names what was loaded."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def check_weights_file(name: str, path: str | None) -> None:
    """A backbone's ``weights`` must name a readable file: said before any cell trains."""
    if path is not None and not Path(path).expanduser().is_file():
        raise FewbenchError(f"backbone {name}: weights {path}: no such file")


def read_weights(name: str, path: str) -> dict:
    """The state_dict in ``path`` (a torch file, or ``.safetensors`` where the safetensors
    package is installed), or one line saying why it is not one."""
    import torch

    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(Path(path).expanduser()), device="cpu")
        else:
            state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one line
        raise FewbenchError(
            f"backbone {name}: weights {path}: not a readable state_dict "
            f"({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FewbenchError(
            f"backbone {name}: weights {path}: not a state_dict of tensors (write one with "
            "fewbench export --backbone)"
        )
    return state


def fit_weights(name: str, module: nn.Module, state: dict, path: str) -> None:
    """Load ``state`` (read from ``path``) into ``module``, or one line saying what does not
    fit: keys and shapes that are not this network's (weights of another architecture or
    size)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        what = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
            if unexpected
            else f"{wrong[0]} is {list(state[wrong[0]].shape)}, the network's "
            f"{list(own[wrong[0]].shape)}"
        )
        raise FewbenchError(
            f"backbone {name}: weights {path} do not fit this network ({what}); were they "
            "trained with other backbone parameters?"
        )
    if any(value.is_meta for value in own.values()):
        return  # built on the meta device to count its parameters: the shapes fit, no values
    module.load_state_dict(state)


def load_weights(name: str, module: nn.Module, path: str) -> None:
    """Load the state_dict in ``path`` into ``module`` (a feature extractor just built)."""
    fit_weights(name, module, read_weights(name, path), path)


class Backbone(Plugin):
    """Base class of backbone plugins.

    A subclass implements :meth:`build_features`, returning a feature extractor and
    the size of its output; the core appends the linear layer. Learners that
    replace the head (pretrain + fine-tune, prototypical networks) use the
    feature extractor alone. Learners that compare spatial maps (relation networks)
    use :meth:`build_feature_map`, which a convolutional backbone implements.
    """

    kind: ClassVar[str] = "backbone"
    # The ``weights`` parameter, for a backbone whose feature extractor can start from a file:
    # declare ``"weights": Backbone.WEIGHTS_PARAM`` and call :meth:`load_weights` on the
    # extractor :meth:`build_features` builds.
    WEIGHTS_PARAM: ClassVar[Param] = WEIGHTS_PARAM

    def check(self) -> None:
        """A ``weights`` file must exist before any cell trains."""
        check_weights_file(self.name, self.config.get("weights"))

    def load_weights(self, features: nn.Module) -> nn.Module:
        """``features`` with the ``weights`` file loaded, when the backbone has one."""
        if self.config.get("weights"):
            load_weights(self.name, features, self.config["weights"])
        return features

    def read_weights(self, path: str) -> dict:
        """The state_dict in ``path``, or one line saying why it is not one."""
        return read_weights(self.name, path)

    def fit_weights(self, module: nn.Module, state: dict, path: str) -> None:
        """Load ``state`` into ``module``, or one line saying what does not fit."""
        fit_weights(self.name, module, state, path)

    def arrives_trained(self) -> bool:
        """Whether the feature extractor is trained before the cell starts (a ``weights``
        file, or a library's pretrained weights): frozen-feature learners then train nothing."""
        return bool(self.config.get("weights"))

    def normalizes_input(self) -> bool:
        """Whether it normalises its input itself (a pretrained network with its pretraining
        statistics): the suite check then refuses a dataset that normalises too."""
        return False

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
        ``none`` (the default): it starts from a random initialisation. A backbone with a
        ``weights`` file names it and its digest: where the weights were trained, the file's
        maker must say."""
        path = self.config.get("weights")
        if not path:
            return "none"
        try:
            digest = weights_digest(Path(path).expanduser())
        except OSError:
            digest = "unreadable"
        return f"weights from {Path(path).name} (sha256 {digest})"

    def build(self, input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
        features, width = self.build_features(input_shape)
        return nn.Sequential(features, nn.Linear(width, num_outputs))
