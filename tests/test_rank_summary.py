"""``fewbench report --ranks``: each method's rank in each setting (ties share the average
rank, the task type's direction), its average rank over the settings where it has a result,
how many those are and how often it was best; in every format of the report."""

from __future__ import annotations

import csv
import io
import json
import random

import pytest
from helpers import concurrently, run_cli
from scipy import stats
from stored import make_cell, store_run

from fewbench.reports.ranks import rank_column, summarize
from fewbench.reports.table import FORMATS, Options, render


def test_ties_missing_settings_and_averages_by_hand():
    # Accuracy, higher is better. s1: A first, B and C share ranks 2 and 3 (2.5 each), D 4th.
    # s2: C has no result (None); B and D tie first (1.5 each), A 3rd.
    # s3: D absent; A, B and C all tie: ranks 1, 2, 3 -> 2 each, and all three are best.
    means = {
        "A": {"s1": 90.0, "s2": 60.0, "s3": 50.0},
        "B": {"s1": 80.0, "s2": 70.0, "s3": 50.0},
        "C": {"s1": 80.0, "s2": None, "s3": 50.0},
        "D": {"s1": 70.0, "s2": 70.0},
    }
    out = {m.method: m for m in summarize(means, ["s1", "s2", "s3"], higher_is_better=True)}
    assert out["A"].ranks == {"s1": 1.0, "s2": 3.0, "s3": 2.0}
    assert out["B"].ranks == {"s1": 2.5, "s2": 1.5, "s3": 2.0}
    assert out["C"].ranks == {"s1": 2.5, "s3": 2.0}
    assert out["D"].ranks == {"s1": 4.0, "s2": 1.5}
    assert {m: (r.average, r.settings, r.best) for m, r in out.items()} == {
        "A": (2.0, 3, 2),  # (1 + 3 + 2) / 3; best in s1 and (tied) in s3
        "B": (2.0, 3, 2),  # (2.5 + 1.5 + 2) / 3; best (tied) in s2 and s3
        "C": (2.25, 2, 1),  # (2.5 + 2) / 2
        "D": (2.75, 2, 1),  # (4 + 1.5) / 2
    }
    # Lower is better (mean squared error): the order flips, ties stay ties.
    low = {m.method: m for m in summarize(means, ["s1"], higher_is_better=False)}
    assert [low[m].ranks["s1"] for m in "ABCD"] == [4.0, 2.5, 2.5, 1.0]
    assert [low[m].best for m in "ABCD"] == [0, 0, 0, 1]


def test_rank_column_is_scipy_average_ranks_and_ignores_float_noise():
    assert rank_column([0.5, 0.25, None, 0.25, 1.0], higher_is_better=False) == [
        3.0, 1.5, None, 1.5, 4.0,
    ]  # fmt: skip
    assert rank_column([0.1 + 0.2, 0.3, float("nan")], higher_is_better=True) == [1.5, 1.5, None]
    assert rank_column([None, None], higher_is_better=True) == [None, None]
    rng = random.Random(0)
    for _ in range(20):
        values = [rng.choice([1.0, 2.0, 3.0, 4.0]) for _ in range(7)]
        assert rank_column(values, True) == list(stats.rankdata([-v for v in values]))
        assert rank_column(values, False) == list(stats.rankdata(values))


# MSE, lower is better. 1-shot: maml 0.3 (0.2 and 0.4: 0.30000000000000004 in floats) ties
# finetune 0.3, ranks 1.5 each; protonet 0.5 is 3rd. 5-shot: finetune failed, so only maml
# (0.1, 1st) and protonet (0.2, 2nd) are ranked.
MSE_RUN = [
    (make_cell("maml"), [0.2, 0.4]),
    (make_cell("maml", shots=5), [0.1, 0.1]),
    (make_cell("finetune"), [0.3, 0.3]),
    (make_cell("finetune", shots=5), "failed"),
    (make_cell("protonet"), [0.5, 0.5]),
    (make_cell("protonet", shots=5), [0.2, 0.2]),
]
ONE, FIVE = "toy 5-way 1-shot", "toy 5-way 5-shot"


def test_stored_mse_run_in_every_format(tmp_path):
    path = store_run(tmp_path / "run", MSE_RUN, metric="mse")
    options = Options(ranks=True)
    data = json.loads(render(path, "json", options))
    assert data["methods"] == [
        {"learner": "maml", "backbone": "conv4", "learner_name": "MAML", "average_rank": 1.25,
         "settings_ranked": 2, "best_count": 2, ONE: 1.5, FIVE: 1.0},
        {"learner": "finetune", "backbone": "conv4", "learner_name": "Baseline",
         "average_rank": 1.5, "settings_ranked": 1, "best_count": 1, ONE: 1.5, FIVE: None},
        {"learner": "protonet", "backbone": "conv4", "learner_name": "Prototypical Networks",
         "average_rank": 2.5, "settings_ranked": 2, "best_count": 0, ONE: 3.0, FIVE: 2.0},
    ]  # fmt: skip
    caption = data["caption"]
    assert "by its mean MSE on the test episodes, 1 = lowest" in caption
    assert "Not ranked where it has no result" in caption
    assert "Baseline conv4 in toy 5-way 5-shot (1 failed)" in caption

    markdown = render(path, "markdown", options)
    assert markdown.startswith(
        f"| learner | backbone | {ONE} | {FIVE} | Avg. rank | Settings | Best |\n"
        "|---|---|---|---|---|---|---|\n"
        "| MAML | conv4 | **1.5** | **1** | **1.25** | 2 | 2 |\n"
        "| Baseline | conv4 | **1.5** | 1 failed | 1.50 | 1 | 1 |\n"
        "| Prototypical Networks | conv4 | 3 | 2 | 2.50 | 2 | 0 |\n"
    )
    rows = list(csv.DictReader(io.StringIO(render(path, "csv", options))))
    assert [(r["learner"], float(r["average_rank"]), r[FIVE]) for r in rows] == [
        ("maml", 1.25, "1.0000"), ("finetune", 1.5, ""), ("protonet", 2.5, "2.0000"),
    ]  # fmt: skip
    text = render(path, "table", options)
    assert "1.25 *" in text and "*: the best rank in its column" in text
    latex = render(path, "latex", options)
    assert r"MAML & conv4 & \textbf{1.5} & \textbf{1} & \textbf{1.25} & 2 & 2 \\" in latex
    page = render(path, "html", options)
    assert '<td class="best" title="best in this column">1.25</td>' in page
    assert set(FORMATS) == {"table", "markdown", "latex", "csv", "json", "html"}


def test_a_method_without_any_result_comes_last_and_unranked(tmp_path):
    cells = [
        (make_cell("maml"), [0.9, 0.8]),
        (make_cell("finetune"), "pending"),
    ]
    data = json.loads(render(store_run(tmp_path, cells), "json", Options(ranks=True)))
    assert [(m["learner"], m["average_rank"], m["settings_ranked"]) for m in data["methods"]] == [
        ("maml", 1.0, 1), ("finetune", None, 0),
    ]  # fmt: skip
    assert (
        "1 = highest" in data["caption"] and "Baseline conv4 in toy 5-way 1-shot" in data["caption"]
    )


TINY_OMNIGLOT = """\
name: tiny-omniglot
seeds: [0]
datasets:
  - {name: omniglot, split: vinyals, image_size: 28}
tasks: {ways: 5, shots: [1, 5], query: 5}
backbones:
  - {name: conv4, hidden: 8}
learners:
  - {name: protonet}
  - {name: finetune, head: linear, batch_size: 16}
train: {iterations: 3, validate_every: 3, val_episodes: 5}
eval: {episodes: 10, query: 5, seed: 0}
"""


def test_cli_ranks_of_a_real_tiny_omniglot_run(tmp_path, data_root, cache_dir):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_OMNIGLOT)
    out = tmp_path / "run"
    done = run_cli(
        "run", str(suite), "--out", str(out), "--no-progress", "--device", "cpu",
        "--data-root", str(data_root), "--cache-dir", str(cache_dir),
        "--max-iterations", "3", "--max-episodes", "10",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table, page = concurrently(
        lambda: run_cli("report", str(out), "--ranks", "--format", "csv"),
        lambda: run_cli("report", str(out), "--ranks", "--format", "html"),
    )
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    settings = ["omniglot 5-way 1-shot", "omniglot 5-way 5-shot"]
    assert sorted(r["learner"] for r in rows) == ["finetune", "protonet"]
    assert list(rows[0]) == [
        "learner", "backbone", "learner_name", "average_rank", "settings_ranked", "best_count",
        *settings,
    ]  # fmt: skip
    for setting in settings:  # two methods: ranks 1 and 2, or 1.5 each
        assert sorted(float(r[setting]) for r in rows) in ([1.0, 2.0], [1.5, 1.5])
    for r in rows:
        ranks = [float(r[s]) for s in settings]
        assert float(r["average_rank"]) == pytest.approx(sum(ranks) / 2, abs=1e-4)
        assert int(r["settings_ranked"]) == 2
        assert int(r["best_count"]) == sum(rank < 2 for rank in ranks)
    assert [float(r["average_rank"]) for r in rows] == sorted(
        float(r["average_rank"]) for r in rows
    )
    assert page.returncode == 0, page.stderr
    assert "<th>Avg. rank</th>" in page.stdout
