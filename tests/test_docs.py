"""The documentation: the MkDocs site builds with no warning, and the README stays a front door."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_documentation_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link, a page left out of the nav or a docstring the
    API reference cannot read fails the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner, not a warning
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "plugin" / "index.html").is_file()


def test_the_readme_is_short_has_contents_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 320
    assert re.search(r"^## (Table of )?[Cc]ontents$", readme, re.MULTILINE)
    # Markdown links and images outside code blocks: [text](target "title")
    prose = re.sub(r"^```.*?^```", "", readme, flags=re.MULTILINE | re.DOTALL)
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    assert targets, "the README links to its documentation"
    relative = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", t, re.I)]
    assert relative, "the README links to its documentation pages"
    missing = [t for t in relative if not (REPO / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


CELL_LINE = re.compile(r"^[0-9a-f]{12}  \S+: .*")


def documented_dry_runs() -> list[tuple[str, str, list[str]]]:
    """(file, command, lines) of every ```text block in the README and docs that shows a
    ``$ fewbench run ... --dry-run`` and its output."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```text\n(.*?)```", path.read_text(), flags=re.DOTALL):
            lines = [line.strip() for line in block.splitlines()]
            if lines and lines[0].startswith("$ fewbench run ") and "--dry-run" in lines[0]:
                found.append((path.name, lines[0][2:], lines[1:]))
    return found


def test_documented_dry_runs_show_what_the_command_prints(tmp_path, monkeypatch, capsys):
    """The ids and steps in the docs' examples come from the command: a change of cell ids
    or of what a cell does fails here (the README showed ids of an older fewbench)."""
    import shlex

    from fewbench.cli.parser import main

    monkeypatch.setenv("FEWBENCH_NO_ESTIMATE", "1")  # times differ by machine: not checked
    monkeypatch.chdir(REPO)
    examples = documented_dry_runs()
    assert examples, "the docs show a dry run"
    for name, command, shown in examples:
        args = shlex.split(command)[1:]
        assert main([*args, "--data-root", str(tmp_path / "no-data")]) == 0, command
        real = capsys.readouterr().out.splitlines()
        for line in shown:
            if CELL_LINE.match(line):
                line = re.sub(r", about [^,\[]+", "", line)
                assert line in real, f"{name}: `{command}` no longer prints\n{line}\nbut\n" + (
                    "\n".join(real)
                )
            elif re.fullmatch(r"\d+ cells?", line):
                assert real[-1] == line, f"{name}: `{command}` ends with {real[-1]!r}"


def test_the_readme_cost_table_is_the_committed_result_file():
    """The README's ``report --cost`` example shows the figures of the committed report export
    (each cost column formatted as ``report --cost`` formats it), not figures typed by hand."""
    import json

    from fewbench.reports import cost

    readme = (REPO / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```text\n(.*?)```", readme, flags=re.DOTALL) if "--cost" in b
    )
    source = re.search(r"benchmarks/results/[\w.-]+-report\.json", readme[: readme.index(block)])
    assert source, "the README names the result file its cost example comes from"
    entries = json.loads((REPO / source.group(0)).read_text())["entries"]
    assert entries
    for entry in entries:
        row = next(
            line
            for line in block.splitlines()
            if line.strip().startswith(entry["learner_name"] + ",")
        )
        shown = [
            entry["cost_device_model"],
            cost.parameters(entry["cost_parameters"]),
            cost.duration(entry["cost_train_seconds"]),
            cost.per_episode(entry["cost_inference_seconds_per_episode"]),
            cost.memory(entry["cost_peak_memory_bytes"]),
        ]
        for text in shown:
            assert f" {text} " in f" {row} ", f"README row {row.strip()!r} lacks {text!r}"
        mean = f"{entry['mean']:.2f} ± {entry['ci95']:.2f}"
        assert mean in block, f"README lacks {entry['learner_name']}'s {mean}"


FROZEN_RESULTS = "cpu-2core-2026-12-06-frozen-omniglot"


def frozen_tables() -> list[list[list[str]]]:
    """The tables of docs/results.md's frozen-feature section: rows of cells, header left out."""
    results = (REPO / "docs" / "results.md").read_text()
    section = results[results.index("## `suites/frozen/`") :]
    section = section[: section.index("\n## ", 1)]
    tables: list[list[list[str]]] = []
    for block in re.findall(r"((?:^\|.*\n)+)", section, flags=re.MULTILINE):
        rows = [line for line in block.splitlines() if "±" in line]
        tables.append([[c.strip() for c in row.strip("|").split("|")] for row in rows])
    return tables


def entries_of(name: str) -> dict[tuple[str, int, int], dict]:
    import json

    export = REPO / "benchmarks" / "results" / f"{FROZEN_RESULTS}-{name}.json"
    return {
        (e["learner_name"], e["ways"], e["shots"]): e
        for e in json.loads(export.read_text())["entries"]
    }


def test_the_readme_s_frozen_feature_figures_are_the_committed_result_files():
    """The README's SimpleShot, TIM-GD and PT-MAP figures (Omniglot 5-way 1-shot) are the
    heads export's, and its line says which setting they are."""
    readme = " ".join((REPO / "README.md").read_text().split())
    line = readme[readme.index("On one frozen Conv-4 trained here") :][:300]
    assert "Omniglot 5-way 1-shot" in line and "600 episodes" in line
    by_cell = entries_of("heads")
    for learner in ("SimpleShot", "TIM-GD", "PT-MAP"):
        entry = by_cell[(learner, 5, 1)]
        assert entry["episodes"] == 600 and not entry["capped"]
        assert f"{learner} {entry['mean']:.2f} ± {entry['ci95']:.2f}" in line, learner


def test_the_frozen_feature_tables_are_the_committed_result_files():
    """docs/results.md's three tables of the frozen-feature section show the figures of the
    committed report exports, learner by learner and setting by setting, not figures typed by
    hand; a setting the export does not hold is shown as not run."""
    heads, episodic, first = frozen_tables()
    exports = (
        (heads, "heads", [(5, 1), (5, 5), (20, 1), (20, 5)], True),
        (episodic, "episodic", [(5, 1), (5, 5)], False),
        (first, "episodic-first", [(20, 1), (20, 5)], False),
    )
    for table, name, settings, with_protocol in exports:
        by_cell = entries_of(name)
        shown = set()
        for row in table:
            learner, *cells = row
            if with_protocol:
                protocol, *cells = cells
            for (ways, shots), cell in zip(settings, cells, strict=True):
                entry = by_cell.get((learner, ways, shots))
                if entry is None or entry.get("mean") is None:
                    assert cell == "not run", (name, learner, ways, shots)
                    continue
                assert cell == f"{entry['mean']:.2f} ± {entry['ci95']:.2f}", (name, learner, ways)
                if with_protocol:
                    assert protocol == ("transductive" if entry["transductive"] else "inductive")
            shown.add(learner)
        assert shown == {k[0] for k in by_cell}, f"every learner of the {name} export is shown"
