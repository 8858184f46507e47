"""Figures and the self-contained HTML report, from a store built by hand."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from helpers import run_cli
from stored import make_cell, store_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rng = np.random.default_rng(3)
    results, curves = [], {}
    for learner, level in (("maml", 0.9), ("finetune", 0.8)):
        for shots, bonus in ((1, 0.0), (5, 0.08)):
            for seed in (0, 1):
                cell = make_cell(learner, seed, shots=shots)
                values = np.clip(rng.normal(level + bonus, 0.08, 60), 0, 1).round(4)
                results.append((cell, values))
                curves[cell.id] = [
                    (i, 2.0 / i + 0.05 * seed, None if i % 100 else level * (1 - 1 / i) + bonus)
                    for i in range(10, 1001, 10)
                ]
    results.append((make_cell("fomaml"), "failed"))
    return store_run(tmp_path_factory.mktemp("plots") / "run", results, curves=curves)


def test_plot_writes_png_and_pdf_for_every_figure(run_dir, tmp_path):
    out = tmp_path / "figures"
    result = run_cli("plot", str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    for stem in (
        "curves-toy-5-way-1-shot",
        "curves-toy-5-way-5-shot",
        "accuracy-vs-shots-toy-5-way",
        "episodes-toy-5-way-1-shot",
        "episodes-toy-5-way-5-shot",
    ):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names
    for path in out.iterdir():
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")
        assert path.stat().st_size > 5000
    assert "accuracy-vs-ways" not in " ".join(names)  # one value of ways: nothing to plot against


def test_html_report_is_one_self_contained_file(run_dir, tmp_path):
    out = tmp_path / "report.html"
    result = run_cli("report", str(run_dir), "--format", "html", "--out", str(out))
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert '<table class="results">' in page and "toy 5-way 1-shot" in page
    assert page.count("data:image/png;base64,") == 5  # every figure embedded
    assert "1 failed" in page and "name: toy" in page  # unfinished cells and the suite shown
    # Nothing to fetch: no external URL in any src or href, no script.
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//)""", page)
    assert "<script" not in page


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("FEWBENCH_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (.ci/run installs it and requires this test)",
)
def test_html_report_renders_in_headless_chromium(run_dir, tmp_path):
    assert chromium() is not None, "FEWBENCH_REQUIRE_BROWSER is set but chromium is missing"
    out = tmp_path / "report.html"
    assert run_cli("report", str(run_dir), "--format", "html", "--out", str(out)).returncode == 0
    browser = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--enable-logging=stderr", "--v=0",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    dom = subprocess.run(
        [*browser, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table class="results">' in dom.stdout and "MAML" in dom.stdout
    assert dom.stdout.count('<img alt="') == 5
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,1600", out.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.read_bytes().startswith(b"\x89PNG")
    keep = os.environ.get("FEWBENCH_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
