"""Figures from stored results (matplotlib, PNG and PDF), for papers and the HTML report.

* training curves: loss and validation metric by iteration, one line per method,
  the band spanning the seeds (mean line, min-max band);
* accuracy against shots and against ways, with 95% CI error bars (when the runs
  hold more than one value of that axis);
* the distribution of per-episode results per method (box plots, mean ± CI marked).

Methods are named as the report names them (:mod:`fewbench.reports.names`: ``names`` maps a
learner label to its name), a smoke run's (capped) with its iterations, and each figure
comes with a caption saying what it shows (``captions``: file stem -> text), which the HTML
report prints under it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fewbench.plugin.task_types import by_metric  # noqa: E402
from fewbench.reports.results import Results, Setting  # noqa: E402
from fewbench.reports.stats import mean_ci95  # noqa: E402

UNITS = {"accuracy": "accuracy (%)", "mse": "mean squared error", "return": "average return"}
STEPS_NAME = re.compile(r"return_after_(\d+)_steps")
FIGURE_FORMATS = ("png", "pdf")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


Names = Mapping[str, str] | None  # learner label -> the name shown


def method_name(s: Setting, with_backbone: bool, names: Names = None) -> str:
    """A legend's or an axis's name of a method; a capped setting says so."""
    learner = (names or {}).get(str(s.keys["learner"]), str(s.keys["learner"]))
    name = f"{learner} / {s.keys['backbone']}" if with_backbone else learner
    return f"{name} (capped: {s.cap.ran:,} of {s.cap.planned:,} it.)" if s.cap is not None else name


def setting_name(s: Setting) -> str:
    if not by_metric(s.metric).has_ways:  # an environment's tasks have no ways or shots
        return str(s.keys["dataset"])
    return f"{s.keys['dataset']} {s.keys['ways']}-way {s.keys['shots']}-shot"


def _save(
    fig: plt.Figure,
    out_dir: Path,
    name: str,
    formats: tuple[str, ...],
    caption: str = "",
    captions: dict[str, str] | None = None,
) -> list[Path]:
    if captions is not None:
        captions[name] = caption
    paths = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _legend_outside(ax: plt.Axes) -> None:
    """Right of the plot, where it cannot cover a line."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=9)


def _grouped(
    results: Results, keep: Callable[[Setting], bool] = lambda s: True
) -> tuple[bool, dict[str, list[Setting]]]:
    """Whether the runs hold several backbones (then a method's name says its backbone),
    and the settings ``keep`` accepts, grouped by what one figure shows."""
    several_backbones = len({s.keys["backbone"] for s in results.settings}) > 1
    by_setting: dict[str, list[Setting]] = {}
    for s in results.settings:
        if keep(s):
            by_setting.setdefault(setting_name(s), []).append(s)
    return several_backbones, by_setting


def training_curves(
    results: Results,
    out_dir: Path,
    formats=FIGURE_FORMATS,
    names: Names = None,
    captions: dict[str, str] | None = None,
) -> list[Path]:
    paths: list[Path] = []
    several_backbones, by_setting = _grouped(results)
    for name, settings in by_setting.items():
        fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
        drawn = False
        metric = next((s.metric for s in settings if s.done), "accuracy")
        scale = by_metric(metric).scale
        for s in settings:
            curves = [results.curves[c] for c in s.cell_ids if c in results.curves]
            if not curves:
                continue
            drawn = True
            label = method_name(s, several_backbones, names)
            for ax, column, factor in ((loss_ax, "loss", 1.0), (val_ax, "val_metric", scale)):
                frames = [
                    c[["iteration", column]].dropna().set_index("iteration")[column] for c in curves
                ]
                table = pd.concat(frames, axis=1).dropna() * factor
                if table.empty:
                    continue
                # A curve of one point (a smoke run's) is a marker, not an invisible line.
                marker = "o" if len(table) == 1 else None
                (line,) = ax.plot(
                    table.index, table.mean(axis=1), label=label, linewidth=1.5, marker=marker
                )
                if table.shape[1] > 1:
                    ax.fill_between(
                        table.index, table.min(axis=1), table.max(axis=1),
                        color=line.get_color(), alpha=0.2, linewidth=0,
                    )  # fmt: skip
        if not drawn:
            plt.close(fig)
            continue
        seeds = max((s.values.shape[0] for s in settings if s.done), default=1)
        band = " (band: min-max over seeds)" if seeds > 1 else ""
        loss_ax.set(title="Training loss", xlabel="training iteration", ylabel="loss (per batch)")
        loss_ax.set_yscale("log")
        val_ax.set(
            title=f"Validation {UNITS[metric]}",
            xlabel="training iteration",
            ylabel=f"validation {UNITS[metric]}",
        )
        for ax in (loss_ax, val_ax):
            ax.grid(alpha=0.3)
        _legend_outside(val_ax)
        fig.suptitle(f"Training curves: {name}{band}")
        caption = (
            f"Training loss and validation {UNITS[metric]} against training iteration, {name}: "
            f"one line per method{band}."
        )
        paths += _save(fig, out_dir, f"curves-{slug(name)}", formats, caption, captions)
    return paths


def metric_against(
    axis: str,
    results: Results,
    out_dir: Path,
    formats=FIGURE_FORMATS,
    names: Names = None,
    captions: dict[str, str] | None = None,
) -> list[Path]:
    """Accuracy against ``axis`` (shots or ways), one line per method, CI error bars."""
    other = "ways" if axis == "shots" else "shots"
    several_backbones = len({s.keys["backbone"] for s in results.settings}) > 1
    groups: dict[tuple, list[Setting]] = {}
    for s in results.settings:
        if s.done:
            groups.setdefault((s.keys["dataset"], s.keys[other]), []).append(s)
    paths: list[Path] = []
    for (dataset, fixed), settings in groups.items():
        if len({s.keys[axis] for s in settings}) < 2:
            continue
        metric = settings[0].metric
        fig, ax = plt.subplots(figsize=(6.5, 4))
        methods: dict[str, list[Setting]] = {}
        for s in settings:
            methods.setdefault(method_name(s, several_backbones, names), []).append(s)
        values = sorted({s.keys[axis] for s in settings})
        position = {v: i for i, v in enumerate(values)}  # evenly spaced, labelled by value
        for number, (label, members) in enumerate(methods.items()):
            members.sort(key=lambda s: s.keys[axis])
            estimates = [s.estimate() for s in members]
            dodge = (number - (len(methods) - 1) / 2) * 0.06  # error bars side by side
            ax.errorbar(
                [position[s.keys[axis]] + dodge for s in members], [m for m, _ in estimates],
                yerr=[c for _, c in estimates], marker="o", capsize=4, label=label,
            )  # fmt: skip
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlim(-0.4, len(values) - 0.6)
        fixed_text = f"{fixed}-way" if other == "ways" else f"{fixed}-shot"
        ax.set(
            title=f"{dataset} {fixed_text}: {UNITS[metric]} against {axis}",
            xlabel=f"{axis} ({'examples per class in the support set' if axis == 'shots' else 'classes per episode'})",
            ylabel=f"test {UNITS[metric]} (mean ± 95% CI)",
        )
        ax.grid(alpha=0.3)
        _legend_outside(ax)
        caption = (
            f"Test {UNITS[metric]} against {axis}, {dataset} {fixed_text}: one line per method, "
            "mean and 95% confidence interval."
        )
        stem = f"{metric}-vs-{axis}-{slug(dataset)}-{slug(fixed_text)}"
        paths += _save(fig, out_dir, stem, formats, caption, captions)
    return paths


def episode_distributions(
    results: Results,
    out_dir: Path,
    formats=FIGURE_FORMATS,
    names: Names = None,
    captions: dict[str, str] | None = None,
) -> list[Path]:
    several_backbones, by_setting = _grouped(results, lambda s: s.done)
    paths: list[Path] = []
    for name, settings in by_setting.items():
        metric = settings[0].metric
        fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(settings) + 2), 4))
        data = [s.scale * s.per_episode for s in settings]
        labels = [method_name(s, several_backbones, names) for s in settings]
        ax.boxplot(data, showfliers=True, widths=0.5, flierprops={"markersize": 3, "alpha": 0.4})
        ax.set_xticks(range(1, len(labels) + 1), labels)
        for i, s in enumerate(settings, start=1):
            mean, ci = s.estimate()
            ax.errorbar(
                [i + 0.32], [mean], yerr=[ci], fmt="D", color="tab:red", capsize=3, markersize=4
            )
        episodes = settings[0].values.shape[1]
        ax.set(
            title=f"Per-episode test {UNITS[metric]}: {name} ({episodes} episodes)",
            xlabel="method",
            ylabel=f"per-episode {UNITS[metric]}",
        )
        ax.plot([], [], "D", color="tab:red", label="mean ± 95% CI")
        _legend_outside(ax)
        ax.grid(axis="y", alpha=0.3)
        what = "episode" if by_metric(metric).has_ways else "task"
        caption = (
            f"Per-{what} test {UNITS[metric]} of each method, {name} ({episodes} {what}s): "
            "box plots; the red diamond is the mean with its 95% confidence interval."
        )
        paths += _save(fig, out_dir, f"episodes-{slug(name)}", formats, caption, captions)
    return paths


def returns_by_steps(
    results: Results,
    out_dir: Path,
    formats=FIGURE_FORMATS,
    names: Names = None,
    captions: dict[str, str] | None = None,
) -> list[Path]:
    """Average return against the number of gradient steps at test time, one line per
    learner, mean ± 95% CI over tasks and seeds (Finn et al. 2017, figure 5)."""
    several_backbones, by_setting = _grouped(
        results, lambda s: s.done and any(STEPS_NAME.fullmatch(name) for name in s.extras)
    )
    paths: list[Path] = []
    for name, settings in by_setting.items():
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for number, s in enumerate(settings):
            steps = _steps_of(s)
            estimates = [mean_ci95(s.extras[key]) for _, key in steps]
            dodge = (number - (len(settings) - 1) / 2) * 0.04
            ax.errorbar(
                [k + dodge for k, _ in steps], [e.mean for e in estimates],
                yerr=[e.ci95 for e in estimates], marker="o", capsize=4,
                label=method_name(s, several_backbones, names),
            )  # fmt: skip
        ax.set_xticks(sorted({k for s in settings for k, _ in _steps_of(s)}))
        tasks = settings[0].values.shape[1]
        ax.set(
            title=f"{name}: return after adaptation ({tasks} test tasks)",
            xlabel="number of gradient steps",
            ylabel="average return (mean ± 95% CI)",
        )
        ax.grid(alpha=0.3)
        _legend_outside(ax)
        caption = (
            f"Average return against the number of gradient steps at test time, {name} "
            f"({tasks} test tasks): one line per method, mean and 95% confidence interval."
        )
        paths += _save(fig, out_dir, f"return-vs-steps-{slug(name)}", formats, caption, captions)
    return paths


def _steps_of(s: Setting) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), k) for k in s.extras if (m := STEPS_NAME.fullmatch(k)))


def plot_all(
    results: Results,
    out_dir: Path,
    formats: tuple[str, ...] = FIGURE_FORMATS,
    names: Names = None,
    captions: dict[str, str] | None = None,
) -> list[Path]:
    """Every figure of ``results`` into ``out_dir``; ``names``: learner label -> the name
    shown (default: the report's, :func:`fewbench.reports.names.learner_names`); each figure's
    caption into ``captions`` (file stem -> text) when given."""
    if names is None:
        from fewbench.reports.names import learner_names

        names = learner_names(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    return (
        training_curves(results, out_dir, formats, names, captions)
        + metric_against("shots", results, out_dir, formats, names, captions)
        + metric_against("ways", results, out_dir, formats, names, captions)
        + episode_distributions(results, out_dir, formats, names, captions)
        + returns_by_steps(results, out_dir, formats, names, captions)
    )
