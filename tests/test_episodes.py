"""Episode sampling: class counts, disjoint support and query, fixed test episodes."""

from __future__ import annotations

import pytest
import torch

from fewbench.plugin.dataset import ClassPool, EpisodeBatch
from fewbench.running.evaluation import EpisodeSpec, dataset_identity, fixed_episodes


def labelled_pool(classes=30, examples=20) -> ClassPool:
    """Each image holds its own (class, example) ids, so episodes can be decoded."""
    ids = torch.zeros(classes, examples, 2, dtype=torch.uint8)
    ids[:, :, 0] = torch.arange(classes)[:, None]
    ids[:, :, 1] = torch.arange(examples)[None, :]
    return ClassPool(ids)


def decode(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().long()


def test_episode_shapes_classes_and_disjoint_support_query():
    pool = labelled_pool()
    batch = pool.sample_episodes(
        8, ways=5, shots=3, query=4, generator=torch.Generator().manual_seed(0)
    )
    assert batch.support_x.shape == (8, 15, 2) and batch.query_x.shape == (8, 20, 2)
    assert batch.support_y.tolist()[0] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    for t in range(8):
        support, query = decode(batch.support_x[t]), decode(batch.query_x[t])
        classes = support[:, 0].reshape(5, 3)
        assert len(set(classes[:, 0].tolist())) == 5  # five distinct classes
        assert (classes == classes[:, :1]).all()  # one class per label
        # Labels map to the same real class in support and query.
        assert torch.equal(query[:, 0].reshape(5, 4)[:, 0], classes[:, 0])
        support_ids = {tuple(r) for r in support.tolist()}
        query_ids = {tuple(r) for r in query.tolist()}
        assert len(support_ids) == 15 and len(query_ids) == 20
        assert not support_ids & query_ids


def test_impossible_episode_is_refused():
    with pytest.raises(ValueError, match="cannot draw"):
        labelled_pool(classes=4).sample_episodes(1, 5, 1, 1, torch.Generator())
    with pytest.raises(ValueError, match="cannot draw"):
        labelled_pool(examples=5).sample_episodes(1, 2, 3, 3, torch.Generator())


def test_fixed_episodes_do_not_depend_on_chunking_or_calls():
    pool = labelled_pool()
    identity = dataset_identity({"name": "toy", "split": "a", "image_size": 28}, ("split",))
    spec = EpisodeSpec(identity, "test", ways=5, shots=1, query=3, seed=0)
    whole = fixed_episodes(pool, spec, start=0, count=10)
    chunks = EpisodeBatch.concat([fixed_episodes(pool, spec, s, 5) for s in (0, 5)])
    again = fixed_episodes(pool, spec, start=0, count=10)
    for a, b in ((whole, chunks), (whole, again)):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    other_seed = fixed_episodes(pool, EpisodeSpec(identity, "test", 5, 1, 3, seed=1), 0, 10)
    assert not torch.equal(whole.support_x, other_seed.support_x)
    other_split = fixed_episodes(pool, EpisodeSpec(identity, "val", 5, 1, 3, seed=0), 0, 10)
    assert not torch.equal(whole.support_x, other_split.support_x)


def test_image_size_does_not_change_which_examples_an_episode_holds():
    small = dataset_identity({"name": "omniglot", "split": "vinyals", "image_size": 28}, ("split",))
    large = dataset_identity({"name": "omniglot", "split": "vinyals", "image_size": 84}, ("split",))
    lake = dataset_identity({"name": "omniglot", "split": "lake", "image_size": 28}, ("split",))
    assert small == large and small != lake


def test_labelled_batches_cover_all_classes_with_true_labels():
    pool = labelled_pool()
    batch = pool.sample_labelled(500, torch.Generator().manual_seed(0))
    assert torch.equal(decode(batch.x)[:, 0], batch.y)
    assert set(batch.y.tolist()) == set(range(30))


def test_real_omniglot_vinyals_split(omniglot_sources):
    sizes = {split: (s.num_classes, s.examples_per_class) for split, s in omniglot_sources.items()}
    assert sizes == {"train": (4112, 20), "val": (688, 20), "test": (1692, 20)}
    train = omniglot_sources["train"]
    assert train.input_shape == (1, 28, 28)
    # The split file lists each character at rot000, rot090, rot180, rot270 in that order.
    base, turned = train.images[0], train.images[1]
    assert torch.equal(torch.rot90(base, 1, dims=(-2, -1)), turned)
    assert not torch.equal(base, turned)
    # Ink is bright and sparse after inversion.
    assert 0.02 < (train.images[:50].float() / 255).mean().item() < 0.4


def test_real_omniglot_test_episodes_are_fixed_across_loads(data_root, cache_dir, registry):
    identity = ("omniglot", ("split", "vinyals"))
    first = (
        registry.get("dataset", "omniglot")
        .build(split="vinyals", image_size=28)
        .load(data_root, cache_dir)
    )
    second = (
        registry.get("dataset", "omniglot")
        .build(split="vinyals", image_size=28)
        .load(data_root, cache_dir)
    )
    spec = EpisodeSpec(identity, "test", ways=20, shots=5, query=15, seed=0)
    a, b = fixed_episodes(first["test"], spec, 0, 3), fixed_episodes(second["test"], spec, 0, 3)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_lake_split_uses_background_for_training_and_evaluation_for_testing(data_root, registry):
    sizes = (
        registry.get("dataset", "omniglot")
        .build(split="lake", image_size=28)
        .split_sizes(data_root)
    )
    assert sizes["train"].classes + sizes["val"].classes == 964
    assert sizes["test"].classes == 659


class Recorder:
    """A stand-in learner that records the episodes it is asked to adapt to."""

    def __init__(self, guess: int):
        self.seen: list[torch.Tensor] = []
        self.guess = guess

    def predict(self, episodes: EpisodeBatch) -> torch.Tensor:
        self.seen.append(episodes.support_x.clone())
        outputs = torch.zeros(*episodes.query_y.shape, episodes.ways)
        outputs[..., self.guess] = 1.0
        return outputs


def test_every_learner_is_evaluated_on_the_same_episodes():
    from fewbench.running.evaluation import evaluate

    pool = labelled_pool()
    spec = EpisodeSpec(("toy",), "test", ways=5, shots=1, query=3, seed=0)
    first, second = Recorder(guess=0), Recorder(guess=1)
    a = evaluate(first, pool, spec, episodes=7, chunk=3, device=torch.device("cpu"))
    b = evaluate(second, pool, spec, episodes=7, chunk=7, device=torch.device("cpu"))
    assert torch.equal(torch.cat(first.seen), torch.cat(second.seen))
    # Always guessing one class is right for exactly one class in five, on every episode.
    assert a.tolist() == b.tolist() == pytest.approx([0.2] * 7)
