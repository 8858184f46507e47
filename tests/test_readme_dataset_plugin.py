"""The README's dataset plugin, run as written: a dataset plugin written from the documented
contract alone works the first time (issue 28). The code is taken from the README, installed
as a third-party distribution with an entry point, and trained and evaluated on generated PNGs
in the layout its docstring gives."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
from helpers import REPO
from PIL import Image

SPLIT_CLASSES = {"train": 6, "val": 3, "test": 3}
IMAGES_PER_CLASS = 4


def readme_block(first_line: str) -> str:
    readme = (REPO / "README.md").read_text()
    return first_line + readme.split(first_line, 1)[1].split("```", 1)[0]


def install(site, code: str) -> None:
    site.mkdir()
    (site / "my_glyphs.py").write_text(code)
    info = site / "my_glyphs-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-glyphs\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fewbench]\nglyphs = my_glyphs\n")


def write_glyphs(root) -> None:
    """<root>/glyphs/<split>/<class>/<image>.png, 28x28 grey, each class its own pattern."""
    rng = np.random.default_rng(0)
    for split, classes in SPLIT_CLASSES.items():
        for label in range(classes):
            folder = root / "glyphs" / split / f"class{label:02d}"
            folder.mkdir(parents=True)
            pattern = rng.integers(0, 256, (28, 28))
            for index in range(IMAGES_PER_CLASS):
                noisy = np.clip(pattern + rng.normal(0, 20, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(noisy, mode="L").save(folder / f"{index}.png")


def test_the_readmes_dataset_plugin_runs_as_written(tmp_path):
    code = readme_block("# my_glyphs.py")
    assert 20 < len(code.strip().splitlines()) <= 50
    assert "from fewbench.plugin import" in code
    install(tmp_path / "site", code)
    data = tmp_path / "data"
    write_glyphs(data)
    suite = tmp_path / "glyphs.yaml"
    suite.write_text(
        "name: glyphs\ndatasets: [{name: glyphs, image_size: 28}]\n"
        "tasks: {ways: 2, shots: 1, query: 2}\n"
        "backbones: [{name: conv4, hidden: 8}]\nlearners: [protonet]\n"
        "train: {iterations: 3, validate_every: 3, val_episodes: 2}\n"
        "eval: {episodes: 4, query: 2}\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "site"),
        "FEWBENCH_CACHE": str(tmp_path / "cache"),
    }
    run = [sys.executable, "-m", "fewbench", "run", str(suite), "--data-root", str(data)]
    out = tmp_path / "run"
    result = subprocess.run(
        [*run, "--out", str(out)], capture_output=True, text=True, env=env, timeout=600,
        check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    db = sqlite3.connect(out / "results.sqlite")
    status, config = db.execute("SELECT status, config FROM cells").fetchone()
    episodes = db.execute("SELECT COUNT(*) FROM episodes").fetchone()[0]
    assert status == "done" and episodes == 4
    assert json.loads(config)["dataset"]["name"] == "glyphs"
    # A cell asking for more classes than the split has is refused before training, from
    # split_sizes alone, in one line.
    too_many = suite.read_text().replace("ways: 2", "ways: 4")
    suite.write_text(too_many)
    refused = subprocess.run(
        [*run, "--out", str(tmp_path / "refused")], capture_output=True, text=True, env=env,
        timeout=600, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "test" in refused.stderr and "3" in refused.stderr
