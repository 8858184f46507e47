"""The cost of each number (issue 27, item 5): every finished cell records its device and
model, peak memory, parameters and inference time per episode; ``report --cost`` shows them
with GPU-hours per method. New modules are imported inside the tests, so each fails on its
own on code without costs."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from stored import make_cell

from fewbench.storage.sink import CellResult
from fewbench.storage.store import ResultsStore

SINUSOID = """
name: cost
seeds: [0]
datasets: [{name: sinusoid}]
tasks: {ways: 1, shots: 5, query: 5}
backbones: [{name: mlp, hidden: [4]}]
learners:
  - {name: maml, inner_lr: 0.01, meta_batch_size: 2}
  - {name: finetune}
train: {iterations: 4, validate_every: 2, val_episodes: 2}
eval: {episodes: 6, query: 5, seed: 0}
"""


def test_the_cpu_model_is_named_not_the_architecture():
    """``platform.processor()`` is empty on Linux, so benchmarks printed ``x86_64``."""
    from fewbench.running.cost import cpu_model

    model = cpu_model()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        names = {
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        }
        assert model in names
    assert model and model not in ("x86_64", "aarch64")


PEAK_PROBE = """
import numpy as np, torch
from fewbench.running.cost import PeakMemory
first = PeakMemory(torch.device("cpu")).start()
big = np.ones(300 * 2**20 // 8)  # 300 MiB, touched, a mapping of its own
size, what = first.read()
del big  # unmapped: back to the system
after, _ = PeakMemory(torch.device("cpu")).start().read()
print(size, after, what)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak reset")
def test_the_cpu_peak_is_the_cell_s_not_the_process_s():
    """The peak resident set is reset when a cell starts: a big allocation freed before the
    next cell does not count against it. In a fresh process, so that no heap freed earlier
    (resident, and reused by the allocation) hides the difference."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    size, after, what = int(out[0]), int(out[1]), " ".join(out[2:])
    assert what == "resident set"
    assert size - after > 250 * 2**20


def test_a_record_s_arithmetic(monkeypatch):
    """Inference per episode is evaluation time over episodes; GPU-hours count every rank's
    time on CUDA and nothing on the CPU."""
    from fewbench.running import cost

    class FakePeak:
        def read(self):
            return 123, "cuda allocated"

    monkeypatch.setattr(cost, "device_model", lambda device: "Test GPU")
    monkeypatch.setenv("WORLD_SIZE", "4")
    record = cost.cost_record(
        device=torch.device("cuda", 0), peak=FakePeak(), train_seconds=3000.0,
        eval_seconds=600.0, test_episodes=600, parameters=1000,
    )  # fmt: skip
    assert record["gpu_hours"] == pytest.approx(4.0)  # 3,600 s x 4 ranks
    assert record["inference_seconds_per_episode"] == pytest.approx(1.0)
    assert record["devices"] == 4 and record["device_model"] == "Test GPU"
    assert record["peak_memory_bytes"] == 123
    monkeypatch.delenv("WORLD_SIZE")
    on_cpu = cost.cost_record(
        device=torch.device("cpu"), peak=cost.PeakMemory(torch.device("cpu")).start(),
        train_seconds=3000.0, eval_seconds=600.0, test_episodes=600, parameters=None,
    )  # fmt: skip
    assert on_cpu["gpu_hours"] == 0.0 and on_cpu["devices"] == 1
    assert on_cpu["peak_memory_bytes"] > 0 and "resident" in on_cpu["peak_memory_of"]


def test_a_finished_cell_records_its_cost_and_report_shows_it(tmp_path, capsys):
    """End to end: the stored record holds the device, this CPU's model, the learner's
    parameters (counted here from the network), the time per test episode; ``report --cost``
    prints them and CSV and JSON carry them."""
    import fewbench
    from fewbench.cli.parser import main
    from fewbench.running.cost import cpu_model

    suite = tmp_path / "cost.yaml"
    suite.write_text(SINUSOID)
    run = fewbench.run(suite, out=tmp_path / "run", data_root=tmp_path, device="cpu", quiet=True)
    store = ResultsStore.open_run(run, readonly=True)
    records = {cell["learner"]: (dict(cell), store.cost(cell["id"])) for cell in store.cells()}
    store.close()
    cell, record = records["maml"]
    assert record["device"] == "cpu" and record["device_model"] == cpu_model()
    assert record["parameters"] == (1 * 4 + 4) + (4 * 1 + 1)  # MLP 1 -> 4 -> 1, with head
    assert record["test_episodes"] == 6
    assert record["train_seconds"] == pytest.approx(cell["train_seconds"])
    assert record["inference_seconds_per_episode"] == pytest.approx(cell["eval_seconds"] / 6)
    assert record["gpu_hours"] == 0.0 and record["peak_memory_bytes"] > 10 * 2**20

    cells = fewbench.load_results(run).cells
    assert cells.set_index("learner").loc["maml", "cost"] == record  # the Python API too
    capsys.readouterr()
    assert main(["report", str(run), "--cost"]) == 0
    text = capsys.readouterr().out
    assert "Cost:" in text and cpu_model() in text and "No GPU time" in text
    maml_row = next(line for line in text.splitlines() if line.strip().startswith("MAML, mlp"))
    assert " 13 " in maml_row and "0 (CPU)" in maml_row
    assert main(["report", str(run)]) == 0
    assert "Cost:" not in capsys.readouterr().out
    assert main(["report", str(run), "--cost", "--format", "json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    maml = next(e for e in entries if e["learner"] == "maml")
    assert maml["cost_parameters"] == 13 and maml["cost_device_model"] == cpu_model()
    assert main(["report", str(run), "--cost", "--format", "csv"]) == 0
    assert "cost_peak_memory_bytes" in capsys.readouterr().out.splitlines()[0]
    assert main(["report", str(run), "--cost", "--format", "html", "--out", str(tmp_path / "r.html")]) == 0  # fmt: skip
    assert "<h2>Cost</h2>" in (tmp_path / "r.html").read_text()


def _result(cost: dict | None) -> CellResult:
    return CellResult(
        metric="accuracy", values=[0.5, 0.7], mean=0.6, ci95=0.1, curve=[(1, 1.0, 0.5)],
        iterations=2, best_iteration=2, best_val=0.5, engine="test", train_seconds=7200.0,
        eval_seconds=60.0, cost=cost,
    )  # fmt: skip


def _gpu(hours: float, seconds: float) -> dict:
    return {"device": "cuda:0", "device_model": "NVIDIA H100", "devices": 1,
            "train_seconds": seconds, "eval_seconds": 0.0, "test_episodes": 2,
            "inference_seconds_per_episode": 0.004, "peak_memory_bytes": 3 * 2**30,
            "peak_memory_of": "cuda allocated", "parameters": 113_000, "gpu_hours": hours}  # fmt: skip


def test_gpu_hours_sum_per_method_and_old_cells_say_n_a(tmp_path):
    """Two MAML seeds on a GPU (1.5 h and 0.5 h), a ProtoNet cell on the GPU, and a cell
    finished before costs were recorded (its table removed, as an old store)."""
    from fewbench.reports import cost
    from fewbench.reports.table import Options, render

    run = tmp_path / "run"
    run.mkdir()
    store = ResultsStore.open_run(run)
    store.set_meta("suite", "name: toy\n")
    cells = [make_cell("maml", seed=0), make_cell("maml", seed=1), make_cell("protonet"),
             make_cell("matchingnet")]  # fmt: skip
    store.add_cells(cells)
    store.complete(cells[0].id, _result(_gpu(1.5, 5400.0)))
    store.complete(cells[1].id, _result(_gpu(0.5, 1800.0)))
    store.complete(cells[2].id, _result(_gpu(0.25, 900.0)))
    store.complete(cells[3].id, _result(None))
    store.close()
    text = render([run], "table", Options(cost=True))
    section = text[text.index("Cost:") :]
    maml = next(line for line in section.splitlines() if line.strip().startswith("MAML,"))
    assert "NVIDIA H100" in maml and "2.00" in maml and "60.0 min" in maml  # mean of seeds
    assert "4.0 ms" in maml and "3,072 MiB" in maml and "113.0 k" in maml
    assert "MAML 2.00" in section and "Prototypical Networks 0.25" in section
    matching = next(line for line in section.splitlines() if "Matching" in line)
    assert matching.count("n/a") >= 4
    assert "n/a: 1 setting finished before fewbench recorded costs" in section
    # a store written before the costs table opens read-only and reports n/a
    db = sqlite3.connect(run / "results.sqlite")
    db.execute("DROP TABLE costs")
    db.commit()
    db.close()
    store = ResultsStore.open_run(run, readonly=True)
    assert store.cost(cells[0].id) is None
    store.close()
    assert cost.COLUMNS[0] == "device"
    assert "n/a: 3 settings finished" in render([run], "table", Options(cost=True))


def test_a_cluster_task_s_cost_reaches_the_store(tmp_path):
    from fewbench.storage.journal import CellJournal, collect, write_cell

    cell = make_cell("maml")
    store = ResultsStore.open_run(tmp_path)
    store.add_cells([cell])
    store.close()
    write_cell(tmp_path, cell)
    journal = CellJournal(tmp_path, cell.id, "node:1")
    journal.start(host="node")
    journal.complete(_result(_gpu(0.1, 360.0)))
    collect(tmp_path)
    store = ResultsStore.open_run(tmp_path, readonly=True)
    assert store.cost(cell.id)["gpu_hours"] == 0.1
    store.close()
