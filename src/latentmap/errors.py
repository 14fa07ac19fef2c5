"""The one exception type for mistakes a user can fix from the config or command line."""

from __future__ import annotations

import re


class ConfigError(Exception):
    """A user mistake: bad key, bad value, missing file, unreachable model.

    The message is one line that names the key, the bad value and the fix. ``run.py``
    prints it without a traceback and exits non-zero.
    """


class UnreadableImage(ConfigError):
    """An image that cannot be decoded. ``what`` (``<where>: <why>``) says which and why, for the
    code that lists or skips images; the message adds the fix, for the user."""

    def __init__(self, where: str, why: str) -> None:
        self.where, self.why = where, why
        super().__init__(f"unreadable image {where}: {why}. Remove or replace the file, or set dataset.on_error=skip")

    @property
    def what(self) -> str:
        return f"{self.where}: {self.why}"


def require_int(key: str, value, minimum: int, example: str | None = None) -> int:
    """``value`` if it is an integer >= ``minimum``, else a ConfigError naming the key and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        hint = f" (e.g. {example})" if example else ""
        raise ConfigError(f"{key}={value!r} must be {bound}{hint}")
    return value


# Words that mark a failed download as the network's fault (no route, DNS, offline mode, timeouts),
# as transformers, huggingface_hub, timm and datasets word it.
_NETWORK_MARKERS = ("connect", "offline", "network", "resolve", "timed out", "localentrynotfound",
                    "couldn't reach", "temporary failure", "max retries", "unreachable")


def is_network_error(error: BaseException) -> bool:
    """Whether ``error`` says the network (a model or dataset hub) is unreachable: the one place
    that decides it, for models and datasets alike."""
    text = f"{type(error).__name__}: {error}".lower()
    return any(marker in text for marker in _NETWORK_MARKERS)


def rename_keys(message: str, renames: dict[str, str]) -> str:
    """``message`` with the keys that shared code names as run.py spells them written as the command
    that called it spells them: ``{"dataset.": "audit.against."}`` turns ``dataset.path=`` into
    ``audit.against.path=``; ``{"pool=": "pool_b="}`` the key ``pool`` alone. Only at a key's place,
    not inside a value (a path's ``x.dataset.v2``)."""
    for old, new in renames.items():
        after = r"(?=\w+=)" if old.endswith(".") else ""
        message = re.sub(r"(?<![\w./'\\-])" + re.escape(old) + after, new, message)
    return message
