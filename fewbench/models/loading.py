"""Model files: finding a cell's ``best.pt``, reading one received from elsewhere (every
damaged, crafted or inconsistent file is one FewbenchError, and nothing is allocated that
the file does not hold), and copying one out of its run (``fewbench export``)."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path
from typing import Any

from fewbench.errors import FewbenchError
from fewbench.models.trained import TrainedModel
from fewbench.storage.model_file import MODEL_FORMAT, REBUILT


def _model_file(source: str | Path, cell: str | None) -> Path:
    """``source`` itself when it is a model file; else the named cell's ``best.pt`` in the run
    directory ``source`` (by label or id; the only cell when there is one)."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FewbenchError(f"{path}: no such model file or run directory")
    from fewbench.storage.store import ResultsStore

    store = ResultsStore.open_run(path, must_exist=True)
    try:
        rows = [(row["id"], row["label"], row["status"]) for row in store.cells()]
    finally:
        store.close()
    if cell is None:
        if len(rows) != 1:
            labels = ", ".join(label for _, label, _ in rows)
            raise FewbenchError(f"{path} holds {len(rows)} cells; name one: {labels}")
        cell = rows[0][0]
    found = [r for r in rows if cell in (r[0], r[1])]
    if not found:
        raise FewbenchError(
            f"{path} has no cell {cell!r}; its cells: {', '.join(r[1] for r in rows)}"
        )
    cell_id, label, status = found[0]
    best = path / "checkpoints" / cell_id / "best.pt"
    if not best.is_file():
        raise FewbenchError(
            f"{label}: no trained model at {best} (status {status}; the run keeps models with "
            "train.keep_checkpoints best or all)"
        )
    return best


def load_learner(
    source: str | Path, cell: str | None = None, *, device: str = "cpu"
) -> TrainedModel:
    """The trained learner of a cell: ``source`` is a run directory (``cell`` by label or id)
    or a model file (``best.pt`` or an export). Built from what the file records, with the
    installed plugins; a missing plugin is named in the error."""
    import torch

    from fewbench.plugin.learner import LearnerContext
    from fewbench.plugin.task_types import task_type_of
    from fewbench.registry import Registry
    from fewbench.suite.cell import Cell

    path = _model_file(source, cell)
    try:
        record = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one line
        raise FewbenchError(
            f"{path}: not a readable model file ({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise FewbenchError(
            f"{path}: not a fewbench model file (written before models described themselves? "
            "rerun the cell, or load the bare state_dict with torch.load)"
        )
    _warn_if_newer(path, record.get("fewbench_version"))
    registry = Registry()
    try:
        stored = Cell.from_record(record["cell"])
        _refuse_unknown_parameters(path, registry, stored)
        saved = {k: v for k, v in record["context"].items() if k not in REBUILT}
        task_type = task_type_of(record["context"]["task_type"])

        def set_up(on: str) -> Any:
            backbone = registry.get("backbone", stored.backbone.name).build(
                **stored.backbone.params
            )
            learner = registry.get("learner", stored.learner.name).build(**stored.learner.params)
            context = LearnerContext(
                **{**saved, "input_shape": tuple(saved["input_shape"])},
                backbone=backbone,
                device=torch.device(on),
                task_type=task_type,
            )
            torch.manual_seed(0)  # setup builds fresh weights; the state below replaces them
            learner.setup(context)
            return learner, context

        _refuse_sizes_the_state_does_not_hold(path, set_up, record["state"])
        learner, context = set_up(device)
        learner.load_state_dict(record["state"])
    except FewbenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - built from the file's values: any error is the file's
        raise FewbenchError(
            f"{path}: a damaged or inconsistent model file ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    return TrainedModel(learner, stored, context, record)


def _warn_if_newer(path: Path, version: Any) -> None:
    """A model file from a newer fewbench may hold what this one cannot read right."""
    import re

    from fewbench.version import __version__

    def release(text: Any) -> tuple[int, ...] | None:
        found = re.match(r"\d+(\.\d+)*", str(text))
        return tuple(int(n) for n in found.group(0).split(".")) if found else None

    written, running = release(version), release(__version__)
    if written is None or (running is not None and written > running):
        warnings.warn(
            f"{path}: written by fewbench {version}, newer than this {__version__}; "
            "upgrade fewbench if loading or predicting misbehaves",
            stacklevel=3,
        )


def _tensor_shapes(value: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Every tensor in a nested state (dicts, lists), by its path."""
    import torch

    if isinstance(value, torch.Tensor):
        return {prefix: tuple(value.shape)}
    if not isinstance(value, dict | list | tuple):
        return {}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    found = {}
    for key, item in items:
        found.update(_tensor_shapes(item, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _refuse_sizes_the_state_does_not_hold(path: Path, set_up: Any, state: Any) -> None:
    """Build the model on PyTorch's ``meta`` device first (shapes, no memory) and refuse it
    unless every tensor it would allocate is in the file, with the same shape: a crafted
    ``hidden: 1000000`` or a huge ``input_shape`` asked for terabytes before the state was
    compared. The file's own tensors are already in memory, so this bounds the real build
    by the file's size. A plugin whose setup cannot run on ``meta`` is built as before."""
    import torch

    try:
        with torch.device("meta"):  # modules built outside setup land there too
            learner, _ = set_up("meta")
        wanted = _tensor_shapes(learner.state_dict())
    except (NotImplementedError, RuntimeError):
        return
    held = _tensor_shapes(state)
    for name, shape in wanted.items():
        if held.get(name) != shape:
            elements = sum(math.prod(s) for s in wanted.values())
            raise FewbenchError(
                f"{path}: the recorded settings build a model of {elements:,} values whose "
                f"{name} has shape {list(shape)}, but the file holds "
                + ("no such tensor" if name not in held else f"shape {list(held[name])}")
                + " (a damaged or crafted model file; nothing was allocated)"
            )


def _refuse_unknown_parameters(path: Path, registry: Any, stored: Any) -> None:
    """A parameter the installed plugin does not know was silently dropped: refuse it."""
    for kind, choice in (("backbone", stored.backbone), ("learner", stored.learner)):
        known = registry.get(kind, choice.name).params.params
        unknown = sorted(set(choice.params) - set(known))
        if unknown:
            raise FewbenchError(
                f"{path}: the model's {kind} {choice.name} has parameters the installed plugin "
                f"does not know ({', '.join(unknown)}); install the plugin version that wrote it"
            )


def _checked_destination(destination: str | Path, source: Path, force: bool) -> Path:
    """``destination`` as ``fewbench export -o`` may write it, or one line saying why not: a
    folder, the source itself, a place inside a run directory, a missing folder, or an
    existing file without ``force``."""
    from fewbench.storage.store import DB_NAME

    destination = Path(destination)
    target = destination.resolve()
    if destination.is_dir():
        raise FewbenchError(f"-o {destination}: is a folder; give the model file's path")
    if target == source.resolve():
        raise FewbenchError(f"-o {destination}: is the model file itself")
    for folder in target.parents:
        if (folder / DB_NAME).is_file():
            raise FewbenchError(
                f"-o {destination}: inside the run directory {folder}; fewbench export never "
                "writes into a run (write the model file elsewhere)"
            )
    if not destination.parent.is_dir():
        raise FewbenchError(f"-o {destination}: the folder {destination.parent} does not exist")
    if destination.exists() and not force:
        raise FewbenchError(f"-o {destination}: exists; give --force to replace it")
    return destination


def _write(destination: Path, write: Any) -> Path:
    """Write through ``write(file)`` atomically, readable by its owner only."""
    from fewbench.storage.atomic import write_atomically

    try:
        write_atomically(destination, write)
    except PermissionError:
        raise FewbenchError(
            f"-o {destination}: cannot write in {destination.parent} (permission denied)"
        ) from None
    return destination


def export_model(
    run_dir: str | Path, cell: str | None, destination: str | Path, *, force: bool = False
) -> Path:
    """Copy a cell's model file out of its run directory (``fewbench export``).

    Never destroys a result: an existing destination is replaced only with ``force``, and
    nothing is written inside a run directory (a folder holding a ``results.sqlite``, or
    under one). The copy is written atomically and readable by its owner only, as the source."""
    source = _model_file(run_dir, cell)
    destination = _checked_destination(destination, source, force)
    with open(source, "rb") as model:
        return _write(destination, lambda out: shutil.copyfileobj(model, out))


def export_backbone(
    run_dir: str | Path, cell: str | None, destination: str | Path, *, force: bool = False
) -> Path:
    """Write a cell's trained feature extractor as a plain state_dict (``fewbench export
    --backbone``), which a backbone's ``weights`` parameter loads: several cells can then
    classify the features of one trained backbone. The learner must keep its extractor as
    ``features`` (the frozen-feature learners, RFS, ...); the same rules as
    :func:`export_model` for the destination."""
    import torch
    from torch import nn

    source = _model_file(run_dir, cell)
    destination = _checked_destination(destination, source, force)
    model = load_learner(source)
    features = getattr(model.learner, "features", None)
    if not isinstance(features, nn.Module):
        raise FewbenchError(
            f"{source}: learner {model.cell.learner.name} keeps no feature extractor "
            "(features) to export; export the whole model instead"
        )
    state = {k: v.detach().cpu() for k, v in features.state_dict().items()}
    return _write(destination, lambda out: torch.save(state, out))
