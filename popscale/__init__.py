"""The `popscale` command-line program (popscale/cli.py)."""

from data_service.version import __version__

__all__ = ["__version__"]
