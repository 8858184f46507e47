"""The frozen-feature learners (SimpleShot, the probes, the transductive four): the base-class
mean over every training example, kept in the state; a backbone's weights file, loaded or
refused in one line; nothing trained on given weights; fewbench export --backbone end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_cli

import fewbench
from fewbench.errors import FewbenchError
from fewbench.plugin.dataset import ClassPool, EpisodeBatch, LabelledBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench.running.worker import ordered_examples
from fewbench_plugins.backbones.standard import MLP, Conv4
from fewbench_plugins.learners.feature_heads import LogisticProbe, NearestNeighbours, SimpleShot
from fewbench_plugins.learners.transductive import BDCSPN, PTMAP, TIM, LaplacianShot

SHAPE = (1, 4, 4)
ALL = (SimpleShot, LogisticProbe, NearestNeighbours, TIM, PTMAP, LaplacianShot, BDCSPN)


def pool(classes: int = 5, examples: int = 6, seed: int = 0, counts=None) -> ClassPool:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (classes, examples, *SHAPE), generator=g, dtype=torch.uint8)
    return ClassPool(images, counts=counts)


def make(cls, source: ClassPool | None, backbone=None, **params):
    torch.manual_seed(0)
    learner = cls(**{**ParamSet.of(cls).defaults(), **params})
    learner.setup(
        LearnerContext(
            backbone=backbone or MLP(hidden=[8]),
            input_shape=SHAPE,
            ways=3,
            shots=2,
            query=2,
            num_train_classes=5,
            device=torch.device("cpu"),
            base_examples=None if source is None else ordered_examples(source),
        )
    )
    return learner


def episodes(source: ClassPool, count: int = 2) -> EpisodeBatch:
    return source.sample_episodes(count, 3, 2, 2, torch.Generator().manual_seed(4))


def test_labelled_in_order_gives_every_example_once_with_uneven_classes():
    images = torch.arange(4 * 3, dtype=torch.uint8).reshape(4, 3, 1, 1, 1)
    uneven = ClassPool(images, counts=torch.tensor([3, 1, 2, 3]))
    batches = list(uneven.labelled_in_order(4))
    assert [len(b.y) for b in batches] == [4, 4, 1]
    labels = torch.cat([b.y for b in batches])
    values = torch.cat([b.x.flatten() for b in batches]) * 255
    assert labels.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3]
    # Class c's example e is stored at 3c + e: the padding (1's 2nd and 3rd, 2's 3rd) never shows.
    assert values.round().tolist() == [0, 1, 2, 3, 6, 7, 9, 10, 11]


def test_the_base_mean_is_the_mean_feature_of_every_training_example_and_kept_in_the_state():
    train = pool()
    learner = make(SimpleShot, train)
    test = episodes(pool(seed=1))
    before = learner.predict(test)
    with torch.no_grad():
        learner.network.eval()
        every = train.images.reshape(-1, *SHAPE).float() / 255
        torch.testing.assert_close(learner.base_mean, learner.features(every).mean(0))
    # A training step changes the backbone: the mean is computed again before the next test.
    learner.train_step(LabelledBatch(every[:10], torch.arange(10) % 5), 1)
    assert not learner.base_mean_current
    after = learner.predict(test)
    with torch.no_grad():
        torch.testing.assert_close(learner.base_mean, learner.features(every).mean(0))
    assert not torch.equal(before, after)
    # A learner loaded from the state (a model file: no training data) predicts the same.
    loaded = make(SimpleShot, None)
    loaded.load_state_dict(learner.state_dict())
    torch.testing.assert_close(loaded.predict(test), after)


def test_cl2n_without_the_training_examples_is_one_line():
    learner = make(SimpleShot, None)
    with pytest.raises(FewbenchError, match="CL2N needs the base-class mean"):
        learner.predict(episodes(pool()))
    l2n = make(SimpleShot, None, transform="L2N")
    assert l2n.predict(episodes(pool())).shape == (2, 6, 3)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_every_frozen_learner_trains_and_scores_its_queries(cls):
    train = pool()
    learner = make(cls, train)
    loss = learner.train_step(next(train.labelled_in_order(16)), 1)
    assert loss > 0
    scores = learner.predict(episodes(pool(seed=2)))
    assert scores.shape == (2, 6, 3)
    assert torch.isfinite(scores).all()


def test_simpleshot_predicts_as_the_nearest_centred_class_mean():
    train, test = pool(), episodes(pool(seed=3), count=1)
    learner = make(SimpleShot, train)
    scores = learner.predict(test)
    with torch.no_grad():
        support = learner.features(test.support_x[0]) - learner.base_mean
        query = learner.features(test.query_x[0]) - learner.base_mean
        support = support / support.norm(dim=1, keepdim=True)
        query = query / query.norm(dim=1, keepdim=True)
        means = torch.stack([support[test.support_y[0] == c].mean(0) for c in range(3)])
        expected = -torch.cdist(query, means).pow(2)
    torch.testing.assert_close(scores[0], expected, atol=1e-5, rtol=1e-5)


def test_transductive_learners_declare_it_and_inductive_ones_do_not():
    for cls in ALL:
        protocol = cls(**ParamSet.of(cls).defaults()).prediction_protocol()
        assert bool(protocol.transductive_because) == (cls in (TIM, PTMAP, LaplacianShot, BDCSPN))


# -- a backbone's weights ------------------------------------------------------------------------
def conv4(**params) -> Conv4:
    return Conv4(**{**ParamSet.of(Conv4).defaults(), "hidden": 4, **params})


def test_conv4_loads_its_weights_and_refuses_a_file_that_does_not_fit(tmp_path):
    torch.manual_seed(1)
    trained, _ = conv4().build_features((1, 8, 8))
    path = tmp_path / "conv4.pt"
    torch.save(trained.state_dict(), path)
    torch.manual_seed(2)
    loaded, _ = conv4(weights=str(path)).build_features((1, 8, 8))
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert conv4(weights=str(path)).pretraining().startswith("weights from conv4.pt (sha256 ")

    with pytest.raises(FewbenchError, match="do not fit this network.*is \\[4, 1, 3, 3\\]"):
        conv4(weights=str(path), hidden=6).build_features((1, 8, 8))
    torch.save({"not": "tensors"}, tmp_path / "odd.pt")
    with pytest.raises(FewbenchError, match="not a state_dict of tensors"):
        conv4(weights=str(tmp_path / "odd.pt")).build_features((1, 8, 8))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(FewbenchError, match="not a readable state_dict"):
        conv4(weights=str(tmp_path / "text.pt")).build_features((1, 8, 8))
    with pytest.raises(FewbenchError, match="weights .*missing.pt: no such file"):
        conv4(weights=str(tmp_path / "missing.pt")).check()


def test_given_weights_train_nothing(tmp_path):
    torch.manual_seed(1)
    trained, _ = conv4().build_features(SHAPE)
    path = tmp_path / "conv4.pt"
    torch.save(trained.state_dict(), path)
    for cls in ALL:
        learner = make(cls, pool(), backbone=conv4(weights=str(path)))
        assert learner.iterations(1000) == 0
        assert make(cls, pool(), backbone=conv4()).iterations(1000) == 1000


SUITE = """name: frozen
datasets: [{{name: omniglot}}]
tasks: {{ways: 5, shots: 1, query: 2}}
backbones: [{{name: conv4, hidden: 8, batch_norm: running{weights}}}]
learners: [{learners}]
train: {{iterations: 6, validate_every: 3, val_episodes: 2, keep_checkpoints: best}}
eval: {{episodes: 4, query: 2}}
"""


def test_export_backbone_then_frozen_heads_on_its_weights(data_root, cache_dir, tmp_path):
    """Stage 1 trains SimpleShot's backbone; its features go out with export --backbone; stage 2
    evaluates heads on them without training, SimpleShot giving stage 1's predictions again."""
    stage1 = tmp_path / "stage1.yaml"
    stage1.write_text(SUITE.format(weights="", learners="{name: simpleshot}"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWBENCH_CACHE", str(cache_dir))
        first = fewbench.run(stage1, out=tmp_path / "one", data_root=data_root, device="cpu")
        weights = tmp_path / "conv4.pt"
        done = run_cli("export", str(first), "--backbone", "-o", str(weights))
        assert done.returncode == 0, done.stderr
        assert "give it to a backbone as weights" in done.stderr
        again = run_cli("export", str(first), "--backbone", "-o", str(weights))
        assert again.returncode == 2 and "exists; give --force" in again.stderr
        stage2 = tmp_path / "stage2.yaml"
        stage2.write_text(
            SUITE.format(
                weights=f", weights: {weights}", learners="{name: simpleshot}, {name: tim}"
            )
        )
        second = fewbench.run(stage2, out=tmp_path / "two", data_root=data_root, device="cpu")
    one, two = fewbench.load_results(first), fewbench.load_results(second)
    assert list(two.cells["iterations"]) == [0, 0]
    shot = two.cells[two.cells["learner"] == "simpleshot"]
    assert shot["mean"].item() == pytest.approx(one.cells["mean"].item(), abs=1e-9)
    protocols = dict(zip(two.cells["learner"], two.cells["protocol"], strict=True))
    assert protocols["tim"]["transductive"] is True
    assert protocols["simpleshot"]["transductive"] is False


def test_weights_on_the_meta_device_are_checked_without_a_warning(tmp_path, recwarn):
    """Protocol cards and model files build networks on PyTorch's meta device to count their
    parameters; loading weights there warned once per tensor that the copy was a no-op."""
    torch.manual_seed(1)
    trained, _ = conv4().build_features((1, 8, 8))
    path = tmp_path / "conv4.pt"
    torch.save(trained.state_dict(), path)
    with torch.device("meta"):
        built, _ = conv4(weights=str(path)).build_features((1, 8, 8))
    assert all(p.is_meta for p in built.parameters())
    assert not [w for w in recwarn if "meta parameter" in str(w.message)]
    with torch.device("meta"), pytest.raises(FewbenchError, match="do not fit"):
        conv4(weights=str(path), hidden=6).build_features((1, 8, 8))


FROZEN_SUITES = sorted((Path(__file__).resolve().parents[1] / "suites" / "frozen").glob("*.yaml"))


@pytest.mark.parametrize("path", FROZEN_SUITES, ids=[p.stem for p in FROZEN_SUITES])
def test_the_frozen_suites_validate_with_their_weights_file(
    registry, data_root, tmp_path, monkeypatch, path
):
    """Every stage validates; a stage that reads stage 1's weights is refused in one line until
    the file exists (here a stand-in file), and then expands (mini-ImageNet without images)."""
    from fewbench.data.check import expand_and_check
    from fewbench.suite.loading import load_suite_file

    data_root = Path(data_root).resolve()  # FEWBENCH_DATA may be relative (CI: ../shared/data)
    monkeypatch.chdir(tmp_path)  # the suites name their weights file relative to the working folder
    text = path.read_text()
    copy = tmp_path / path.name
    if "weights:" in text:
        copy.write_text(text)
        with pytest.raises(FewbenchError, match="weights .*: no such file"):
            expand_and_check(load_suite_file(copy), registry, data_root, require_data=False)
        weights = tmp_path / "weights.pt"
        torch.save({}, weights)
        name = text.split("weights: ")[1].split("}")[0].strip()
        text = text.replace(f"weights: {name}", f"weights: {weights}")
    copy.write_text(text)
    suite = expand_and_check(
        load_suite_file(copy), registry, data_root, require_data="omniglot" in path.name
    )
    assert suite.cells
    learners = {cell.learner.name for cell in suite.cells}
    assert learners <= {"simpleshot", "logistic_probe", "knn", "tim", "pt_map", "laplacianshot",
                        "bd_cspn", "feat", "metaoptnet_svm"}  # fmt: skip
    if path.name == "miniimagenet-heads.yaml":  # the published WRN-28-10 rows stand beside it
        from fewbench.reports import references

        published = {"simpleshot", "tim", "pt_map", "laplacianshot", "bd_cspn"}
        for cell in suite.cells:
            matched = references.matching(cell.config)
            assert bool(matched) == (cell.learner.name in published), cell.label
