"""fewbench: a plugin-based benchmarking framework for few-shot learning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fewbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
