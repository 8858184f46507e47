"""benchmarks/throughput.py runs and prints its table (a smoke test; timings are not checked)."""

from __future__ import annotations

import importlib.util
import json
import sys

from helpers import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "throughput", REPO / "benchmarks" / "throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_throughput_prints_a_table_with_ratios_to_the_reference(tmp_path, capsys):
    throughput = load_benchmark()
    out = tmp_path / "rows.json"
    code = throughput.main(
        [
            "--device",
            "cpu",
            "--seconds",
            "0",
            "--configs",
            "1a",
            "--engines",
            "higher,auto",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == ["higher", "auto"]
    assert all(not r["error"] and r["iterations"] >= 3 and r["tasks_per_second"] > 0 for r in rows)
    assert rows[1]["chosen"].startswith("batched")  # the documented CPU rule for 1-query Omniglot
    assert "| 1a: Omniglot 5-way 1-shot, 1 query | higher | " in printed
    assert "| 1.00 |" in printed
    assert throughput.main(["--from-json", str(out)]) == 0
    assert capsys.readouterr().out == printed
    assert "| 1a: Omniglot 5-way 1-shot, 1 query | auto -> batched" in printed


def test_an_unknown_engine_is_reported_not_raised():
    throughput = load_benchmark()
    for engine in ("no-such-engine", "batched+no-such-variant"):
        row = throughput.measure("1a", engine, "cpu", 0)
        assert row.error == f"unknown engine {engine!r}" and row.iterations == 0


def test_cells_per_hour_prints_one_row_per_layout(data_root, cache_dir, capsys):
    spec = importlib.util.spec_from_file_location(
        "cells_per_hour", REPO / "benchmarks" / "cells_per_hour.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(
        [
            "--data-root",
            str(data_root),
            "--cache-dir",
            str(cache_dir),
            "--cells",
            "2",
            "--iterations",
            "2",
            "--episodes",
            "2",
        ]  # fmt: skip
    )
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "worker" in line]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x |")
    assert rows[1].startswith("| 2 workers x 1 threads |")


def test_every_gradient_learner_has_a_row():
    throughput = load_benchmark()
    for learner in ("anil", "metasgd", "reptile"):
        row = throughput.measure("1a", "loop:1", "cpu", 0, learner)
        assert not row.error and row.learner == learner and row.tasks_per_second > 0
    assert "no engine" in throughput.measure("1a", "higher", "cpu", 0, "anil").error


def test_the_reference_is_higher_on_the_stock_max_pooling_network():
    """Configuration 3's reference keeps the network MAML codebases write (ReLU, then torch's
    max-pool), so fewbench's pooling before its ReLU counts as fewbench's gain, not the reference's."""
    from torch import nn

    from fewbench.plugin.params import ParamSet
    from fewbench_plugins.backbones.standard import Conv4

    throughput = load_benchmark()
    backbone = Conv4(**{**ParamSet.of(Conv4).defaults(), "hidden": 4, "pool": "max"})
    network, _ = backbone.build_feature_map((3, 16, 16))
    assert throughput.stock_pooling(network) == 4
    kinds = [type(m).__name__ for m in network]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 4
    assert throughput.stock_pooling(nn.Sequential(nn.ReLU())) == 0
    assert throughput.has_stock_form("3") and not throughput.has_stock_form("1a")

    def row(engine: str, tasks_per_second: float) -> object:
        return throughput.Measurement("3", engine, "cpu", tasks_per_second=tasks_per_second)

    printed = throughput.table(
        [row("higher+stock", 2.0), row("higher", 3.0), row("auto", 5.0)], "cpu"
    )
    assert "| 3: mini-ImageNet 5-way 1-shot | higher+stock | 2.0 | 0.0 | 1.00 |" in printed
    assert "| higher | 3.0 | 0.0 | 1.50 |" in printed and "| auto | 5.0 | 0.0 | 2.50 |" in printed


def test_the_heap_variant_is_set_when_the_measuring_process_starts(monkeypatch):
    from fewbench.running import cpu_heap

    throughput = load_benchmark()
    monkeypatch.setattr(cpu_heap, "_state", None)  # this process was never configured
    in_process = throughput.measure("1a", "loop:1+heap", "cpu", 0)
    assert "setting of the whole process" in in_process.error and in_process.iterations == 0
    isolated = throughput.measure_isolated("1a", "loop:1+heap", "cpu", 0)
    assert not isolated.error and isolated.iterations >= 3
