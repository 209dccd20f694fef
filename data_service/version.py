"""The installed popscale's version, stamped into every session a corpus holds. It lives in the
lowest layer so that everything above it, the command-line program included, reads it here."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("popscale")  # the distribution's own version (pyproject.toml)
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
