"""The MAML engines through the whole pipeline: same episodes, same training, engine recorded."""

from __future__ import annotations

import sqlite3

import torch
from helpers import assert_same_trained_conv4, run_cli

ENGINES = ("loop", "batched")


def test_engines_train_the_same_model_on_the_same_episodes(tmp_path, data_root, cache_dir):
    out = tmp_path / "engines"
    learners = ", ".join(
        f"{{name: maml, engine: {e}, meta_batch_size: 3, threads: 2}}" for e in ENGINES
    )
    result = run_cli(
        "run",
        "suites/omniglot.yaml",
        "--set", "tasks.ways=5", "--set", "tasks.shots=1",
        "--set", f"learners=[{learners}]",
        "--set", "train={iterations: 6, validate_every: 3, val_episodes: 4, log_every: 1}",
        "--set", "eval={episodes: 20, query: 5}",
        "--out", str(out), "--data-root", str(data_root), "--device", "cpu",
        env={"FEWBENCH_CACHE": str(cache_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    db = sqlite3.connect(out / "results.sqlite")
    cells = {}
    for cell_id, config, engine in db.execute("SELECT id, config, engine FROM cells"):
        name = next(
            e for e in ENGINES if f"'engine': '{e}'" in config or f'"engine": "{e}"' in config
        )
        cells[name] = (cell_id, engine)
    assert set(cells) == set(ENGINES)
    assert "train: loop x 2 threads (set in the suite)" in cells["loop"][1]
    assert "train: batched x 2 threads (set in the suite)" in cells["batched"][1]

    weights = {
        name: torch.load(out / "checkpoints" / cell_id / "best.pt", weights_only=True)["state"][
            "model"
        ]
        for name, (cell_id, _) in cells.items()
    }
    assert_same_trained_conv4(weights["batched"], weights["loop"])
    curves = {
        name: db.execute(
            "SELECT loss FROM curve WHERE cell_id = ? ORDER BY iteration", (cell_id,)
        ).fetchall()
        for name, (cell_id, _) in cells.items()
    }
    assert len(curves["loop"]) == 6
    torch.testing.assert_close(
        torch.tensor(curves["batched"]), torch.tensor(curves["loop"]), rtol=1e-4, atol=1e-5
    )

    def episode_values(name: str) -> list[float]:
        return [
            v
            for (v,) in db.execute(
                "SELECT value FROM episodes WHERE cell_id = ? ORDER BY episode", (cells[name][0],)
            )
        ]

    loop_values, batched_values = episode_values("loop"), episode_values("batched")
    assert len(loop_values) == 20
    # Same episodes, same weights to float tolerance: per-episode accuracies agree up to a
    # rare argmax tie broken differently.
    assert sum(abs(a - b) < 1e-9 for a, b in zip(loop_values, batched_values, strict=True)) >= 19
