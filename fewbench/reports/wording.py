"""Counts as a reader writes them: "1 cell", "2 cells", "1,200 episodes"."""


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` with ``noun``, plural unless it is one (``plural`` for irregular nouns)."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"
