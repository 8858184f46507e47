"""fewbench: a plugin-based benchmarking framework for few-shot learning.

Where things live (``docs/architecture.md`` draws it): ``plugin`` (the contracts a plugin
implements, one import: ``from fewbench.plugin import ...``), ``suite`` (a suite file and its
cells), ``data`` (the data root, downloads, caches), ``methods`` (mathematics learners share),
``running`` (the driver, workers, training, evaluation), ``storage`` (where results go),
``reports`` (reading results), ``cli`` (the command line) and ``api`` (the Python API).
"""

from fewbench import _moved
from fewbench.version import __version__

_moved.install()  # fewbench 0.1's module paths still import, with a DeprecationWarning

# The Python API (fewbench.api), loaded on first use so that ``import fewbench`` stays light.
__all__ = ["__version__", "run", "load_results", "load_learner", "export_model", "tune"]


def __getattr__(name: str):
    if name in ("run", "load_results", "load_learner", "export_model", "tune"):
        from fewbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'fewbench' has no attribute {name!r}")
