"""Protocol cards in reports: the setting of each number, and where two settings differ.

A cell's card (:mod:`fewbench.running.protocol`) is stored with its result. Reports use it
three ways:

* :func:`kind`: ``inductive``, ``transductive`` or ``not recorded`` (a cell stored before
  cards, or whose card could not be derived). A table mixing kinds keeps them apart
  (:mod:`fewbench.reports.table`: a block per kind, marked in a ``protocol`` column, best and
  † judged within a block), since a transductive number is not the same measurement as an
  inductive one;
* :func:`card_lines` and :func:`summary`: the card in words, for ``report --protocol`` and
  ``fewbench status``;
* :func:`differences`: what differs between two cards, which ``compare`` prints before
  its p-values.

Only the standard library: ``fewbench status`` imports this and must stay fast.
"""

from __future__ import annotations

from typing import Any

INDUCTIVE, TRANSDUCTIVE, NOT_RECORDED = "inductive", "transductive", "not recorded"
KINDS = (INDUCTIVE, TRANSDUCTIVE, NOT_RECORDED)  # the order of a table's blocks

# What a transductive entry is, for captions and pages.
MEANING = (
    "Transductive: a query's prediction depends on the other queries of its episode, through "
    "batch statistics over the query set or a transductive learner; inductive: on the support "
    "set and that query alone."
)

# Card fields that are the method itself, not the setting it was measured in, or that merely
# restate another field: left out of differences.
NOT_COMPARED = {
    "format",
    "recorded",
    "why",
    "learner.name",
    "adaptation.how",
    "model_selection.kept_step",
}

LABELS = {
    "transductive": "transductive",
    "batch_norm_at_test": "batch norm at test",
    "batch_norm": "batch norms in the networks",
    "adaptation.steps": "test-time adaptation steps",
    "learner.parameters": "parameters trained",
    "backbone.parameters": "backbone parameters",
    "external_data": "external pretraining data",
    "ensemble": "ensemble",
}


# The networks' batch norms as found (fewbench.plugin.protocol.MODES), in words.
NETWORK_MODES = {
    "none": "none",
    "running": "all keep running statistics",
    "batch": "none keeps running statistics",
    "mixed": "some keep running statistics",
}


def usable(card: Any) -> bool:
    """A card that was recorded and derived (not None, not an error record)."""
    return isinstance(card, dict) and "error" not in card


def kind(card: dict[str, Any] | None) -> str:
    """``inductive``, ``transductive`` or ``not recorded``."""
    if not usable(card) or not isinstance(card.get("transductive"), bool):
        return NOT_RECORDED
    return TRANSDUCTIVE if card["transductive"] else INDUCTIVE


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return "not recorded" if value is None else str(value)
    return f"{value:,}"


def _params(section: dict[str, Any], skip: tuple[str, ...] = ("name",)) -> str:
    shown = [f"{k} {v}" for k, v in section.items() if k not in skip]
    return ", ".join(shown)


def _steps(value: Any) -> str:
    return "none" if value is None else _number(value)


def summary(card: dict[str, Any] | None) -> str:
    """One line: the kind, what normalises a test query, the test-time steps."""
    if not usable(card):
        return NOT_RECORDED
    steps = (card.get("adaptation") or {}).get("steps")
    step_words = "no test-time steps" if steps is None else f"{_number(steps)} test-time steps"
    return f"{kind(card)}: batch norm {card.get('batch_norm_at_test', '?')}; {step_words}"


def card_lines(card: dict[str, Any] | None) -> list[str]:
    """The card in words, one ``name: value`` line per field."""
    if not usable(card):
        reason = (card or {}).get("error") if isinstance(card, dict) else None
        return [f"protocol card: not recorded{f' ({reason})' if reason else ''}"]
    dataset = dict(card.get("dataset") or {})
    augmentation = dataset.pop("augmentation", "none")
    if isinstance(augmentation, list):
        augmentation = ", ".join(augmentation) or "none"
    backbone = dict(card.get("backbone") or {})
    size = backbone.pop("parameters", None)
    learner = card.get("learner") or {}
    training = dict(card.get("training") or {})
    steps = training.pop("steps", None)
    seen = ", ".join(f"{_number(v)} {k}" for k, v in training.items())
    test = card.get("test") or {}
    if "tasks" in test:
        test_words = f"{_number(test['tasks'])} tasks"
    else:
        test_words = (
            f"{_number(test.get('episodes'))} episodes, {test.get('ways')}-way "
            f"{test.get('shots')}-shot, {test.get('queries_per_class')} queries per class"
        )
    adaptation = card.get("adaptation") or {}
    selection = card.get("model_selection") or {}
    chosen = str(selection.get("by", "not recorded"))
    if selection.get("episodes"):
        chosen += (
            f" ({_number(selection['episodes'])} episodes, every "
            f"{_number(selection.get('every'))} steps)"
        )
    if selection.get("kept_step") is not None:
        chosen += f"; kept the state of step {_number(selection['kept_step'])}"
    lines = [
        f"setting: {kind(card)} ({card.get('why', '')})",
        f"dataset: {dataset.get('name')} ({_params(dataset)}); augmentation: {augmentation}",
    ]
    if card.get("test_dataset"):
        test_dataset = card["test_dataset"]
        lines.append(f"test dataset: {test_dataset.get('name')} ({_params(test_dataset)})")
    lines += [
        f"backbone: {backbone.get('name')} ({_params(backbone)}), {_number(size)} parameters",
        f"learner: {learner.get('name')}, {_number(learner.get('parameters'))} parameters trained",
        f"training: {_number(steps)} steps" + (f", {seen} seen" if seen else ""),
        f"test: {test_words}",
        f"test-time adaptation: {adaptation.get('how', 'not declared')}; steps: "
        f"{_steps(adaptation.get('steps'))}",
        f"batch norm at test: {card.get('batch_norm_at_test', 'not recorded')}"
        + (
            f" (the networks' batch norms: {NETWORK_MODES[card['batch_norm']]})"
            if card.get("batch_norm") in NETWORK_MODES
            else ""
        ),
        f"model selection: {chosen}",
        f"external pretraining data: {card.get('external_data', 'not recorded')}",
        f"ensemble: {card.get('ensemble', 'not recorded')}",
        f"recorded: {card.get('recorded', 'not recorded')}",
    ]
    return lines


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _shown(key: str, value: Any) -> str:
    if key == "transductive" and isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none" if key == "adaptation.steps" else "not recorded"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return _number(value) if isinstance(value, int) else str(value)


def differences(
    first: dict[str, Any] | None,
    second: dict[str, Any] | None,
    names: tuple[str, str] = ("the first", "the second"),
) -> list[str]:
    """What differs between two cards, ``field: first vs second``, the kind first; a side
    without a card is named. Empty when both are the same, or neither was recorded."""
    if not usable(first) and not usable(second):
        return []
    if not usable(first) or not usable(second):
        missing = names[0] if not usable(first) else names[1]
        return [f"no protocol card recorded for {missing}"]
    a, b = _flat(first), _flat(second)
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in NOT_COMPARED]
    keys.sort(key=lambda k: (k not in LABELS, list(LABELS).index(k) if k in LABELS else 0))
    return [
        f"{LABELS.get(k, k.replace('.', ' ').replace('_', ' '))}: "
        f"{_shown(k, a.get(k))} vs {_shown(k, b.get(k))}"
        for k in keys
        if a.get(k) != b.get(k)
    ]


# -- in the report table ------------------------------------------------------------------------
def blocks_needed(cards: list[dict[str, Any] | None]) -> bool:
    """Whether a table's entries (their cards) mix kinds, and so need a block each."""
    return len({kind(card) for card in cards}) > 1


def caption_sentence(cards: list[dict[str, Any] | None], blocked: bool) -> list[str]:
    """What the caption says of the entries' settings: the blocks, or the one kind they all
    share; nothing where no entry has a card (results stored before cards)."""
    kinds = [kind(card) for card in cards]
    if blocked:
        return [
            "Entries measured in different settings are kept apart, a block each, named in the "
            "protocol column; the best and † compare entries of one block only.",
            MEANING[:-1]
            + ("; not recorded: stored without a protocol card." if NOT_RECORDED in kinds else "."),
        ]
    if kinds and kinds[0] != NOT_RECORDED:
        return [f"Every entry is {kinds[0]}.", MEANING]
    return []


def section(entries: list[tuple[str, dict[str, Any] | None]], fmt: str, escape: Any = None) -> str:
    """``report --protocol``: each entry's card under its title (``entries``: title, card),
    as text, Markdown or LaTeX (``escape``: the LaTeX escaping of a text)."""
    if not entries:
        return ""
    if fmt == "markdown":
        out = ["", "## Protocol cards", ""]
        for title, card in entries:
            out += [f"**{title}**", ""] + [f"- {line}" for line in card_lines(card)] + [""]
        return "\n".join(out)
    if fmt == "latex":
        escape = escape or (lambda text: text)
        out = ["", r"\paragraph{Protocol cards.}"]
        for title, card in entries:
            out += [rf"\textbf{{{escape(title)}}}", r"\begin{itemize}"]
            out += [rf"\item {escape(line)}" for line in card_lines(card)]
            out += [r"\end{itemize}"]
        return "\n".join(out) + "\n"
    out = ["", "Protocol cards:"]
    for title, card in entries:
        out += ["", f"{title}:"] + [f"  {line}" for line in card_lines(card)]
    return "\n".join(out) + "\n"
