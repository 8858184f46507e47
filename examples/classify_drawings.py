"""Classify your own character drawings with a trained Omniglot model, one-shot.

    python examples/classify_drawings.py runs/omniglot-lake my_drawings

``my_drawings`` holds ``support/<character>/*.png`` (one drawing or more of each character you
want told apart: the "one shot") and ``query/*.png`` (the drawings to classify). Draw them as
Omniglot's are: dark strokes on a light background, any size; ``model.preprocess`` makes them
what the model was trained on (grey, resized, inverted). The first argument is a run directory
(its only cell, or ``--cell LABEL``) or a model file written by ``fewbench export``.

A prototype learner (suites/omniglot-lake.yaml trains Prototypical Networks) takes any number of
characters; a MAML head takes at most the ways it was trained for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fewbench
from fewbench.errors import FewbenchError


def drawings(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def classify(model_source: Path, folder: Path, cell: str | None = None) -> list[tuple[str, str]]:
    """(query file name, the character it was taken for), for every query drawing."""
    for part in ("support", "query"):
        if not (folder / part).is_dir():
            raise FewbenchError(f"{folder / part}: not a folder (see --help for the layout)")
    model = fewbench.load_learner(model_source, cell)
    characters = sorted(p.name for p in (folder / "support").iterdir() if p.is_dir())
    if not characters:
        raise FewbenchError(f"{folder / 'support'}: no character folders")
    support = [f for c in characters for f in drawings(folder / "support" / c)]
    labels = torch.tensor([characters.index(f.parent.name) for f in support])
    queries = drawings(folder / "query")
    if not queries:
        raise FewbenchError(f"{folder / 'query'}: no drawings to classify")
    logits = model.predict(model.preprocess(support), labels, model.preprocess(queries))
    taken = logits.argmax(dim=1).tolist()
    return [(q.name, characters[k]) for q, k in zip(queries, taken, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a run directory or a model file")
    parser.add_argument("folder", type=Path, help="holding support/<character>/ and query/")
    parser.add_argument("--cell", help="the cell's label or id, when the run has several")
    args = parser.parse_args(argv)
    try:
        for name, character in classify(args.model, args.folder, args.cell):
            print(f"{name}\t{character}")
    except FewbenchError as exc:
        print(f"classify_drawings: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
