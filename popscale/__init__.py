"""The `popscale` command-line program (popscale/cli.py)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("popscale")  # the package's own version (pyproject.toml)
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
