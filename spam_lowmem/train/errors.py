"""The one exception the command line turns into a clear message and a non-zero exit."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """Bad input from the user (arguments, data, run folder): reported on stderr, exit code 2.

    Raised before anything is written to the run folder.
    """
