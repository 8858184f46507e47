"""One self-contained HTML file: the table, the figures, the suites and environments.

Nothing is fetched when the file opens: styles are inline, figures are embedded
as base64 PNG, and there is no script. It opens from disk on a machine with no
network, and can be attached to an e-mail or a review.

Each figure's caption says what it shows. "Settings that ran" gives each setting's
effective training iterations and episodes (what the cells did, after a smoke run's
``--max-iterations`` and ``--max-episodes``), since the suites shown below are as written.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

from fewbench.reports.formats import Entry, ReferenceEntry, ReportTable, lead_columns
from fewbench.reports.plots import plot_all, setting_name
from fewbench.reports.protocol import card_lines
from fewbench.reports.results import Results, Setting, printable_path
from fewbench.version import __version__

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
table.results { border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }
table.results th, table.results td { padding: 0.35rem 0.8rem; text-align: center; }
table.results th.dim, table.results td.dim { text-align: left; }
table.results thead th { border-bottom: 1px solid #444; border-top: 2px solid #222; }
table.results tbody tr:last-child td { border-bottom: 2px solid #222; }
td.best { font-weight: bold; }
td.capped, tr.capped td { color: #8a5a00; }
tr.published td { color: #555; font-style: italic; font-size: 0.92em; }
p.caption { font-size: 0.92em; color: #444; max-width: 60rem; }
figure { margin: 1.2rem 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; font-size: 0.85em; }
"""


def _entry_cell(entry: Entry | ReferenceEntry | None, decimals: int) -> str:
    if entry is None:
        return "<td></td>"
    if isinstance(entry, ReferenceEntry):
        return f"<td>{html.escape(entry.text(decimals))}</td>"
    text = html.escape(entry.text(decimals))
    cap = entry.setting.cap if isinstance(entry, Entry) else None  # a RankEntry has none
    capped = (
        f' class="capped" title="a smoke run: {html.escape(cap.text())}"' if cap is not None else ""
    )
    if entry.mark.best:
        css = ' class="best capped"' if cap is not None else ' class="best"'
        return f'<td{css} title="best in this column">{text}</td>'
    if entry.mark.tie:
        p = entry.mark.p_adjusted
        css = ' class="tie capped"' if cap is not None else ' class="tie"'
        return f'<td{css} title="not significantly different from the best (adjusted p = {p:.3g})">{text} †</td>'
    return f"<td{capped}>{text}</td>"


def table_html(table: ReportTable) -> str:
    o = table.options
    blocked = any(row.block for row in table.rows)  # settings kept apart: fewbench.reports.protocol
    head = "".join(f'<th class="dim">{html.escape(d)}</th>' for d in lead_columns(table))
    head += "".join(f"<th>{html.escape(label)}</th>" for label in table.column_labels)
    body = []
    for row in table.rows:
        css = ' class="published"' if row.reference is not None else ""
        shown = (row.block, *row.labels) if blocked else row.labels
        cells = "".join(f'<td class="dim">{html.escape(v)}</td>' for v in shown)
        cells += "".join(_entry_cell(row.entries.get(col), o.decimals) for col in table.columns)
        body.append(f"<tr{css}>{cells}</tr>")
    return (
        f'<table class="results"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
        f'<p class="caption">{html.escape(table.caption.replace("{best}", "Bold"))}</p>'
    )


def _figure(path: Path, caption: str) -> str:
    """An embedded figure under its caption (what it shows, not its file name)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    text = html.escape(caption or path.stem.replace("-", " "))
    return (
        f'<figure><img alt="{text}" src="data:image/png;base64,{data}">'
        f"<figcaption>{text}</figcaption></figure>"
    )


def _iterations(s: Setting) -> str:
    if s.cap is not None:
        return f"{s.cap.ran:,} of {s.cap.planned:,} (capped)"
    return f"{s.iterations:,}" if s.iterations is not None else "not finished"


def settings_html(table: ReportTable) -> str:
    """What each setting ran: training iterations (of what its settings give, where a smoke
    run capped them), validation and test episodes and queries, seeds. From the cells'
    stored configurations and results, so it shows a smoke run as the smoke run it was."""
    head = (
        "<tr><th class='dim'>learner</th><th class='dim'>setting</th><th>backbone</th>"
        "<th>training iterations</th><th>validation episodes</th><th>test episodes</th>"
        "<th>test queries per class</th><th>seeds</th><th>status</th></tr>"
    )
    body = []
    for s in table.settings:
        train, evaluation = s.config.get("train") or {}, s.config.get("eval") or {}
        setting = setting_name(s)
        css = ' class="capped"' if s.cap is not None else ""
        cells = [
            table.name(s.keys["learner"]),
            setting,
            str(s.keys["backbone"]),
            _iterations(s),
            str(train.get("val_episodes", "?")),
            str(s.values.shape[1] if s.done else evaluation.get("episodes", "?")),
            str(evaluation.get("query", "?")),
            str(len(s.cell_ids)),
            s.status,
        ]
        tds = "".join(
            f'<td class="dim">{html.escape(c)}</td>' if i < 2 else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(cells)
        )
        body.append(f"<tr{css}>{tds}</tr>")
    note = (
        "<p class='caption'>Capped: a smoke run (fewbench run --max-iterations) trained fewer "
        "iterations than its settings give. The suites below are as written, before any cap.</p>"
        if any(s.cap is not None for s in table.settings)
        else ""
    )
    return (
        f'<table class="results"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>' + note
    )


def protocol_html(table: ReportTable) -> str:
    """``--protocol``: each setting's protocol card (fewbench.reports.protocol)."""
    parts = ["<h2>Protocol cards</h2>"]
    for s in table.settings:
        title = f"{table.name(s.keys['learner'])}, {s.keys['backbone']}, {setting_name(s)}"
        lines = "\n".join(card_lines(s.protocol))
        parts.append(f"<h3>{html.escape(title)}</h3><pre>{html.escape(lines)}</pre>")
    return "".join(parts)


def cost_html(table: ReportTable) -> str:
    """``--cost``: what each setting cost (fewbench.reports.cost)."""
    from fewbench.reports import cost

    entries = [
        (
            table.name(s.keys["learner"]),
            f"{table.name(s.keys['learner'])}, {s.keys['backbone']}, {setting_name(s)}",
            s,
        )
        for s in table.settings
    ]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("setting", *cost.COLUMNS))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in (title, *cost.row(s))) + "</tr>"
        for _, title, s in entries
    )
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in cost.notes(entries))
    return (
        f'<h2>Cost</h2><table class="results"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>{notes}"
    )


def to_html(table: ReportTable, results: Results) -> str:
    captions: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = plot_all(results, Path(tmp), ("png",), table.names, captions)
        figures = "".join(_figure(p, captions.get(p.stem, "")) for p in paths)
    runs = []
    for run in results.runs:
        runs.append(
            f"<h3>{html.escape(printable_path(run.path))}</h3>"
            f"<details><summary>Suite</summary><pre>{html.escape(run.suite_text)}</pre></details>"
            "<details><summary>Environment</summary><pre>"
            f"{html.escape(json.dumps(run.environment, indent=2, sort_keys=True))}</pre></details>"
        )
    # A run directory's name may hold any bytes: shown escaped, so the page stays UTF-8.
    names = ", ".join(html.escape(printable_path(Path(run.path.name))) for run in results.runs)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fewbench report: {names}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>fewbench report</h1>
<p>Runs: {names}. Generated by fewbench {__version__} from the results stores only.</p>
<h2>Results</h2>
{table_html(table)}
<h2>Settings that ran</h2>
{settings_html(table)}
{protocol_html(table) if table.options.protocol else ""}
{cost_html(table) if table.options.cost else ""}
<h2>Figures</h2>
{figures or "<p>No figures: nothing has finished yet.</p>"}
<h2>Suites and environments</h2>
{"".join(runs)}
</body>
</html>
"""
