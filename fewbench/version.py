"""fewbench's version, as installed (the modules that record provenance import it from here,
not from the package, so that no core module depends on the package's front door)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fewbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
