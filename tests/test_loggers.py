"""Experiment trackers (fewbench.plugin.logger, fewbench_plugins.loggers): each built-in logger
runs for real on a tiny sinusoid suite, and what it wrote is read back with the tracker's
own reader and compared with results.sqlite. Also: the choice is checked before anything
trains (unknown names, missing extras), never changes a cell id, reaches worker processes,
and a logger that raises costs the cell nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import sys
from pathlib import Path

import pytest
from helpers import run_cli
from test_architecture import SINUSOID

from fewbench import cli
from fewbench.errors import FewbenchError
from fewbench.plugin.hookspecs import hookimpl
from fewbench.plugin.logger import CellLogging, FinalMetrics, LoggedCell, Logger
from fewbench.registry import Registry
from fewbench.running.runner import RunRequest, load
from fewbench.running.runner import run as run_suite

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The tiny sinusoid suite of the worker-path tests: two cells of a few seconds each.
SUITE = SINUSOID.replace("name: worker-path", "name: loggers")
MAML = "sinusoid/1w5s/mlp/maml/seed0"


def write_suite(folder: Path, extra: str = "") -> Path:
    path = folder / "suite.yaml"
    path.write_text(SUITE + extra)
    return path


def stored(run_dir: Path) -> dict[str, dict]:
    """Each stored cell by label: its row and its curve, as results.sqlite keeps them."""
    db = sqlite3.connect(run_dir / "results.sqlite")
    db.row_factory = sqlite3.Row
    cells = {}
    for row in db.execute("SELECT * FROM cells"):
        curve = db.execute(
            "SELECT iteration, loss, val_metric FROM curve WHERE cell_id = ? ORDER BY iteration",
            (row["id"],),
        ).fetchall()
        cells[row["label"]] = {**dict(row), "curve": [tuple(point) for point in curve]}
    db.close()
    return cells


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One run of two cells followed by all three built-in loggers, as a user types it."""
    folder = tmp_path_factory.mktemp("loggers")
    suite = write_suite(folder)
    out = folder / "run"
    had_file_store = "MLFLOW_ALLOW_FILE_STORE" in os.environ
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # a test sends nothing anywhere
        for name in ("WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            env.delenv(name, raising=False)
        code = cli.main(
            [
                "run",
                str(suite),
                "--out",
                str(out),
                "--data-root",
                str(folder),
                "--device",
                "cpu",
                "--no-progress",
                "--log",
                "tensorboard",
                "--log",
                "wandb",
                "--log",
                "mlflow",
            ]
        )
        if not had_file_store:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
    assert code == 0
    return out


def test_tensorboard_event_files_hold_the_stored_curve_and_result(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cells = stored(logged_run)
    assert len(cells) == 2
    for label, cell in cells.items():
        events = EventAccumulator(
            str(logged_run / "logs" / "tensorboard" / cell["id"]), size_guidance={"scalars": 0}
        )
        events.Reload()
        scalars = {
            tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]
        }
        # float32 in the event files
        assert scalars["train/loss"] == [
            (i, pytest.approx(loss, rel=1e-6)) for i, loss, _ in cell["curve"]
        ], label
        assert scalars["val/mse"] == [
            (i, pytest.approx(val, rel=1e-6)) for i, _, val in cell["curve"] if val is not None
        ]
        assert [i for i, _ in scalars["val/mse"]] == [3, 6]
        assert [i for i, *_ in cell["curve"]] == [2, 3, 4, 6]
        assert scalars["test/mse"] == [(6, pytest.approx(cell["mean"], rel=1e-6))]
        assert scalars["test/mse_ci95"] == [(6, pytest.approx(cell["ci95"], rel=1e-6))]
        assert scalars["time/train_seconds"] == [(6, pytest.approx(cell["train_seconds"], 1e-6))]
        text = events.Tensors("cell/text_summary")[0].tensor_proto.string_val[0].decode()
        described = json.loads(text.removeprefix("```json\n").removesuffix("\n```"))
        assert described == {"id": cell["id"], "label": label, "config": json.loads(cell["config"])}


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file, read with wandb's own protobuf messages. The file is
    a LevelDB-style log (as wandb's former Python reader, ``wandb.sdk.internal.datastore``,
    read it): a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each
    ``crc32, length, type`` and data; FULL (1) or FIRST (2) .. MIDDLE (3) .. LAST (4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # the block's zero-filled tail
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_runs_hold_config_curve_and_summary(logged_run):
    cells = stored(logged_run)
    files = sorted((logged_run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    seen = set()
    for path in files:
        records = wandb_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        cell = cells[run.display_name]
        seen.add(run.display_name)
        assert run.project == "fewbench" and run.run_group == logged_run.name
        config = {item_key(u): json.loads(u.value_json) for u in run.config.update}
        assert config["cell_id"] == cell["id"] and config["metric"] == "mse"
        assert {k: config[k] for k in json.loads(cell["config"])} == json.loads(cell["config"])
        history = []
        for record in records:
            if record.WhichOneof("record_type") == "history":
                items = {item_key(i): json.loads(i.value_json) for i in record.history.item}
                history.append((items["_step"], items.get("train/loss"), items.get("val/mse")))
        assert history == [
            (
                i,
                pytest.approx(loss, rel=1e-12),
                None if val is None else pytest.approx(val, rel=1e-12),
            )
            for i, loss, val in cell["curve"]
        ]
        summary = {}
        for record in records:
            if record.WhichOneof("record_type") == "summary":
                summary.update(
                    {item_key(u): json.loads(u.value_json) for u in record.summary.update}
                )
        assert summary["test/mse"] == pytest.approx(cell["mean"], rel=1e-12)
        assert summary["test/mse_ci95"] == pytest.approx(cell["ci95"], rel=1e-12)
        assert summary["time/eval_seconds"] == pytest.approx(cell["eval_seconds"], rel=1e-12)
        assert summary["iterations"] == 6
    assert seen == set(cells)


def test_mlflow_file_store_holds_params_metric_history_and_final_metrics(logged_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the file store too
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    client = MlflowClient(tracking_uri=(logged_run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(f"{logged_run.parent.name}/{logged_run.name}")
    runs = client.search_runs([experiment.experiment_id])
    cells = stored(logged_run)
    assert len(runs) == 2
    for run in runs:
        cell = cells[run.data.tags["fewbench.label"]]
        assert run.data.tags["fewbench.cell_id"] == cell["id"]
        assert run.info.status == "FINISHED" and run.info.run_name == cell["label"]
        config = json.loads(cell["config"])
        assert run.data.params["learner.name"] == config["learner"]["name"]
        assert run.data.params["train.iterations"] == "6"
        assert run.data.params["backbone.hidden"] == "[8]"
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted((m.step, m.value) for m in history) == [
            (i, loss) for i, loss, _ in cell["curve"]
        ]
        history = client.get_metric_history(run.info.run_id, "val/mse")
        assert sorted((m.step, m.value) for m in history) == [
            (i, val) for i, _, val in cell["curve"] if val is not None
        ]
        assert run.data.metrics["test/mse"] == cell["mean"]
        assert run.data.metrics["test/mse_ci95"] == cell["ci95"]
        assert run.data.metrics["time/train_seconds"] == cell["train_seconds"]
        assert run.data.metrics["val/best_mse"] == cell["best_val"]


def test_the_choice_of_loggers_changes_no_cell_id(logged_run, tmp_path, registry):
    plain, _ = load(RunRequest(suite=write_suite(tmp_path), data_root=tmp_path), registry)
    ids = [cell.id for cell in plain.cells]
    assert sorted(ids) == sorted(cell["id"] for cell in stored(logged_run).values())
    in_suite = write_suite(tmp_path, "log: [tensorboard, {name: mlflow, experiment: x}]\n")
    chosen, _ = load(RunRequest(suite=in_suite, data_root=tmp_path, log=("wandb",)), registry)
    assert [cell.id for cell in chosen.cells] == ids
    assert chosen.log == [
        {"name": "tensorboard", "log_dir": "logs/tensorboard"},
        {"name": "mlflow", "tracking_uri": "", "experiment": "x"},
        {"name": "wandb", "project": "fewbench", "entity": "", "mode": "", "dir": ""},
    ]


def test_an_unknown_logger_is_one_line_exit_2_with_the_closest_name(tmp_path, capsys):
    result = run_cli("run", str(write_suite(tmp_path)), "--log", "tensorbord", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fewbench: error: --log tensorbord: unknown logger 'tensorbord' (did you mean "
        "'tensorboard'?); known loggers: mlflow, tensorboard, wandb"
    ]
    suite = write_suite(tmp_path, "log:\n  - tensorboard\n  - {name: mlfow}\n")
    assert cli.main(["run", str(suite), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"fewbench: error: {suite}:12: log[1]: unknown logger 'mlfow'")
    assert "(did you mean 'mlflow'?)" in line


@pytest.mark.parametrize(
    ("name", "modules"),
    [
        ("tensorboard", ["torch.utils.tensorboard"]),
        ("wandb", ["wandb"]),
        ("mlflow", ["mlflow", "mlflow.tracking"]),
    ],
)
def test_a_missing_extra_is_named_before_anything_trains(
    tmp_path, capsys, monkeypatch, name, modules
):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    out = tmp_path / "run"
    suite = write_suite(tmp_path)
    args = ["run", str(suite), "--out", str(out), "--data-root", str(tmp_path), "--device", "cpu"]
    assert cli.main([*args, "--log", name]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"fewbench: error: --log {name}: the {name} logger needs {name}: "
        f"pip install 'fewbench[{name}]' (or pip install {name})"
    )
    assert not out.exists()  # found by the driver when it checked the suite: nothing ran
    write_suite(tmp_path, f"log: [{name}]\n")
    assert cli.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{suite}:10: log[0]: the {name} logger needs" in line and not out.exists()


class Recorder(Logger):
    """Records every call; ``fail`` names the method that raises."""

    name = "recorder"
    params = {"fail": ""}
    calls: list[tuple] = []

    def _record(self, *call):
        Recorder.calls.append((self.config["fail"], *call))
        if self.config["fail"] == call[0]:
            raise RuntimeError(f"tracker down in {call[0]}")

    def start(self, cell):
        self._record("start", cell.label, cell.metric)

    def log_point(self, iteration, loss, val):
        self._record("log_point", iteration)

    def finish(self, metrics):
        self._record("finish", metrics.metric, metrics.mean)

    def close(self, outcome):
        self._record("close", outcome)


class RecorderPlugin:
    @hookimpl
    def fewbench_register_loggers(self, register):
        register(Recorder)


def test_a_logger_that_raises_costs_the_cell_nothing(tmp_path, capsys):
    registry = Registry(extra_plugins=[RecorderPlugin()])
    suite = write_suite(tmp_path, "log: [{name: recorder, fail: log_point}]\n")
    Recorder.calls.clear()
    request = RunRequest(
        suite=suite, data_root=tmp_path, out=tmp_path / "run", device="cpu", progress=False
    )
    assert run_suite(request, registry) == 0
    cells = stored(tmp_path / "run")
    assert {c["status"] for c in cells.values()} == {"done"}
    assert all(c["mean"] is not None for c in cells.values())
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: logger" in line]
    assert warnings == [
        f"warning: logger recorder failed in log_point ({label}): RuntimeError: tracker down "
        "in log_point; the cell goes on without it"
        for label in cells
    ]
    calls = [call[1:] for call in Recorder.calls]
    # Per cell: start, the first point (raises), then close at once; nothing after.
    assert calls == [
        call
        for label in cells
        for call in (("start", label, "mse"), ("log_point", 2), ("close", "failed"))
    ]


def test_loggers_close_when_a_cell_fails_and_a_raising_logger_leaves_the_others(
    tmp_path, capsys, monkeypatch
):
    registry = Registry(extra_plugins=[RecorderPlugin()])
    finetune = registry.get("learner", "finetune").cls

    def broken(self, batch, iteration):
        if iteration == 4:
            raise ValueError("boom")
        return 1.0

    monkeypatch.setattr(finetune, "train_step", broken)
    Recorder.calls.clear()
    cell = load(RunRequest(suite=write_suite(tmp_path), data_root=tmp_path), registry)[0].cells[1]
    entries = [{"name": "recorder", "fail": "finish"}, {"name": "recorder", "fail": ""}]
    from fewbench.running.worker import CellFailed, CellRunner, WorkerSettings
    from fewbench.storage.sink import NullSink

    runner = CellRunner(
        WorkerSettings(data_root=str(tmp_path), device="cpu", loggers=entries), registry
    )
    with pytest.raises(CellFailed, match="boom"):
        runner.run(cell, NullSink(), tmp_path / "run")
    for fail in ("finish", ""):
        calls = [call[1:] for call in Recorder.calls if call[0] == fail]
        # the partial curve up to the failure, then close("failed"); no finish
        assert calls == [
            ("start", cell.label, "mse"),
            ("log_point", 2),
            ("log_point", 3),
            ("close", "failed"),
        ]
    assert "warning" not in capsys.readouterr().err


def test_cell_logging_sends_each_point_once_and_a_resumed_attempt_the_whole_curve(tmp_path):
    registry = Registry(extra_plugins=[RecorderPlugin()])
    cell = load(RunRequest(suite=write_suite(tmp_path), data_root=tmp_path), registry)[0].cells[0]
    from fewbench.plugin.task_types import REGRESSION

    Recorder.calls.clear()
    for attempt in range(2):
        logging = CellLogging([{"name": "recorder", "fail": ""}], registry, cell, tmp_path)
        logging.curve([(2, 1.0, None)])  # before start: nothing
        logging.start(REGRESSION)
        curve = [(2, 1.0, None), (3, 0.9, 0.5)]
        logging.curve(curve)
        curve.append((4, 0.8, None))
        logging.curve(curve)
        logging.close("interrupted" if attempt == 0 else "done")
        logging.close("done")  # once
    steps = [call[2] for call in Recorder.calls if call[1] == "log_point"]
    assert steps == [2, 3, 4, 2, 3, 4]
    assert [c[1:] for c in Recorder.calls if c[1] == "close"] == [
        ("close", "interrupted"),
        ("close", "done"),
    ]


def test_a_resumed_cell_replaces_its_earlier_tensorboard_attempt(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fewbench.plugin.logger import LoggedCell
    from fewbench_plugins.loggers.trackers import TensorBoardLogger

    cell = LoggedCell(tmp_path, "abc123", "x/1w1s/mlp/maml/seed0", {"seed": 0}, "mse", "MSE", False)
    first = TensorBoardLogger(log_dir="logs/tensorboard")
    first.start(cell)
    for step in (1, 2, 3, 4):
        first.log_point(step, 10.0 + step, None)
    first.close("interrupted")
    second = TensorBoardLogger(
        log_dir="logs/tensorboard"
    )  # resumed at 3: sends 1..3 from its checkpoint
    second.start(cell)
    for step in (1, 2, 3, 4, 5):
        second.log_point(step, 20.0 + step, None)
    second.close("done")
    folder = tmp_path / "logs" / "tensorboard" / "abc123"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (step, 20.0 + step) for step in (1, 2, 3, 4, 5)
    ]


def test_loggers_run_in_the_workers_wherever_the_cells_run(tmp_path, registry):
    """The choice travels with the worker settings: to a cluster task (Ray, SLURM:
    ``run_cell_task``) and to a local worker process (``python -m fewbench.running.worker``)."""
    import subprocess

    import torch

    from fewbench.plugin.executor import RunDir, run_cell_task
    from fewbench.running.runner import prepare_run_dir
    from fewbench.running.worker import WorkerSettings

    out = tmp_path / "run"
    request = RunRequest(suite=write_suite(tmp_path), data_root=tmp_path, log=("tensorboard",))
    suite, _ = load(request, registry)
    prepare_run_dir(out, suite, registry, torch.device("cpu"))
    settings = WorkerSettings(
        data_root=str(tmp_path),
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
        threads=1,
        loggers=suite.log,
    ).to_dict()
    first, second = [cell.id for cell in suite.cells]
    with RunDir(out, WorkerSettings.from_dict(settings)) as run:
        run.queue([second], "test task")
        assert run.task_settings()["loggers"] == [
            {"name": "tensorboard", "log_dir": "logs/tensorboard"}
        ]
    assert run_cell_task(str(out), second, settings)["status"] == "done"
    worker = subprocess.run(
        [sys.executable, "-m", "fewbench.running.worker", str(out), json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr
    for cell_id in (first, second):
        assert list((out / "logs" / "tensorboard" / cell_id).glob("events.out.tfevents.*"))


def test_the_python_api_takes_loggers_with_their_parameters(tmp_path):
    import fewbench

    elsewhere = tmp_path / "tensorboard"  # absolute: not in the run directory
    out = fewbench.run(
        write_suite(tmp_path), out=tmp_path / "run", data_root=tmp_path, device="cpu",
        max_iterations=3, log=[{"name": "tensorboard", "log_dir": str(elsewhere)}],
    )  # fmt: skip
    for cell in stored(out).values():
        assert list((elsewhere / cell["id"]).glob("events.out.tfevents.*"))
    assert not (out / "logs" / "tensorboard").exists()
    with pytest.raises(FewbenchError, match="has no parameter 'logdir'"):
        fewbench.run(
            write_suite(tmp_path), out=tmp_path / "x", log=[{"name": "tensorboard", "logdir": "x"}]
        )


CONFIG = {"learner": {"name": "maml", "inner_lr": 0.4}, "seed": 0}
FINAL = FinalMetrics("mse", 0.5, 0.1, 10, 4, 3, 0.4, 1.0, 0.5)


def mlflow_cell(run_dir: Path) -> LoggedCell:
    return LoggedCell(run_dir, "abc123", "x/1w1s/mlp/maml/seed0", CONFIG, "mse", "MSE", False)


@pytest.fixture
def no_proxy(monkeypatch):
    """Straight to 127.0.0.1, as the probe goes: no proxy variables, no telemetry."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def connections_to(port: int, monkeypatch) -> list[tuple]:
    """Every connection this process opens to ``port`` from now on (the probe's, urllib3's)."""
    import socket

    attempts, connect = [], socket.socket.connect

    def counting(sock, address):
        if address[1] == port:
            attempts.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", counting)
    return attempts


def test_an_mlflow_server_that_is_down_costs_one_try_and_one_warning_per_run(
    tmp_path, capsys, monkeypatch, no_proxy
):
    """MLflow's own retries cost about four minutes per cell; the probe refuses at once, and
    the worker gives up on the server for the rest of the run."""
    import socket

    closed = socket.socket()  # bound, not listening: connecting is refused at once
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    attempts = connections_to(port, monkeypatch)
    uri = f"http://127.0.0.1:{port}"
    suite = write_suite(tmp_path, f"log: [{{name: mlflow, tracking_uri: '{uri}'}}]\n")
    request = RunRequest(
        suite=suite, data_root=tmp_path, out=tmp_path / "run", device="cpu", progress=False
    )
    try:
        assert run_suite(request, Registry()) == 0
    finally:
        closed.close()
    cells = stored(tmp_path / "run")
    assert len(cells) == 2 and {c["status"] for c in cells.values()} == {"done"}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: logger" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: logger mlflow failed in start")
    assert f"{uri} did not answer" in warnings[0] and "not tried again in this run" in warnings[0]
    assert attempts == [("127.0.0.1", port)]  # the first cell's probe; the second cell: nothing


def test_mlflow_http_calls_retry_briefly_and_a_server_that_drops_them_is_given_up(
    tmp_path, monkeypatch, no_proxy
):
    """The server accepts connections (the probe passes) but its requests fail: MLflow's
    retries run under fewbench's bounds, once, and the next cell does not try; a variable
    the user set wins, and none of fewbench's settings stays in the environment."""
    import socket

    import requests
    from mlflow.utils import rest_utils

    from fewbench_plugins.loggers.trackers import MlflowLogger, TrackerUnreachable

    calls = []

    def dropped(method, url, max_retries, backoff_factor, backoff_jitter, *args, **kwargs):
        calls.append((max_retries, backoff_factor, kwargs["timeout"]))
        raise requests.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(rest_utils, "_get_http_response_with_retries", dropped)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # the user's own
    server = socket.create_server(("127.0.0.1", 0))
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"
    with server:
        first = MlflowLogger(tracking_uri=uri, experiment="")
        with pytest.raises(TrackerUnreachable, match="not tried again in this run"):
            first.start(mlflow_cell(tmp_path / "run"))
        first.close("failed")  # as CellLogging does after a failure: no call
        assert calls == [(2, 0, 10)]  # MLflow's own: (7, 2, 120)
        later = MlflowLogger(tracking_uri=uri, experiment="")  # the run's next cell: silent
        later.start(mlflow_cell(tmp_path / "run"))
        later.log_point(2, 1.0, 0.5)
        later.finish(FINAL)
        later.close("done")
        assert calls == [(2, 0, 10)]
        other = MlflowLogger(tracking_uri=uri, experiment="")  # another run tries once more
        with pytest.raises(TrackerUnreachable):
            other.start(mlflow_cell(tmp_path / "other"))
    assert calls == [(2, 0, 10), (2, 0, 10)]  # one per run; MLflow's own: (7, 2, 120)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "0"


@pytest.mark.parametrize("where", ["file", "folder"])
def test_mlflow_writes_to_a_file_uri_or_a_folder(tmp_path, monkeypatch, no_proxy, where):
    """``tracking_uri: file:///...`` (or a folder, in the run directory unless absolute) is
    MLflow's file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE is set."""
    from mlflow.tracking import MlflowClient

    from fewbench_plugins.loggers.trackers import MlflowLogger

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store" if where == "file" else tmp_path / "run" / "tracked"
    logger = MlflowLogger(tracking_uri=store.as_uri() if where == "file" else "tracked")
    logger.start(mlflow_cell(tmp_path / "run"))
    logger.log_point(2, 1.0, None)
    logger.log_point(3, 0.9, 0.5)
    logger.finish(FINAL)
    logger.close("done")
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # set for fewbench's calls only
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read it back
    client = MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs(
        [client.get_experiment_by_name(f"{tmp_path.name}/run").experiment_id]
    )
    assert run.info.status == "FINISHED" and run.data.tags["fewbench.cell_id"] == "abc123"
    assert run.data.params == {"learner.name": "maml", "learner.inner_lr": "0.4", "seed": "0"}
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(2, 1.0), (3, 0.9)]
    assert run.data.metrics["test/mse"] == 0.5 and run.data.metrics["val/best_mse"] == 0.4
