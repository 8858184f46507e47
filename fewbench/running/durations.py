"""A duration as a reader wants it: seconds, minutes or hours, one decimal at most."""


def in_words(seconds: float) -> str:
    """``45 s``, ``12 min`` or ``2.5 h``: progress lines and the ledger print times so."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
