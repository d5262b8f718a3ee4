"""The installed refreshd version (``--version``, ``refreshd_build_info``, the status page)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version


@cache
def refreshd_version() -> str:
    """The version of the installed ``refreshd`` distribution ("unknown" when run from a
    source tree that was never installed)."""
    try:
        return version("refreshd")
    except PackageNotFoundError:
        return "unknown"
