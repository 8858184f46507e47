"""The built-in experiment trackers: ``tensorboard``, ``wandb`` and ``mlflow``.

``fewbench run SUITE --log tensorboard`` (or a suite's ``log: [tensorboard]``). Each logger
follows every cell in the worker that runs it (:mod:`fewbench.plugin.logger` gives the contract)
and writes, under the same names everywhere:

* the cell's configuration (as stored and hashed into its id), label and id;
* ``train/loss`` and ``val/<metric>`` at each point of the training curve, with the
  iteration as the step: the same numbers as ``results.sqlite``'s curve (accuracy as a
  fraction, ``mse`` for regression);
* ``test/<metric>``, ``test/<metric>_ci95``, ``val/best_<metric>``, ``time/train_seconds``
  and ``time/eval_seconds`` when the cell is stored.

Each imports its library only when a cell starts (a plugin module is loaded by every
fewbench command), and :meth:`check` names the extra to install when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fewbench.plugin import FewbenchError, FinalMetrics, LoggedCell, Logger, Param, hookimpl


def missing(logger: str, package: str) -> FewbenchError:
    return FewbenchError(
        f"the {logger} logger needs {package}: pip install 'fewbench[{logger}]' "
        f"(or pip install {package})"
    )


class TensorBoardLogger(Logger):
    """Event files for TensorBoard, one folder per cell, written with
    ``torch.utils.tensorboard.SummaryWriter``: ``tensorboard --logdir RUN_DIR/logs/tensorboard``
    shows every cell of the run as a run named by its id."""

    name = "tensorboard"
    description = "TensorBoard event files under RUN_DIR/logs/tensorboard/<cell id>"
    params = {
        "log_dir": Param(
            "logs/tensorboard",
            type=str,
            help="folder of the cells' folders, in the run directory unless absolute",
        ),
    }

    def check(self) -> None:
        self._writer_class()

    @staticmethod
    def _writer_class() -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing("tensorboard", "tensorboard") from None
        return SummaryWriter

    def start(self, cell: LoggedCell) -> None:
        self.cell = cell
        # Relative to the run directory: the same folder for every worker, wherever it runs.
        folder = cell.run_dir / (self.config["log_dir"] or "logs/tensorboard") / cell.id
        # A resumed cell sends its whole curve again (from its checkpoint): purging from step
        # 0 makes TensorBoard drop the earlier attempt's events instead of showing both.
        earlier = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        self.writer = self._writer_class()(str(folder), purge_step=0 if earlier else None)
        described = {"id": cell.id, "label": cell.label, "config": cell.config}
        text = "```json\n" + json.dumps(described, indent=2, sort_keys=True) + "\n```"
        self.writer.add_text("cell", text, global_step=0)

    def log_point(self, iteration: int, loss: float | None, val: float | None) -> None:
        for tag, value in self.cell.point(loss, val).items():
            self.writer.add_scalar(tag, value, global_step=iteration)

    def finish(self, metrics: FinalMetrics) -> None:
        for tag, value in metrics.scalars().items():
            self.writer.add_scalar(tag, value, global_step=metrics.iterations)

    def close(self, outcome: str) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()


class WandbLogger(Logger):
    """A Weights & Biases run per cell (per attempt of a resumed cell), grouped by run
    directory and named by the cell's label. ``mode`` left empty follows ``WANDB_MODE``
    (``offline`` keeps everything on this machine: ``wandb sync`` uploads it later)."""

    name = "wandb"
    description = "Weights & Biases: one run per cell, grouped by run directory"
    params = {
        "project": Param("fewbench", type=str, help="the W&B project"),
        "entity": Param("", type=str, help="the W&B team or user (default: yours)"),
        "mode": Param(
            "",
            type=str,
            choices=("", "online", "offline", "disabled"),
            help="online, offline or disabled (default: WANDB_MODE, else wandb's own)",
        ),
        "dir": Param(
            "",
            type=str,
            help="where wandb keeps its files (in wandb/ below), in the run directory unless "
            "absolute (default: WANDB_DIR, else logs)",
        ),
    }

    def check(self) -> None:
        self._library()

    @staticmethod
    def _library() -> Any:
        try:
            import wandb
        except ImportError:
            raise missing("wandb", "wandb") from None
        return wandb

    def start(self, cell: LoggedCell) -> None:
        wandb = self._library()
        self.cell = cell
        folder = cell.run_dir / (self.config["dir"] or os.environ.get("WANDB_DIR") or "logs")
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.config["project"],
            entity=self.config["entity"] or None,
            mode=self.config["mode"] or None,
            dir=str(folder),
            name=cell.label,
            group=cell.run_dir.name,
            tags=[cell.id],
            config={
                "cell_id": cell.id,
                "label": cell.label,
                "metric": cell.metric,
                **cell.config,
            },
            reinit="create_new",  # each cell its own run, whatever ran before in this process
            # Leave fewbench's own output (progress, the cell lines) alone.
            settings=wandb.Settings(console="off", quiet=True),
        )

    def log_point(self, iteration: int, loss: float | None, val: float | None) -> None:
        values = self.cell.point(loss, val)
        if values:
            self.run.log(values, step=iteration)

    def finish(self, metrics: FinalMetrics) -> None:
        self.run.summary.update(
            {
                **metrics.scalars(),
                "iterations": metrics.iterations,
                "best_iteration": metrics.best_iteration,
            }
        )

    def close(self, outcome: str) -> None:
        run = getattr(self, "run", None)
        if run is not None:
            run.finish(exit_code=0 if outcome == "done" else 1)


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"learner": {"inner_lr": 0.4}}`` as ``{"learner.inner_lr": "0.4"}``: MLflow's
    parameters are flat strings."""
    values: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            values.update(flat(value, f"{name}."))
        else:
            values[name] = value if isinstance(value, str) else json.dumps(value)
    return values


# The (run directory, tracking URI) pairs whose MLflow server did not answer, in this process.
# Loggers are built afresh for each cell, so the state that spans the cells of a run lives here:
# the cells a worker process runs after the first failure skip MLflow without trying again.
# Each worker process (``--workers N``, a Ray or SLURM task) gives up on its own, once.
UNREACHABLE: set[tuple[str, str]] = set()

# MLflow's own HTTP defaults retry 7 times with a backoff growing to two minutes, each try
# waiting up to 120 s: about four minutes per call to a server that is down. fewbench's calls
# retry twice (after at most 1 s, then 3 s) and wait 10 s per try; a variable you set wins.
MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # MLflow 3 refuses the file store (RUN_DIR/mlruns, file:// or a folder) without it.
    "MLFLOW_ALLOW_FILE_STORE": "true",
}
PROBE_SECONDS = 3.0  # to open a connection to a tracking server before its first run


class TrackerUnreachable(FewbenchError):
    """The tracker's server did not answer: the logger is off for the rest of the run."""


@contextlib.contextmanager
def environ_defaults(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` where not set, for the block only: MLflow reads its
    settings from the environment at each call, and the user's environment stays theirs."""
    added = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def unanswered(exc: BaseException | None) -> bool:
    """Whether ``exc`` comes from a connection that failed (refused, timed out, retries spent),
    however MLflow wrapped it, rather than from a server that answered."""
    from requests.exceptions import ConnectionError, RetryError, Timeout

    while exc is not None:
        if isinstance(exc, (ConnectionError, RetryError, Timeout)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def probe(uri: str) -> None:
    """Open (and close) a TCP connection to an ``http(s)`` tracking server, for
    :data:`PROBE_SECONDS` at most: a server that is down costs that, not MLflow's retries.
    Nothing to do for a store on disk or in a database, nor through a proxy (which MLflow's
    requests would use, so a direct connection proves nothing)."""
    import requests

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    if requests.utils.get_environ_proxies(uri):
        return
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    try:
        socket.create_connection(address, timeout=PROBE_SECONDS).close()
    except OSError as exc:  # refused, timed out, no such host, no route
        raise requests.ConnectionError(
            f"cannot connect to {address[0]}:{address[1]}: {exc}"
        ) from exc


class MlflowLogger(Logger):
    """An MLflow run per cell (per attempt of a resumed cell), tagged with the cell's id and
    label, its configuration as flat parameters.

    By default it writes a file store in ``RUN_DIR/mlruns``: a folder per run, so any number of
    workers, on any number of nodes sharing the run directory, write side by side with no
    server and no database (SQLite's locks are unsafe on a network file system). MLflow 3
    keeps the file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set: fewbench sets it around its own calls (unless you set
    it), for any file store. ``tracking_uri`` (``file:///...``, a folder, in the run directory
    unless absolute, a server, ``sqlite:///...``), else ``MLFLOW_TRACKING_URI``, sends the
    runs elsewhere.

    A server that does not answer costs a few seconds and one warning, then nothing: the
    first cell probes it (:func:`probe`), MLflow's retries are bounded
    (:data:`MLFLOW_DEFAULTS`), and the worker gives up on it for the rest of the run
    (:data:`UNREACHABLE`)."""

    name = "mlflow"
    description = "MLflow: one run per cell, in RUN_DIR/mlruns unless told otherwise"
    params = {
        "tracking_uri": Param(
            "",
            type=str,
            help="a server, file:///..., a folder (in the run directory unless absolute), "
            "sqlite:///... (default: MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns)",
        ),
        "experiment": Param(
            "", type=str, help="the experiment (default: the run directory's last two folders)"
        ),
    }

    def check(self) -> None:
        self._client_class()

    @staticmethod
    def _client_class() -> Any:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing("mlflow", "mlflow") from None
        return MlflowClient

    def _uri(self, run_dir: Path) -> str:
        """``tracking_uri`` (a folder as a ``file://`` URI: the same for every worker, whatever
        its working directory), else ``MLFLOW_TRACKING_URI``, else ``RUN_DIR/mlruns``."""
        uri = self.config["tracking_uri"]
        if uri and not urlsplit(uri).scheme:
            return (run_dir / uri).resolve().as_uri()
        return (
            uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        )

    @contextlib.contextmanager
    def _tracking(self) -> Iterator[None]:
        """Calls to MLflow, under :data:`MLFLOW_DEFAULTS`. A server that did not answer is
        given up on for the rest of the run: this cell's warning says so, later cells skip it."""
        with environ_defaults(MLFLOW_DEFAULTS):
            try:
                yield
            except Exception as exc:
                if not unanswered(exc):
                    raise
                UNREACHABLE.add(self.key)
                raise TrackerUnreachable(
                    f"{self.key[1]} did not answer ({type(exc).__name__}: {exc}); "
                    "not tried again in this run"
                ) from exc

    def _off(self) -> bool:
        return getattr(self, "run_id", None) is None or self.key in UNREACHABLE

    def start(self, cell: LoggedCell) -> None:
        client_class = self._client_class()
        self.cell = cell
        run_dir = cell.run_dir.resolve()
        self.key = (str(run_dir), self._uri(run_dir))
        if self.key in UNREACHABLE:
            return  # given up on earlier in this run (and said so then)
        from mlflow.entities import Param as MlflowParam

        with self._tracking():
            probe(self.key[1])
            self.client = client_class(tracking_uri=self.key[1])
            name = self.config["experiment"] or f"{run_dir.parent.name}/{run_dir.name}"
            run = self.client.create_run(
                self._experiment(name),
                run_name=cell.label,
                tags={
                    "fewbench.cell_id": cell.id,
                    "fewbench.label": cell.label,
                    "fewbench.run_dir": str(run_dir),
                    "fewbench.metric": cell.metric,
                },
            )
            self.run_id = run.info.run_id
            params = [MlflowParam(k, v) for k, v in flat(cell.config).items()]
            self.client.log_batch(self.run_id, params=params)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another worker created it in between
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        if metrics and not self._off():
            with self._tracking():
                self.client.log_batch(self.run_id, metrics=metrics)

    def log_point(self, iteration: int, loss: float | None, val: float | None) -> None:
        self._log(self.cell.point(loss, val), iteration)

    def finish(self, metrics: FinalMetrics) -> None:
        self._log(metrics.scalars(), metrics.iterations)

    def close(self, outcome: str) -> None:
        if not self._off():
            status = {"done": "FINISHED", "failed": "FAILED"}.get(outcome, "KILLED")
            with self._tracking():
                self.client.set_terminated(self.run_id, status=status)


@hookimpl
def fewbench_register_loggers(register):
    register(TensorBoardLogger)
    register(WandbLogger)
    register(MlflowLogger)
