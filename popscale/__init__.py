"""The `popscale` command-line program (popscale/cli.py)."""

from data_service.store import VERSION as __version__

__all__ = ["__version__"]
