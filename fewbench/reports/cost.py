"""``report --cost``: what each number cost, from the cells' cost records.

Each setting (its seeds merged) gets the device it ran on, the learner's parameters, its
training time per seed, inference time per test episode, peak memory and GPU-hours; then
GPU-hours are summed per method. The records are :mod:`fewbench.running.cost`'s; a setting
whose cells finished before fewbench recorded costs shows ``n/a`` (``fewbench status`` still
shows their training and evaluation times).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fewbench.reports.results import Setting
from fewbench.reports.wording import counted

COLUMNS = (
    "device",
    "parameters",
    "train / seed",
    "inference / episode",
    "peak memory",
    "GPU-hours",
)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, int | float) and v == v]
    return sum(values) / len(values) if values else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def per_episode(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def memory(size: float | None) -> str:
    if size is None:
        return "n/a"
    mib = size / 2**20
    return f"{mib:,.0f} MiB" if mib < 10_240 else f"{mib / 1024:,.1f} GiB"


def parameters(count: float | None) -> str:
    if count is None:
        return "n/a"
    if count >= 1e6:
        return f"{count / 1e6:.2f} M"
    if count >= 1e3:
        return f"{count / 1e3:.1f} k"
    return str(int(count))


def summary(setting: Setting) -> dict[str, Any]:
    """The setting's cost, seeds merged: the device models, mean parameters, mean training
    and inference time per seed, the largest peak memory and what it measures, GPU-hours
    summed over seeds; None for what no record holds."""
    records = setting.costs
    models = sorted(
        {
            f"{r.get('device_model')}" + (f" x{r['devices']}" if r.get("devices", 1) > 1 else "")
            for r in records
            if r.get("device_model")
        }
    )
    peaks = [r.get("peak_memory_bytes") for r in records]
    peaks = [p for p in peaks if isinstance(p, int | float)]
    kinds = sorted({str(r.get("peak_memory_of")) for r in records if r.get("peak_memory_of")})
    gpu = [r.get("gpu_hours") for r in records if isinstance(r.get("gpu_hours"), int | float)]
    return {
        "device_model": "; ".join(models) or None,
        "parameters": _mean([r.get("parameters") for r in records]),
        "train_seconds": _mean([r.get("train_seconds") for r in records]),
        "inference_seconds_per_episode": _mean(
            [r.get("inference_seconds_per_episode") for r in records]
        ),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_memory_of": "; ".join(kinds) or None,
        "gpu_hours": sum(gpu) if gpu else None,
        "cells_with_cost": len(records),
    }


def row(setting: Setting) -> list[str]:
    cost = summary(setting)
    return [
        cost["device_model"] or "n/a",
        parameters(cost["parameters"]),
        duration(cost["train_seconds"]),
        per_episode(cost["inference_seconds_per_episode"]),
        memory(cost["peak_memory_bytes"]),
        gpu_hours(setting, cost["gpu_hours"]),
    ]


def on_cpu_only(setting: Setting) -> bool:
    return bool(setting.costs) and all(r.get("device") == "cpu" for r in setting.costs)


def gpu_hours(setting: Setting, hours: float | None) -> str:
    if hours is None:
        return "n/a"
    return "0 (CPU)" if on_cpu_only(setting) else f"{hours:.2f}"


def gpu_hours_by_method(entries: list[tuple[str, Setting]]) -> dict[str, float]:
    """GPU-hours summed per method name over its settings (a method with no record: absent)."""
    totals: dict[str, float] = defaultdict(float)
    for name, setting in entries:
        hours = summary(setting)["gpu_hours"]
        if hours is not None:
            totals[name] += hours
    return dict(totals)


def _memory_note(settings: list[Setting]) -> str:
    kinds = {summary(s)["peak_memory_of"] for s in settings} - {None}
    notes = []
    if any("cuda" in k for k in kinds):
        notes.append("on CUDA the most memory the allocator handed out")
    if any("resident" in k for k in kinds):
        notes.append("on the CPU the worker's peak resident set during the cell")
    if any("worker process" in k for k in kinds):
        notes.append("(where it could not be reset per cell: since the worker started)")
    return "; ".join(notes)


def notes(entries: list[tuple[str, str, Setting]]) -> list[str]:
    """What the columns measure, GPU-hours per method, and the settings without records."""
    totals = gpu_hours_by_method([(method, s) for method, _, s in entries])
    missing = sum(1 for _, _, s in entries if s.done and not s.costs)
    out = [
        "Train / seed: wall time of training, mean over seeds; inference / episode: "
        "evaluation time per test episode (test-time adaptation included); peak memory: "
        + (_memory_note([s for _, _, s in entries]) or "n/a")
        + "; GPU-hours: (training + evaluation) x GPUs, summed over seeds."
    ]
    if totals and all(on_cpu_only(s) for _, _, s in entries if s.costs):
        out.append("No GPU time: every cell with a cost record ran on the CPU.")
    elif totals:
        out.append(
            "GPU-hours per method: "
            + ", ".join(f"{name} {hours:.2f}" for name, hours in sorted(totals.items()))
            + "."
        )
    if missing:
        out.append(f"n/a: {counted(missing, 'setting')} finished before fewbench recorded costs.")
    return out


def section(
    entries: list[tuple[str, str, Setting]],
    fmt: str,
    escape: Callable[[str], str] | None = None,
) -> str:
    """The cost table after the report (``entries``: each setting's method name, title and
    setting), as text, Markdown or LaTeX."""
    if not entries:
        return ""
    rows = [[title, *row(s)] for _, title, s in entries]
    header = ["setting", *COLUMNS]
    notes_ = notes(entries)
    if fmt == "markdown":
        out = ["", "## Cost", "", "| " + " | ".join(header) + " |"]
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join([*out, "", *notes_]) + "\n"
    if fmt == "latex":
        escape = escape or (lambda text: text)
        out = ["", r"\paragraph{Cost.}", r"\begin{tabular}{l" + "r" * len(COLUMNS) + "}"]
        out += [r"\toprule", " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
        out += [" & ".join(escape(c) for c in r) + r" \\" for r in rows]
        out += [r"\bottomrule", r"\end{tabular}", "", *(escape(n) for n in notes_)]
        return "\n".join(out) + "\n"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["", "Cost:"]
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join([*lines, "", *notes_]) + "\n"
