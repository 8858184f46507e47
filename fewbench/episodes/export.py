"""``fewbench episodes export``: the fixed test episodes of a run's (or a suite's) cells,
written as a manifest.

Cells of one episode setting (the same test dataset, ways, shots, query, evaluation seed
and number of episodes, and the same dataset in reports) are tested on the same episodes,
whatever their learner, backbone or seed: one manifest serves them all. A source whose
cells have several settings is refused, listing them; naming a cell (or narrowing a suite
with ``--set``) picks one. A suite needs no training: its cells are expanded, not run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fewbench.episodes.draw import EpisodeSetting, canonical_json, draw_episodes
from fewbench.episodes.manifest import build_manifest, manifest_text
from fewbench.errors import FewbenchError
from fewbench.registry import Registry
from fewbench.suite.cell import Cell


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote: the file, the setting, the cells it serves, the hash."""

    path: Path
    setting: EpisodeSetting
    cells: list[str]
    sha256: str


def episode_setting(cell: Cell) -> EpisodeSetting:
    """The test episodes of ``cell``: its ``eval.dataset`` (cross-domain), else its dataset."""
    return EpisodeSetting(
        dict(cell.eval.dataset or cell.dataset.config()),
        cell.ways,
        cell.shots,
        cell.eval.query,
        cell.eval.seed,
        cell.eval.episodes,
    )


def report_entry(cell: Cell) -> dict[str, Any]:
    """How reports group and pair ``cell`` (fewbench.reports.results: its dataset label and
    configuration): a scored cell copies it, so that it meets ``cell`` in every table."""
    return {
        "dataset": cell.dataset.config(),
        "dataset_label": cell.labels["dataset"],
        "eval_dataset": cell.eval.dataset,
    }


def cells_of(source: Path, sets: list[str], registry: Registry) -> list[Cell]:
    """The cells of a run directory (as last run) or of a suite file (expanded, not run)."""
    source = Path(source)
    if source.is_dir():
        if sets:
            raise FewbenchError(
                f"--set applies to a suite file; {source} is a run directory (name a cell)"
            )
        from fewbench.storage.store import ResultsStore

        store = ResultsStore.open_run(source, must_exist=True, readonly=True)
        try:
            return [store.cell(cell_id) for cell_id in store.current_cells()]
        finally:
            store.close()
    if not source.is_file():
        raise FewbenchError(f"{source}: no such run directory or suite file")
    from fewbench.suite.check import check_suite
    from fewbench.suite.grid import expand_grid
    from fewbench.suite.loading import load_suite_file

    return expand_grid(check_suite(load_suite_file(source, list(sets)), registry)).cells


def chosen_cells(source: Path, cells: list[Cell], cell: str | None) -> list[Cell]:
    """The cells of the one setting to export: the named cell's (by label or id), or the
    only setting's; several settings are refused, listing them."""
    if not cells:
        raise FewbenchError(f"{source} holds no cells")
    if cell is not None:
        named = [c for c in cells if cell in (c.id, c.label)]
        if not named:
            shown = ", ".join(c.label for c in cells[:5]) + (", ..." if len(cells) > 5 else "")
            raise FewbenchError(f"{source} has no cell {cell!r}; its cells: {shown}")
        cells = [c for c in cells if _key(c) == _key(named[0])]
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(_key(c), []).append(c)
    if len(groups) > 1:
        shown = "; ".join(
            episode_setting(members[0]).describe(members[0].labels["dataset"])
            for members in groups.values()
        )
        raise FewbenchError(
            f"{source}: its cells are tested on {len(groups)} episode settings ({shown}); "
            "name a cell of the one to export (or narrow a suite with --set)"
        )
    return cells


def _key(cell: Cell) -> str:
    return canonical_json([episode_setting(cell).__dict__, report_entry(cell)])


def _shareable(file: IO[bytes], text: str) -> None:
    """Write ``text``, readable as any new file of this user is (the temporary file an
    atomic write starts from is the owner's alone): a manifest is made to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(file.fileno(), 0o666 & ~umask)
    file.write(text.encode("utf-8"))


def check_destination(out: Path, force: bool) -> None:
    """Refuse before any data is read: a folder, a missing folder, a file without --force."""
    if out.is_dir():
        raise FewbenchError(f"-o {out}: is a folder; give the manifest's file name")
    if not out.parent.is_dir():
        raise FewbenchError(f"-o {out}: the folder {out.parent} does not exist")
    if out.exists() and not force:
        raise FewbenchError(f"-o {out}: exists; give --force to replace it")


def export_episodes(
    source: Path,
    cell: str | None,
    out: Path,
    *,
    data_root: Path,
    cache_dir: Path,
    sets: list[str] | None = None,
    force: bool = False,
    registry: Registry | None = None,
) -> Exported:
    """Write the manifest of ``source``'s test episodes (one setting) to ``out``,
    atomically; returns what was written."""
    from fewbench.storage.atomic import write_atomically

    out = Path(out)
    check_destination(out, force)
    registry = registry or Registry()
    cells = chosen_cells(Path(source), cells_of(Path(source), list(sets or []), registry), cell)
    setting = episode_setting(cells[0])
    drawn = draw_episodes(setting, data_root, cache_dir, registry)
    manifest = build_manifest(drawn, report_entry(cells[0]), [c.label for c in cells])
    try:
        write_atomically(out, lambda f: _shareable(f, manifest_text(manifest)))
    except PermissionError:
        raise FewbenchError(f"-o {out}: cannot write in {out.parent} (permission denied)") from None
    return Exported(out, setting, [c.label for c in cells], manifest["sha256"])
