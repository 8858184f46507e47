"""The frozen-feature cache: looked-up features equal the ones computed episode by episode;
a table is written once and read back memory-mapped; any change of the network or of the
examples gives another table; networks that normalise with the batch are never looked up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewbench.data.feature_cache import FeatureCache, module_digest, per_example
from fewbench.plugin.dataset import ClassPool, EpisodeBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench_plugins.backbones.standard import Conv4
from fewbench_plugins.learners.feature_heads import SimpleShot
from fewbench_plugins.learners.protonet import embed_episodes

SHAPE = (1, 8, 8)


def pool(seed: int = 0, mean=None, std=None, counts=None) -> ClassPool:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (6, 7, *SHAPE), generator=g, dtype=torch.uint8)
    return ClassPool(images, mean, std, counts)


def network(batch_norm: str = "running", seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    conv = Conv4(**{**ParamSet.of(Conv4).defaults(), "hidden": 4, "batch_norm": batch_norm})
    features, _ = conv.build_features(SHAPE)
    if batch_norm == "running":  # running statistics that are not the initial ones
        features.train()
        with torch.no_grad():
            features(torch.rand(32, *SHAPE))
    return features.eval()


def episodes(source: ClassPool, count: int = 3, seed: int = 5) -> EpisodeBatch:
    parts = [
        source.sample_episodes(1, 3, 2, 2, torch.Generator().manual_seed(seed + i))
        for i in range(count)
    ]
    return EpisodeBatch.concat(parts)


def test_looked_up_features_equal_the_features_of_each_episode(tmp_path):
    source, module = pool(), network()
    batch = episodes(source)
    assert batch.origin is source and batch.indices.classes.shape == (3, 3)
    cache = FeatureCache(tmp_path)
    found = cache.episode_features(module, module_digest(module), batch.to("cpu"))
    with torch.no_grad():
        direct = embed_episodes(module, batch)
    torch.testing.assert_close(found[0], direct[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found[1], direct[1], atol=1e-5, rtol=1e-5)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_a_written_table_is_read_back_without_computing(tmp_path, monkeypatch):
    source, module = pool(), network()
    batch = episodes(source)
    first = FeatureCache(tmp_path).episode_features(module, module_digest(module), batch)

    def refuse(*_):
        raise AssertionError("computed again")

    monkeypatch.setattr(FeatureCache, "compute", staticmethod(refuse))
    again = FeatureCache(tmp_path).episode_features(module, module_digest(module), batch)
    torch.testing.assert_close(again[0], first[0])
    # A damaged table of the right name is computed again, not read.
    monkeypatch.undo()
    (table,) = tmp_path.glob("*.npy")
    table.write_bytes(b"not a table")
    third = FeatureCache(tmp_path).episode_features(module, module_digest(module), batch)
    torch.testing.assert_close(third[0], first[0])


def test_any_change_of_network_or_examples_gives_another_table(tmp_path):
    source, module = pool(), network()
    cache = FeatureCache(tmp_path)
    batch = episodes(source)
    base = cache.episode_features(module, module_digest(module), batch)[0]
    other = network(seed=2)
    assert module_digest(other) != module_digest(module)
    moved = cache.episode_features(other, module_digest(other), batch)[0]
    assert not torch.allclose(moved, base)
    # The same indices on other images, or the same images normalised otherwise.
    for changed in (
        pool(seed=3),
        pool(mean=torch.tensor([0.5]), std=torch.tensor([0.25])),
    ):
        relabelled = episodes(changed)
        looked = cache.episode_features(module, module_digest(module), relabelled)[0]
        with torch.no_grad():
            torch.testing.assert_close(
                looked, embed_episodes(module, relabelled)[0], atol=1e-5, rtol=1e-5
            )
    assert len(list(tmp_path.glob("*.npy"))) == 4


def test_batch_statistics_and_user_episodes_are_not_looked_up(tmp_path):
    source = pool()
    cache = FeatureCache(tmp_path)
    batch_stats = network("batch")
    assert not per_example(batch_stats) and per_example(network())
    assert cache.episode_features(batch_stats, module_digest(batch_stats), episodes(source)) is None
    built = episodes(source)
    own = EpisodeBatch(built.support_x, built.support_y, built.query_x, built.query_y, 3)
    module = network()
    assert cache.episode_features(module, module_digest(module), own) is None
    assert not list(tmp_path.glob("*.npy"))


def test_a_frozen_learner_on_given_weights_predicts_the_same_through_the_cache(tmp_path):
    module = network()
    weights = tmp_path / "conv4.pt"
    torch.save(module.state_dict(), weights)
    train, test = pool(seed=7), pool(seed=8)
    batch = episodes(test)

    def learner(cache):
        made = SimpleShot(**ParamSet.of(SimpleShot).defaults())
        backbone = Conv4(**{**ParamSet.of(Conv4).defaults(), "hidden": 4, "batch_norm": "running",
                            "weights": str(weights)})  # fmt: skip
        made.setup(
            LearnerContext(
                backbone=backbone, input_shape=SHAPE, ways=3, shots=2, query=2,
                num_train_classes=6, device=torch.device("cpu"),
                base_examples=train.labelled_in_order, feature_cache=cache,
            )
        )  # fmt: skip
        return made

    cached = learner(FeatureCache(tmp_path / "features")).predict(batch)
    assert list((tmp_path / "features").glob("*.npy"))
    torch.testing.assert_close(cached, learner(None).predict(batch), atol=1e-4, rtol=1e-4)
    assert cached.argmax(-1).tolist() == learner(None).predict(batch).argmax(-1).tolist()


@pytest.mark.parametrize("counts", [None, torch.tensor([7, 3, 7, 5, 7, 6])])
def test_tables_cover_every_stored_example(tmp_path, counts):
    source, module = pool(counts=counts), network()
    table = FeatureCache(tmp_path).table(module, module_digest(module), source)
    assert table.shape[:2] == (6, 7)
