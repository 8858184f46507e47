"""fewbench: a plugin-based benchmarking framework for few-shot learning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fewbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


# The Python API (fewbench.api), loaded on first use so that ``import fewbench`` stays light.
__all__ = ["__version__", "run", "load_results", "load_learner", "export_model", "tune"]


def __getattr__(name: str):
    if name in ("run", "load_results", "load_learner", "export_model", "tune"):
        from fewbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'fewbench' has no attribute {name!r}")
