"""A cell's protocol card: how its number was obtained, derived from what ran.

Two cells with the same dataset, backbone and learner name can still measure different
things: whether a query's prediction may depend on the other queries of its episode
(*transductive*) or not (*inductive*), how many test-time steps adapt to the support set,
which split chose the kept state. The card records that, derived from what actually ran,
not from what a suite meant, and is stored with the cell's result (the store's ``protocols``
table, a cluster task's ``result.json``, the model file) for ``fewbench status``, ``report
--protocol``, ``compare`` and every export (:mod:`fewbench.reports.protocol` renders it).

Where it comes from:

* the learner's declaration (:meth:`fewbench.plugin.learner.Learner.prediction_protocol`):
  which examples share a forward pass with a query at test time, what adapts and in how
  many steps, a transductive algorithm, an ensemble;
* the networks the learner built (:func:`batch_norm_mode`): whether they have batch norms
  and whether those keep running statistics (used in eval mode at test time) or normalise
  with the batch at hand; their parameters;
* the cell (dataset and its parameters, augmentation, test episodes and queries) and its
  training (steps run, episodes or examples seen, the validation that chose the kept state).

A query's prediction depends on the other queries, and the card says ``transductive``, when
a batch norm normalises it with statistics that include them (support and query in one pass,
or the query set in its own) or when the learner is transductive by its algorithm. A learner
that declares nothing, with networks that normalise with batch statistics, is counted
transductive: the reader is never told "inductive" without grounds.

:func:`card_of_config` derives what it can from a stored configuration alone (for results
stored before cards existed, such as the reproduction ledger's exports): the same rules, from
the backbone's declared batch-norm mode (:meth:`fewbench.plugin.backbone.Backbone.batch_norm_mode`)
instead of its network, and without parameter counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fewbench.plugin.protocol import (
    MODES,
    SUPPORT_AND_ONE_QUERY,
    SUPPORT_ONLY,
    TRANSDUCTIVE_SCOPES,
    UNDECLARED,
    PredictionProtocol,
)

if TYPE_CHECKING:
    from torch import nn

    from fewbench.plugin.learner import Learner
    from fewbench.registry import Registry

CARD_FORMAT = 1
RECORDED = "when the cell finished"
DERIVED = "derived from the stored configuration (no card was stored with the cell)"


# -- what the networks are ------------------------------------------------------------------
def learner_modules(learner: Learner) -> list[nn.Module]:
    """Every network the learner holds as an attribute (its model, adapter, relation module)."""
    from torch import nn

    return [value for value in vars(learner).values() if isinstance(value, nn.Module)]


def batch_norm_mode(modules: Iterable[nn.Module]) -> str:
    """How the batch norms of ``modules`` normalise (:data:`fewbench.plugin.protocol.MODES`):
    ``none``, ``running`` (every one keeps running statistics, used in eval mode at test
    time), ``batch`` (none keeps them: the batch at hand, always) or ``mixed``."""
    from torch import nn

    seen: dict[int, nn.Module] = {}
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                seen[id(m)] = m
    if not seen:
        return "none"
    running = {m.running_mean is not None for m in seen.values()}
    if running == {True}:
        return "running"
    return "batch" if running == {False} else "mixed"


def combined_mode(first: str, second: str) -> str:
    """The mode of two groups of networks together; empty where either is unknown."""
    if "" in (first, second):
        return ""
    if first == "none" or first == second:
        return second
    if second == "none":
        return first
    return "mixed"


def parameter_count(modules: Iterable[nn.Module]) -> int:
    """Parameters of ``modules``, each tensor counted once (an adapter holds its model)."""
    unique = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


def backbone_parameters(backbone: Any, input_shape: tuple[int, ...]) -> int | None:
    """The backbone's parameters for ``input_shape`` (its features, without a head), built
    on the meta device: no memory, no arithmetic. None where it cannot be built there."""
    import torch

    try:
        with torch.device("meta"):
            features, _ = backbone.build_features(tuple(input_shape))
        return parameter_count([features])
    except Exception:  # a plugin's network that will not build on the meta device
        return None


# -- the rules ----------------------------------------------------------------------------------
def batch_norm_at_test(mode: str, protocol: PredictionProtocol) -> tuple[str, bool | None, str]:
    """What a test query is normalised with, whether its prediction depends on the other
    queries, and why, from the networks' mode and the learner's declaration."""
    scope = protocol.batch_statistics
    algorithm = protocol.transductive_because
    if not protocol.running_statistics and mode in ("running", "mixed"):
        mode = "batch"  # predicted in training mode: running statistics are kept, never read
    if mode not in MODES:
        return "not known", (True if algorithm else None), algorithm or "not known"
    if mode == "none":
        words, depends = "none (the networks have no batch norm)", False
        reason = "no batch norm"
    elif mode == "running":
        words, depends = "running statistics (eval mode)", False
        reason = "batch norm uses the running statistics gathered in training"
    else:
        over = "examples the learner does not declare" if scope == UNDECLARED else scope
        words = f"batch statistics of {over}"
        if mode == "mixed":
            words += " (running statistics where a batch norm keeps them)"
        depends = scope in TRANSDUCTIVE_SCOPES
        if scope == UNDECLARED:
            reason = (
                "the networks normalise with batch statistics and the learner does not declare "
                "which examples share a query's forward pass (counted transductive)"
            )
        elif depends:
            reason = (
                f"a query is normalised with batch statistics over {scope}, other queries included"
            )
        elif scope == SUPPORT_ONLY:
            reason = "a query is normalised with the support set's batch statistics"
        elif scope == SUPPORT_AND_ONE_QUERY:
            reason = "each query is forwarded with the support set alone"
        else:
            reason = f"batch statistics over {scope}"
    if algorithm:
        return words, True, algorithm + ("; " + reason if depends else "")
    if not depends:
        reason += ": no query's prediction depends on another query"
        if mode == "none" and scope == UNDECLARED:
            reason += " (the learner declares no transductive step)"
    return words, depends, reason


def model_selection(config: dict[str, Any], kept_step: int | None) -> dict[str, Any]:
    """Which split chose the kept state: the validation split's fixed episodes, every
    ``validate_every`` steps, or the last state when there are none."""
    train = config.get("train") or {}
    episodes = train.get("val_episodes", 0)
    if not episodes:
        return {"by": "the last state (no validation episodes)", "kept_step": kept_step}
    dataset = (config.get("dataset") or {}).get("name", "the dataset")
    return {
        "by": f"the validation split of {dataset}",
        "episodes": episodes,
        "every": train.get("validate_every"),
        "kept_step": kept_step,
    }


def _choice(section: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if section is None else dict(section)


def build_card(
    config: dict[str, Any],
    protocol: PredictionProtocol,
    mode: str,
    *,
    has_ways: bool = True,
    pretraining: str = "none",
    backbone_size: int | None = None,
    learner_size: int | None = None,
    training: dict[str, Any] | None = None,
    kept_step: int | None = None,
    recorded: str = RECORDED,
) -> dict[str, Any]:
    """The card of a cell whose stored configuration is ``config``, from the learner's
    declaration ``protocol`` and its networks' batch-norm ``mode``."""
    tasks, evaluation = config.get("tasks") or {}, config.get("eval") or {}
    train = config.get("train") or {}
    dataset = _choice(config.get("dataset")) or {}
    dataset["augmentation"] = list(train.get("augment") or []) or "none"
    words, transductive, why = batch_norm_at_test(mode, protocol)
    if has_ways:
        test = {
            "episodes": evaluation.get("episodes"),
            "ways": tasks.get("ways"),
            "shots": tasks.get("shots"),
            "queries_per_class": evaluation.get("query"),
        }
    else:
        test = {"tasks": evaluation.get("episodes")}
    return {
        "format": CARD_FORMAT,
        "recorded": recorded,
        "dataset": dataset,
        "test_dataset": _choice(evaluation.get("dataset")),
        "backbone": {**(config.get("backbone") or {}), "parameters": backbone_size},
        "learner": {"name": (config.get("learner") or {}).get("name"), "parameters": learner_size},
        "training": training or {"steps": None},
        "test": test,
        "adaptation": {
            "how": protocol.adaptation or "not declared",
            "steps": protocol.adaptation_steps,
        },
        "batch_norm": mode or "not known",  # the networks' batch norms, as found
        "batch_norm_at_test": words,
        "transductive": transductive,
        "why": why,
        "model_selection": model_selection(config, kept_step),
        "external_data": pretraining,
        "ensemble": protocol.ensemble,
    }


# -- from what ran -------------------------------------------------------------------------------
def training_seen(learner: Learner, steps: int, has_ways: bool) -> dict[str, Any]:
    """Steps run and what they drew: episodes (tasks, for an environment) and labelled
    examples, from the learner's batch kind and size at each step (a learner with stages,
    Meta-Baseline, draws examples first and episodes after)."""
    from fewbench.plugin.learner import Learner as Base

    counts = {"episodes": 0, "examples": 0}
    if type(learner).batch_kind_at is Base.batch_kind_at:
        kind = learner.batch_kind
        counts[kind] = steps * learner.batch_size()
    else:
        for iteration in range(1, steps + 1):
            kind = learner.batch_kind_at(iteration)
            counts[kind] = counts.get(kind, 0) + learner.batch_size()
    seen: dict[str, Any] = {"steps": steps}
    if counts.get("episodes"):
        seen["episodes" if has_ways else "tasks"] = counts["episodes"]
    if counts.get("examples"):
        seen["examples"] = counts["examples"]
    return seen


def card_of_run(cell: Any, setup: Any, outcome: Any) -> dict[str, Any]:
    """The card of a finished cell, from its set-up learner and networks (``setup``, a
    :class:`fewbench.running.worker.CellSetup`) and its training ``outcome``."""
    learner = setup.learner
    has_ways = setup.task_type.has_ways
    modules = learner_modules(learner)
    backbone = setup.context.backbone
    return build_card(
        cell.config,
        learner.prediction_protocol(),
        batch_norm_mode(modules),
        has_ways=has_ways,
        pretraining=backbone.pretraining(),
        backbone_size=backbone_parameters(backbone, setup.context.input_shape),
        learner_size=parameter_count(modules),
        training=training_seen(learner, outcome.iterations, has_ways),
        kept_step=outcome.best_iteration,
    )


def failed_card(exc: BaseException) -> dict[str, Any]:
    """What is stored when a card cannot be derived: a finished cell's result is never lost
    to its card, and the reports say the card is not recorded."""
    return {"format": CARD_FORMAT, "error": f"{type(exc).__name__}: {exc}"}


# -- from a stored configuration -------------------------------------------------------------------
def card_of_config(
    config: dict[str, Any],
    *,
    iterations: int | None = None,
    kept_step: int | None = None,
    registry: Registry | None = None,
) -> dict[str, Any] | None:
    """The card a cell's stored configuration gives, for a cell stored without one: the
    learner's declaration and the backbone's declared batch-norm mode (no network is
    built, so no parameter counts). None where the plugins are not installed or refuse
    the configuration."""
    try:
        if registry is None:
            from fewbench.registry import Registry

            registry = Registry()
        parts = {}
        for kind in ("dataset", "backbone", "learner"):
            section = dict(config[kind])
            name = section.pop("name")
            if not registry.has(kind, name):
                return None
            parts[kind] = (registry.get(kind, name), section)
        learner = parts["learner"][0].build(**parts["learner"][1])
        backbone = parts["backbone"][0].build(**parts["backbone"][1])
        protocol = learner.prediction_protocol()
        from fewbench.plugin.task_types import task_type_of

        has_ways = task_type_of(parts["dataset"][0].cls.task_type).has_ways
        mode = combined_mode(backbone.batch_norm_mode(), protocol.own_batch_norm)
        return build_card(
            config,
            protocol,
            mode,
            has_ways=has_ways,
            pretraining=backbone.pretraining(),
            training={"steps": iterations},
            kept_step=kept_step,
            recorded=DERIVED,
        )
    except Exception:  # a configuration its plugins no longer accept: no card, not a crash
        return None
