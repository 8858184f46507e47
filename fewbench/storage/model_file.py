"""The model file (``checkpoints/<cell id>/best.pt``): what a finished cell keeps of its best
state, self-describing, so that :func:`fewbench.api.load_learner` can set the learner up again
without the run directory. Written by the worker, read by the Python API."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from fewbench.version import __version__

MODEL_FORMAT = "fewbench-model/1"


# The fields of a LearnerContext that are rebuilt from the cell (or, the training data, left
# out), not saved as values.
REBUILT = ("backbone", "device", "task_type", "base_examples", "feature_cache")


def model_record(
    learner: Any,
    cell: Any,
    context: Any,
    plugin_versions: dict[str, str],
    protocol: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``best.pt`` holds: the learner's state and everything needed to set it up again,
    and the cell's protocol card (:mod:`fewbench.running.protocol`), so an exported model
    says how its number was measured. Tensors and plain values only, so it is read with
    ``torch.load(weights_only=True)``."""
    saved = {f.name: getattr(context, f.name) for f in fields(context) if f.name not in REBUILT}
    return {
        "protocol": protocol,
        "format": MODEL_FORMAT,
        "fewbench_version": __version__,
        "plugins": dict(plugin_versions),
        "cell": cell.to_record(),
        "context": {
            **saved,
            "input_shape": list(context.input_shape),
            "task_type": context.task_type.name,
        },
        "state": learner.state_dict(),
    }
