"""The one exception type for mistakes a user can fix from the config or command line."""

from __future__ import annotations


class ConfigError(Exception):
    """A user mistake: bad key, bad value, missing file, unreachable model.

    The message is one line that names the key, the bad value and the fix. ``run.py``
    prints it without a traceback and exits non-zero.
    """
