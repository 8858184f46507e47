"""The arguments of ``fewbench episodes export|score`` (the bodies: fewbench.episodes).

Kept apart from :mod:`fewbench.cli.parser` so that the command is one call there; it
imports nothing but argparse, as the parser must start fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def add_episodes_command(commands: Any) -> None:
    """``episodes`` and its actions, on the parser's subcommands."""
    episodes = commands.add_parser(
        "episodes",
        help="share a setting's fixed test episodes: export a manifest, score an outside "
        "method's predictions on it",
    )
    actions = episodes.add_subparsers(dest="action", required=True)
    export = actions.add_parser(
        "export",
        help="write the fixed test episodes of a run's or a suite's cells as a manifest "
        "(examples by file, with hashes of the data)",
    )
    export.add_argument(
        "source", type=Path, metavar="RUN_DIR|SUITE", help="run directory or suite file"
    )
    export.add_argument(
        "cell",
        nargs="?",
        help="a cell's label or id, to pick its episode setting (needed when the cells have "
        "several)",
    )
    export.add_argument(
        "-o", "--out", type=Path, required=True, help="the manifest to write (JSON)"
    )
    export.add_argument("--force", action="store_true", help="replace an existing file")
    export.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the suite file, as fewbench run does (e.g. eval.episodes=100)",
    )
    score = actions.add_parser(
        "score",
        help="score an outside method's predictions on a manifest's episodes into a run "
        "directory that report and compare read",
    )
    score.add_argument("manifest", type=Path, metavar="MANIFEST")
    score.add_argument(
        "predictions",
        type=Path,
        metavar="PREDICTIONS",
        help="CSV (episode,query,label) or JSON: every query of every episode, once",
    )
    score.add_argument("--out", type=Path, required=True, help="the run directory to write (new)")
    score.add_argument(
        "--name",
        default="outside",
        help="the outside method's learner label in reports (default outside), e.g. outside:knn",
    )
    score.add_argument(
        "--backbone",
        default="outside",
        help="its backbone label (default outside); compare pairs learners within a backbone, "
        "so give the backbone of the cells to compare it with, e.g. conv4",
    )
    for action in (export, score):
        action.add_argument(
            "--data-root",
            type=Path,
            help="data root (default $FEWBENCH_DATA or the user data folder)",
        )
        action.add_argument(
            "--cache-dir", type=Path, help="cache for decoded datasets (default $FEWBENCH_CACHE)"
        )
