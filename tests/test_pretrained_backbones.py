"""Pretrained backbones from timm and open_clip (``fewbench_plugins/backbones/pretrained.py``).

Nothing is downloaded: the networks are built with random weights, in the architectures
the hub weights have, and weights come from local files. The tests that build networks
need timm and open_clip (``pip install 'fewbench[pretrained]'`` beside a torchvision that
matches torch: the README's pretrained-backbone test command); without them they are
skipped, unless FEWBENCH_REQUIRE_PRETRAINED=1 (that command sets it) makes a skip a failure.
The card's pretraining line and the one-line error for a missing library need neither, and
run everywhere."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from test_miniimagenet import make_images

from fewbench.errors import FewbenchError, SuiteError
from fewbench.registry import Registry
from fewbench.suite.loading import load_suite_file
from fewbench_plugins.backbones.pretrained import (
    OpenClipBackbone,
    TimmBackbone,
    describe_pretraining,
)

HAVE_LIBRARIES = all(importlib.util.find_spec(m) for m in ("timm", "open_clip"))
needs_libraries = pytest.mark.skipif(
    not HAVE_LIBRARIES and not os.environ.get("FEWBENCH_REQUIRE_PRETRAINED"),
    reason="timm and open_clip are not installed (the README's pretrained-backbone command)",
)
REPO = Path(__file__).resolve().parent.parent


def test_the_card_names_the_external_data_and_flags_imagenet_overlap():
    assert describe_pretraining("dino") == (
        "ImageNet-1k images without labels (DINO self-supervision); ImageNet includes the "
        "test classes of mini-ImageNet and tiered-ImageNet"
    )
    assert describe_pretraining("lvd142m") == "LVD-142M (DINOv2 self-supervision)"
    assert describe_pretraining("augreg_in21k_ft_in1k").startswith(
        "ImageNet-21k with labels, then ImageNet-1k with labels; ImageNet includes"
    )
    assert describe_pretraining("laion2b_s34b_b88k") == "LAION-2B image-text pairs"
    assert "unknown" in describe_pretraining("my_own_run")
    card = TimmBackbone(model="vit_small_patch16_224.dino").pretraining()
    assert card.startswith("timm hub weights vit_small_patch16_224.dino: ImageNet-1k images")
    assert OpenClipBackbone(pretrained="openai").pretraining() == (
        "open_clip hub weights ViT-B-16 openai: OpenAI's 400M image-text pairs (CLIP)"
    )
    assert TimmBackbone(pretrained=False).pretraining() == "none"


def test_pretrained_weights_count_as_a_trained_backbone():
    assert TimmBackbone().arrives_trained()
    assert not TimmBackbone(pretrained=False).arrives_trained()
    assert not OpenClipBackbone(pretrained=None).arrives_trained()


SUITE = """\
name: pretrained
datasets: [{{name: miniimagenet, image_size: 16{dataset}}}]
tasks: {{ways: 2, shots: 1, query: 2}}
backbones: [{{name: timm, model: resnet18.a1_in1k, pretrained: false, image_size: 32{backbone}}}]
learners: [{{name: simpleshot}}, {{name: tim}}]
train: {{iterations: 1, validate_every: 1, val_episodes: 2}}
eval: {{episodes: 3, query: 2}}
"""


@pytest.mark.pretrained
@needs_libraries
def test_a_dataset_that_normalises_too_is_refused_in_one_line(tmp_path):
    from fewbench.data.check import expand_and_check

    make_images(tmp_path / "root")
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.format(dataset="", backbone=""))
    with pytest.raises(SuiteError, match="normalises images with its model's statistics, and "
                       "miniimagenet normalises them too .normalize: True.; set the dataset's "
                       "normalize: false"):  # fmt: skip
        expand_and_check(load_suite_file(suite), Registry(), tmp_path / "root")
    suite.write_text(SUITE.format(dataset="", backbone=", normalize: none"))
    expand_and_check(load_suite_file(suite), Registry(), tmp_path / "root")  # no error


@pytest.mark.skipif(HAVE_LIBRARIES, reason="the libraries are installed")
def test_without_the_libraries_the_error_says_what_to_install(tmp_path):
    with pytest.raises(FewbenchError, match=r"backbone timm: timm cannot be imported .*pip "
                       r"install 'fewbench\[pretrained\]'"):  # fmt: skip
        TimmBackbone(pretrained=False).check()
    from fewbench.data.check import expand_and_check

    make_images(tmp_path / "root")
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.format(dataset=", normalize: false", backbone=""))
    with pytest.raises(SuiteError, match="backbones: backbone timm: timm cannot be imported"):
        expand_and_check(load_suite_file(suite), Registry(), tmp_path / "root")


@pytest.mark.parametrize(
    ("model", "width", "size"),
    [
        ("vit_small_patch16_224.dino", 384, 224),
        ("vit_small_patch14_dinov2.lvd142m", 384, 518),
        ("resnet50.a1_in1k", 2048, 224),
    ],  # fmt: skip
)
@pytest.mark.pretrained
@needs_libraries
def test_timm_architectures_give_their_feature_width(model, width, size):
    features, got = TimmBackbone(model=model, pretrained=False).build_features((3, 84, 84))
    assert got == width and features.size == (size, size)
    features.eval()
    with torch.no_grad():
        out = features(torch.rand(2, 3, 84, 84))
    assert out.shape == (2, width) and torch.isfinite(out).all()


@pytest.mark.pretrained
@needs_libraries
def test_timm_adapter_resizes_and_normalises_as_the_model_expects(tmp_path):
    import timm

    reference = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)
    for path in (tmp_path / "dino.pt", tmp_path / "dino.safetensors"):
        if path.suffix == ".pt":
            torch.save(reference.state_dict(), path)
        else:
            from safetensors.torch import save_file

            save_file(reference.state_dict(), str(path))
        backbone = TimmBackbone(pretrained=False, weights=str(path))
        assert backbone.arrives_trained() and "sha256" in backbone.pretraining()
        features, _ = backbone.build_features((1, 84, 84))
        features.eval(), reference.eval()
        images = torch.rand(2, 1, 84, 84)
        expected_input = F.interpolate(
            images.expand(2, 3, 84, 84), size=(224, 224), mode="bicubic", antialias=True
        )
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            assert torch.allclose(
                features(images), reference((expected_input - mean) / std), atol=1e-5
            )


@pytest.mark.pretrained
@needs_libraries
def test_weights_of_another_network_and_unknown_names_get_one_line(tmp_path):
    import timm

    path = tmp_path / "resnet.pt"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(FewbenchError, match=r"backbone timm: weights .*resnet.pt do not fit this "
                       r"network \(missing .*\)"):  # fmt: skip
        TimmBackbone(pretrained=False, weights=str(path)).build_features((3, 32, 32))
    with pytest.raises(FewbenchError, match="backbone timm: no timm model 'vit_huge_nonsense'"):
        TimmBackbone(model="vit_huge_nonsense").check()
    with pytest.raises(FewbenchError, match="model ViT-B-32 has no weights 'not_a_tag'; it has "
                       "openai, "):  # fmt: skip
        OpenClipBackbone(model="ViT-B-32", pretrained="not_a_tag").check()
    OpenClipBackbone(model="ViT-B-32", pretrained="openai").check()  # a known tag passes


@pytest.mark.pretrained
@needs_libraries
def test_open_clip_image_tower_loads_a_whole_clip_state_dict(tmp_path):
    import open_clip

    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")  # visual.* and the text tower
    backbone = OpenClipBackbone(
        model="ViT-B-32", pretrained=None, weights=str(tmp_path / "clip.pt")
    )
    features, width = backbone.build_features((3, 32, 32))
    assert width == 512 and features.size == (224, 224)
    assert "mean=0.481455,0.457828,0.408211" in repr(features)  # CLIP's statistics, not ImageNet's
    for key, value in features.model.state_dict().items():
        assert torch.equal(value, clip.visual.state_dict()[key]), key
    features.eval(), clip.eval()
    images = torch.rand(2, 3, 224, 224)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(features(images), clip.encode_image((images - mean) / std), atol=1e-5)


@pytest.mark.pretrained
@needs_libraries
def test_frozen_heads_run_on_a_library_backbone_and_export_round_trips(tmp_path):
    """SimpleShot and TIM on a timm ResNet-18 (random weights from a file: nothing trains),
    end to end through the CLI; the exported backbone loads back into the adapter."""
    import timm

    make_images(tmp_path / "root")
    weights = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18.a1_in1k", num_classes=0).state_dict(), weights)
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.format(dataset=", normalize: false", backbone=f", weights: {weights}"))
    done = run_cli(
        "run", str(suite), "--data-root", str(tmp_path / "root"), "--out", str(tmp_path / "run"),
        "--no-progress", "--device", "cpu", env={"FEWBENCH_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    cells = dict(db.execute("SELECT label, status FROM cells"))
    assert sorted(cells.values()) == ["done", "done"], cells
    label = next(label for label in cells if "simpleshot" in label)
    exported = tmp_path / "exported.pt"
    done = run_cli("export", str(tmp_path / "run"), label, "--backbone", "-o", str(exported))
    assert done.returncode == 0, done.stderr
    state = torch.load(exported, weights_only=True)
    assert all(key.startswith("model.") for key in state)
    again, _ = TimmBackbone(
        model="resnet18.a1_in1k", pretrained=False, weights=str(exported), image_size=32
    ).build_features((3, 16, 16))
    original = torch.load(weights, weights_only=True)
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in original.items())


@pytest.mark.pretrained
@needs_libraries
def test_the_dino_suite_expands_with_imagenet_named_on_its_cards(tmp_path):
    """suites/pretrained/miniimagenet-dino.yaml, checked and expanded (no images, no download):
    every cell on DINO's ViT-S/16, the dataset on [0, 1], the card naming ImageNet-1k."""
    from fewbench.data.check import expand_and_check

    suite = load_suite_file(REPO / "suites" / "pretrained" / "miniimagenet-dino.yaml")
    cells = expand_and_check(suite, Registry(), tmp_path, require_data=False).cells
    assert len(cells) == 8
    for cell in cells:
        assert cell.backbone.params["model"] == "vit_small_patch16_224.dino"
        assert cell.config["dataset"]["normalize"] is False
    backbone = TimmBackbone(**cells[0].backbone.params)
    assert backbone.arrives_trained()
    assert "ImageNet-1k images without labels" in backbone.pretraining()
    assert "test classes of mini-ImageNet" in backbone.pretraining()


@pytest.mark.pretrained
@needs_libraries
def test_counting_on_the_meta_device_downloads_nothing_and_builds_the_shapes():
    """A card derived from a stored configuration builds the network on the meta device: hub
    weights (``pretrained``, the default) are then not fetched, and open_clip is not moved."""
    clip = OpenClipBackbone(model="ViT-B-32", pretrained="openai")
    for backbone, width in ((TimmBackbone(), 384), (clip, 512)):
        with torch.device("meta"):
            features, got = backbone.build_features((3, 84, 84))
        assert got == width
        assert all(p.is_meta for p in features.parameters())
