"""The reproduction ledger: suites that follow their paper's protocol, exports of their runs,
the verdicts, and docs/reproduction.md regenerated from the committed exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_cli
from stored import make_cell, store_run

from fewbench.data.check import expand_and_check as expand
from fewbench.errors import FewbenchError, SuiteError
from fewbench.reports import ledger
from fewbench.reports import references as refs
from fewbench.storage.store import ResultsStore
from fewbench.suite.loading import load_suite_file, parse_yaml

REPO = Path(__file__).resolve().parents[1]
REPRODUCE = sorted((REPO / "suites" / "reproduce").glob("*.yaml"))

SNELL = {"split": "vinyals", "image_size": 28}
SNELL_CONV4 = {"hidden": 64, "pool": "max", "batch_norm": "batch"}


@pytest.mark.parametrize("path", REPRODUCE, ids=[p.stem for p in REPRODUCE])
def test_each_reproduction_suite_runs_under_its_papers_protocol(registry, tmp_path, path):
    """Every cell of a reproduction suite has its paper's published number beside it:
    it matches the protocol's every requirement, and no published row of its paper for the
    same setting is left out for a protocol difference."""
    suite = expand(load_suite_file(path), registry, tmp_path, require_data=False)
    for cell in suite.cells:
        refused = refs.refused(cell.config)
        assert not refused, f"{cell.label}: {refused[0][0].source}: {refused[0][1]}"
        assert refs.matching(cell.config), f"{cell.label}: no published number to compare with"


def test_a_reproduction_suite_must_say_what_it_reproduces(registry, tmp_path):
    text = (REPO / "suites/reproduce/snell2017-omniglot.yaml").read_text()
    data = yaml.safe_load(text)
    del data["reproduces"]["deviations"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(SuiteError, match="missing 'deviations'"):
        expand(load_suite_file(bad), registry, tmp_path, require_data=False)
    data["reproduces"]["deviations"] = []
    data["reproduces"]["paper"] = "snell2071"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(SuiteError, match="'snell2071' is not a paper of references.yaml"):
        expand(load_suite_file(bad), registry, tmp_path, require_data=False)


def test_the_suite_error_points_at_the_reproduces_line(registry, tmp_path):
    text = (REPO / "suites/reproduce/snell2017-omniglot.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("protocol: snell-omniglot", "protocol: snell-omniglott"))
    line = next(i for i, t in enumerate(bad.read_text().splitlines(), 1) if "snell-omniglott" in t)
    with pytest.raises(SuiteError) as info:
        expand(load_suite_file(bad), registry, tmp_path, require_data=False)
    assert f":{line}:" in str(info.value) and "reproduces.protocol" in str(info.value)


# -- exports and the table ---------------------------------------------------------------


def reproduction_run(tmp_path: Path, values: dict[tuple[int, int], list[float]]) -> Path:
    """A stored run of protonet cells under Snell et al.'s Omniglot protocol."""
    cells = []
    for (ways, shots), episode_values in values.items():
        cell = make_cell(
            "protonet",
            ways=ways,
            shots=shots,
            dataset="omniglot",
            dataset_params=SNELL,
            backbone_params=SNELL_CONV4,
            params={"distance": "euclidean"},
            eval_query=5,
        )
        config = {
            **cell.config,
            "tasks": {**cell.config["tasks"], "train_ways": 60, "train_query": 5},
        }
        cells.append((type(cell).from_config(config, cell.label, id=cell.id), episode_values))
    run = store_run(tmp_path / "run", cells)
    store = ResultsStore.open_run(run)
    store.set_meta("suite", (REPO / "suites/reproduce/snell2017-omniglot.yaml").read_text())
    store.set_meta(
        "environment",
        {
            "device": "cpu",
            "device_name": "x86_64",
            "torch_threads": 2,
            "git_commit": "0123456789abcdef",
        },
    )
    store.close()
    return run


def test_exported_cells_give_the_ledger_table_with_verdicts(tmp_path):
    # 5-way 1-shot: mean 0.988 with a spread: the published 98.8 (no ±) is inside ours.
    # 20-way 1-shot: all 0.5: the published 96.0 is far outside: a miss, shown with its curve.
    inside = [1.0, 0.976] * 50
    run = reproduction_run(tmp_path, {(5, 1): inside, (20, 1): [0.5] * 100})
    written = ledger.export_run(run, tmp_path / "exports")
    assert sorted(p.name for p in written) == [
        "omniglot_20w1s_conv4_protonet_distance_euclidean_seed0.json",
        "omniglot_5w1s_conv4_protonet_distance_euclidean_seed0.json",
    ]
    record = json.loads(next(p for p in written if "_5w1s_" in p.name).read_text())
    assert record["episodes"] == inside and record["commit"] == "0123456789ab"
    assert record["machine"] == "CPU (x86_64), 2 threads"
    assert record["reproduces"]["paper"] == "snell2017"
    page = ledger.render(ledger.load(tmp_path / "exports"), "exports")
    rows = [line for line in page.splitlines() if line.startswith("| protonet")]
    assert len(rows) == 2
    assert rows[0].startswith("| protonet | Snell et al. 2017, Table 1 | omniglot (vinyals) 5-way")
    assert "reproduced: published mean inside ours (no interval published)" in rows[0]
    assert "98.80 (no ±)" in rows[0] and "**98.80 ± " in rows[0]
    assert "not reproduced" in rows[1] and "**50.00 ± 0.00**" in rows[1]
    assert "**1 of 2** compared rows reproduced." in page
    assert "### `omniglot/20w1s/conv4/protonet[distance=euclidean]/seed0`: -46.00" in page
    assert "Validation accuracy by training iteration: 1: 50.0, 2: 60.0." in page
    assert "- **Deviation:** Trained on the training characters only" in page
    assert "Cause: not yet named" in page
    causes = {
        ("snell2017-omniglot", "omniglot/20w1s/conv4/protonet[distance=euclidean]/seed0"): "x"
    }
    assert "Cause: x" in ledger.render(ledger.load(tmp_path / "exports"), "exports", causes)


def test_the_verdict_rules():
    finn = next(
        r
        for r in refs.all_references()
        if (r.paper, r.dataset, r.ways, r.shots, r.learner)
        == ("Finn et al. 2017", "omniglot", 5, 1, "maml")
    )
    assert ledger.verdict(finn, 98.0, 0.35) == "reproduced: intervals overlap"  # 0.7 <= 0.75
    assert ledger.verdict(finn, 97.9, 0.35).startswith("not reproduced")  # 0.8 > 0.75
    snell = next(r for r in refs.all_references() if r.pm_means == "none")
    assert ledger.verdict(snell, snell.mean - 0.2, 0.3).startswith("reproduced: published mean")
    assert ledger.verdict(snell, snell.mean - 0.4, 0.3).startswith("not reproduced")
    assert ledger.verdict(None, 50.0, 1.0) == "no published number under this protocol"


def test_export_refuses_a_run_that_reproduces_no_paper(tmp_path):
    run = store_run(tmp_path / "run", [(make_cell("maml"), [1.0, 0.0])])
    with pytest.raises(FewbenchError, match="no 'reproduces:' section"):
        ledger.export_run(run, tmp_path / "exports")
    result = run_cli("ledger", "add", str(run), "--into", str(tmp_path / "exports"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "exports").exists()


def test_ledger_write_check_fails_on_a_hand_edited_page(tmp_path):
    run = reproduction_run(tmp_path, {(5, 1): [1.0, 0.976] * 50})
    exports, page = tmp_path / "exports", tmp_path / "ledger.md"
    assert run_cli("ledger", "add", str(run), "--into", str(exports)).returncode == 0
    assert run_cli("ledger", "write", "--from", str(exports), "--out", str(page)).returncode == 0
    check = ("ledger", "write", "--from", str(exports), "--out", str(page), "--check")
    assert run_cli(*check).returncode == 0
    page.write_text(page.read_text().replace("98.80 (no ±)", "98.90 (no ±)"))
    result = run_cli(*check)
    assert result.returncode == 1 and "differs" in result.stderr


def test_docs_reproduction_page_is_what_the_committed_exports_give():
    """docs/reproduction.md is generated: regenerate it from reproduction/ and compare."""
    measured = ledger.load(REPO / "reproduction")
    expected = ledger.render(measured, "reproduction", ledger.load_causes(REPO / "reproduction"))
    assert (REPO / "docs" / "reproduction.md").read_text(encoding="utf-8") == expected, (
        "docs/reproduction.md is stale: run fewbench ledger write"
    )
    for m in measured:  # every export names a suite that is committed
        assert (REPO / "suites" / "reproduce" / f"{m.suite}.yaml").is_file(), m.path


def test_parse_yaml_keeps_reproduces_out_of_the_cells(registry, tmp_path):
    """The section describes the suite; adding it changes no cell id."""
    path = REPO / "suites/reproduce/snell2017-omniglot.yaml"
    with_section = expand(load_suite_file(path), registry, tmp_path, require_data=False)
    data = parse_yaml(path.read_text(), str(path)).data
    del data["reproduces"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(data))
    without = expand(load_suite_file(plain), registry, tmp_path, require_data=False)
    assert [c.id for c in with_section.cells] == [c.id for c in without.cells]


def test_the_gpu_script_runs_every_job_and_exports_it(data_root, tmp_path):
    """benchmarks/reproduce_gpu.sh at a tiny budget on the CPU (SMOKE=1): every job trains,
    tests and lands in the ledger's folder, so the one GPU call it is written for is not
    where its mistakes are found."""
    import os
    import subprocess
    import sys

    exports = tmp_path / "ledger"
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks/reproduce_gpu.sh"), str(data_root), str(tmp_path / "out")],
        env={**os.environ, "SMOKE": "1", "LEDGER": str(exports), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped before it finished" not in result.stdout
    measured = ledger.load(exports)
    assert {m.suite for m in measured} == {
        "finn2017-omniglot",
        "snell2017-omniglot",
        "sung2018-omniglot",
        "vinyals2016-omniglot",
    }
    assert all(m.config["train"]["max_iterations"] == 2 for m in measured)
    page = ledger.render(measured, "ledger")
    assert "2 of 60,000 it." in page and "2 of 1,000,000 it." in page
