"""Backbones pretrained on large external data, from the libraries the field takes them from:
``timm`` (ViTs with DINO, DINOv2 or supervised weights, ResNets, ConvNeXts: any
``timm.create_model`` name) and ``open_clip`` (the image tower of a CLIP model).

``pip install 'fewbench[pretrained]'`` installs both. Both import torchvision, which must match
the installed torch (the README's pretrained-backbone command installs a matching pair).

Weights come from the library's hub (``pretrained: true``; downloaded on first use into the
library's own cache, so a machine without internet needs them there already) or from a local
file (``weights: PATH``: a state_dict as the library saves it, with or without open_clip's
``visual.`` prefix, ``.safetensors`` or a torch file, or as ``fewbench export --backbone``
writes it). With neither, the network starts from a random initialisation (the tests do this;
nothing then is pretrained).

Such a network expects its own input: its resolution (224 for most) and the per-channel
statistics of its pretraining. The adapter (:class:`LibraryFeatures`) resizes each batch
to the model's resolution (``image_size`` overrides it) with the model's interpolation,
repeats a single channel three times, and normalises with the model's mean and standard
deviation, so the dataset must deliver images on [0, 1] (``normalize: false`` or ``none``;
the suite check refuses a dataset that normalises too). ``normalize: none`` hands the
images on as they come.

The protocol card names the weights and the external data they were trained on, read from
the weight tag (``vit_small_patch16_224.dino``: ImageNet-1k images without labels, DINO's
self-supervision). ImageNet-1k holds the test classes of mini-ImageNet and tiered-ImageNet,
so a number on those benchmarks from such weights is not a few-shot number on unseen
classes; the card says so (P>M>F, Hu et al. 2022, Sec. 5, discuss the same overlap).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewbench.plugin import Backbone, FewbenchError, Param, hookimpl

INSTALL = "pip install 'fewbench[pretrained]'"

# Tokens of a weight tag (split on "_") and the external data each names. Hub names are
# <architecture>.<tag>: timm's "vit_base_patch16_224.augreg_in21k_ft_in1k", open_clip's
# "laion2b_s34b_b79k". An unknown tag is reported as such, with where to look.
PRETRAINING_DATA: dict[str, str] = {
    "dino": "ImageNet-1k images without labels (DINO self-supervision)",
    "lvd142m": "LVD-142M (DINOv2 self-supervision)",
    "in1k": "ImageNet-1k with labels",
    "in12k": "ImageNet-12k with labels",
    "in21k": "ImageNet-21k with labels",
    "in22k": "ImageNet-21k with labels",
    "openai": "OpenAI's 400M image-text pairs (CLIP)",
    "laion400m": "LAION-400M image-text pairs",
    "laion2b": "LAION-2B image-text pairs",
    "datacomp": "DataComp image-text pairs",
    "metaclip": "MetaCLIP image-text pairs",
}
# Pretraining data containing ImageNet-1k's classes, hence mini-/tiered-ImageNet's test classes.
IMAGENET_TOKENS = frozenset({"dino", "in1k", "in12k", "in21k", "in22k"})
OVERLAP = "includes the test classes of mini-ImageNet and tiered-ImageNet"


def describe_pretraining(tag: str) -> str:
    """The external data a weight tag names, in words, with the ImageNet overlap flagged."""
    tokens = tag.lower().replace("-", "_").split("_")
    names = [PRETRAINING_DATA[t] for t in dict.fromkeys(tokens) if t in PRETRAINING_DATA]
    if not names:
        return f"unknown from the tag {tag!r} (see the weights' model card)"
    overlap = f"; ImageNet {OVERLAP}" if IMAGENET_TOKENS & set(tokens) else ""
    return ", then ".join(names) + overlap


class LibraryFeatures(nn.Module):
    """A library's network as a fewbench feature extractor: the input resized to the model's
    resolution, a single channel repeated, normalised with the model's statistics; the output
    the pooled feature vector. The preprocessing settings are in ``repr``, so the frozen-feature
    cache (keyed by ``repr`` and the state) tells two resolutions apart."""

    def __init__(
        self,
        model: nn.Module,
        size: tuple[int, int],
        interpolation: str,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
    ):
        super().__init__()
        self.model = model
        self.size = tuple(size)
        self.interpolation = (
            interpolation if interpolation in ("bilinear", "bicubic") else "bicubic"
        )
        self.register_buffer("mean", _channel_tensor(mean), persistent=False)
        self.register_buffer("std", _channel_tensor(std), persistent=False)

    def extra_repr(self) -> str:
        def values(stats: Tensor | None) -> str:
            return "-" if stats is None else ",".join(f"{v:.6g}" for v in stats.flatten().tolist())

        return (
            f"size={self.size}, interpolation={self.interpolation}, "
            f"mean={values(self.mean)}, std={values(self.std)}"
        )

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-3] == 1:
            images = images.expand(*images.shape[:-3], 3, *images.shape[-2:])
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(
                images, size=self.size, mode=self.interpolation, align_corners=False, antialias=True
            )
        if self.mean is not None:
            images = (images - self.mean) / self.std
        return self.model(images)


def _channel_tensor(values: tuple[float, ...] | None) -> Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def _device_being_built_on() -> torch.device:
    """Where new tensors are being created: the meta device when a network's parameters are
    only counted (a card derived from a stored configuration), where no weights are fetched."""
    return torch.empty(0).device


class LibraryBackbone(Backbone):
    """What the timm and open_clip adapters share: the parameters, the import with one line
    when the extra is missing, the weights file, the card's pretraining line."""

    library: ClassVar[str] = ""  # the module imported
    params: ClassVar[dict[str, Any]] = {
        "weights": Backbone.WEIGHTS_PARAM,
        "image_size": Param(
            None,
            type=int,
            nullable=True,
            minimum=8,
            help="side the images are resized to before the network (default: the model's own, "
            "224 for most)",
        ),
        "normalize": Param(
            "model",
            choices=("model", "none"),
            help="model: normalise [0, 1] images with the model's pretraining statistics (the "
            "dataset then must not normalise: normalize: false or none); none: as they come",
        ),
    }

    def import_library(self) -> Any:
        try:
            return importlib.import_module(self.library)
        except ImportError as exc:
            raise FewbenchError(
                f"backbone {self.name}: {self.library} cannot be imported ({exc}); {INSTALL} "
                "(it needs a torchvision that matches the installed torch)"
            ) from None

    def normalizes_input(self) -> bool:
        """Whether the adapter normalises images itself (the dataset must not)."""
        return self.config["normalize"] == "model"

    def arrives_trained(self) -> bool:
        return bool(self.config["pretrained"]) or super().arrives_trained()

    def check(self) -> None:
        super().check()
        self.check_model(self.import_library())

    def check_model(self, library: Any) -> None:
        self.not_implemented("check_model")

    def tag(self) -> str:
        """The weight tag the hub weights are named by."""
        self.not_implemented("tag")

    def pretraining(self) -> str:
        if self.config.get("weights"):
            return super().pretraining()
        if not self.config["pretrained"]:
            return "none"
        return f"{self.library} hub weights {self.hub_name()}: {describe_pretraining(self.tag())}"

    def hub_name(self) -> str:
        self.not_implemented("hub_name")

    def build_model(self, library: Any, download: bool) -> tuple[nn.Module, dict[str, Any]]:
        """The library's network (its pooled features as output) and its input settings:
        ``size`` (height, width), ``interpolation``, ``mean``, ``std``."""
        self.not_implemented("build_model")

    def build_features(self, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
        if len(input_shape) != 3 or input_shape[0] not in (1, 3):
            raise FewbenchError(
                f"backbone {self.name}: needs images shaped (1 or 3 channels, height, width), "
                f"got {input_shape}"
            )
        library = self.import_library()
        meta = _device_being_built_on().type == "meta"
        model, data = self.build_model(
            library, download=bool(self.config["pretrained"]) and not meta
        )
        size = self.config["image_size"]
        normalise = self.normalizes_input()
        features = LibraryFeatures(
            model,
            (size, size) if size else data["size"],
            data["interpolation"],
            data["mean"] if normalise else None,
            data["std"] if normalise else None,
        )
        if self.config.get("weights"):
            self.load_library_weights(features, self.config["weights"])
        return features, self.feature_width(model)

    def feature_width(self, model: nn.Module) -> int:
        self.not_implemented("feature_width")

    def load_library_weights(self, features: LibraryFeatures, path: str) -> None:
        """A state_dict of the library's network (its own keys, or open_clip's whole model
        with ``visual.`` keys) or of the adapter (``model.`` keys, as export writes it)."""
        state = self.read_weights(path)
        own = set(features.model.state_dict())
        if own <= {k.removeprefix("visual.") for k in state} and not own <= set(state):
            state = {
                k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")
            }
        if own == set(state):
            self.fit_weights(features.model, state, path)
        else:
            self.fit_weights(features, state, path)


class TimmBackbone(LibraryBackbone):
    name = "timm"
    description = (
        "any timm model (ViT with DINO/DINOv2/supervised weights, ResNet, ConvNeXt) as a "
        f"feature extractor: {INSTALL}"
    )
    library = "timm"
    params = {
        "model": Param(
            "vit_small_patch16_224.dino",
            help="timm.create_model name, with its weight tag (vit_small_patch16_224.dino, "
            "vit_small_patch14_dinov2.lvd142m, resnet50.a1_in1k)",
        ),
        "pretrained": Param(
            True,
            help="the hub's weights for the tag (downloaded once into timm's cache); false: a "
            "random initialisation, or the weights file",
        ),
        **LibraryBackbone.params,
    }

    def check_model(self, library: Any) -> None:
        if not library.is_model(self.config["model"]):
            raise FewbenchError(
                f"backbone timm: no timm model {self.config['model']!r} (timm.list_models() "
                "lists them; the weight tag follows a dot: vit_small_patch16_224.dino)"
            )

    def hub_name(self) -> str:
        return self.config["model"]

    def tag(self) -> str:
        name = self.config["model"]
        return name.split(".", 1)[1] if "." in name else ""

    def build_model(self, library: Any, download: bool) -> tuple[nn.Module, dict[str, Any]]:
        self.check_model(library)
        model = library.create_model(self.config["model"], pretrained=download, num_classes=0)
        data = library.data.resolve_data_config({}, model=model)
        return model, {
            "size": tuple(data["input_size"][1:]),
            "interpolation": data["interpolation"],
            "mean": tuple(data["mean"]),
            "std": tuple(data["std"]),
        }

    def feature_width(self, model: nn.Module) -> int:
        return int(model.num_features)

    def batch_norm_mode(self) -> str:
        return ""  # a ViT has none, a ResNet runs its own: the finished cell's card inspects it


class OpenClipBackbone(LibraryBackbone):
    name = "open_clip"
    description = f"the image tower of an open_clip CLIP model (ViT-B-16, ...): {INSTALL}"
    library = "open_clip"
    params = {
        "model": Param("ViT-B-16", help="open_clip model name (open_clip.list_models())"),
        "pretrained": Param(
            "laion2b_s34b_b88k",
            type=str,
            nullable=True,
            help="the hub weights' tag (open_clip.list_pretrained_tags_by_model; openai, "
            "laion2b_s34b_b88k, ...); none: a random initialisation, or the weights file",
        ),
        **LibraryBackbone.params,
    }

    def check_model(self, library: Any) -> None:
        model, tag = self.config["model"], self.config["pretrained"]
        if model not in library.list_models():
            raise FewbenchError(
                f"backbone open_clip: no open_clip model {model!r} (open_clip.list_models())"
            )
        tags = library.list_pretrained_tags_by_model(model)
        if tag and tag not in tags:
            raise FewbenchError(
                f"backbone open_clip: model {model} has no weights {tag!r}; it has "
                f"{', '.join(tags) or 'none'}"
            )

    def hub_name(self) -> str:
        return f"{self.config['model']} {self.config['pretrained']}"

    def tag(self) -> str:
        return self.config["pretrained"] or ""

    def build_model(self, library: Any, download: bool) -> tuple[nn.Module, dict[str, Any]]:
        self.check_model(library)
        tag = self.config["pretrained"] if download else None
        # Built where tensors are being made (the meta device when only counted): open_clip
        # moves the model to its ``device``, which would fail from the meta device.
        clip = library.create_model(
            self.config["model"], pretrained=tag, device=_device_being_built_on()
        )
        visual = clip.visual
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        size = (
            visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
        )
        return visual, {
            "size": tuple(size),
            "interpolation": cfg.get("interpolation", "bicubic"),
            "mean": tuple(cfg.get("mean", library.OPENAI_DATASET_MEAN)),
            "std": tuple(cfg.get("std", library.OPENAI_DATASET_STD)),
        }

    def feature_width(self, model: nn.Module) -> int:
        return int(model.output_dim)


BACKBONES: tuple[type[Backbone], ...] = (TimmBackbone, OpenClipBackbone)


@hookimpl
def fewbench_register_backbones(register: Callable[[type], None]) -> None:
    for backbone in BACKBONES:
        register(backbone)
