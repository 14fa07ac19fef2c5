"""Secrets never reach MLflow: values under secret-looking keys, and values read from the
environment, are replaced by ``***`` in params, ``config.yaml`` and Hydra's ``.hydra`` files."""

from __future__ import annotations

import re
from typing import Any

_SECRET_KEY = re.compile(r"(token|passw(or)?d|secret|api[_-]?key|access[_-]?key|credential|authoriz)", re.IGNORECASE)
REDACTED = "***"


def redact(resolved: Any, raw: Any = None) -> Any:
    """A copy of a resolved config with secrets replaced by ``***``: values under keys that look
    like tokens, passwords or keys, and values interpolated from environment variables
    (``${oc.env:...}`` in ``raw``, the unresolved config)."""
    if isinstance(resolved, dict):
        out = {}
        for key, value in resolved.items():
            raw_value = raw.get(key) if isinstance(raw, dict) else None
            from_env = isinstance(raw_value, str) and ("${oc.env:" in raw_value or "${env:" in raw_value)
            secret = _SECRET_KEY.search(str(key)) and not isinstance(value, (dict, list, bool)) and value is not None
            out[key] = REDACTED if secret or from_env else redact(value, raw_value)
        return out
    if isinstance(resolved, list):
        raws = raw if isinstance(raw, list) and len(raw) == len(resolved) else [None] * len(resolved)
        return [redact(value, r) for value, r in zip(resolved, raws)]
    return resolved


_SECRET_LINE = re.compile(r"^(\s*(?:-\s*)?[+~]?[\w.@/-]*?(?:token|passw(?:or)?d|secret|api[_-]?key|access[_-]?key|"
                          r"credential|authoriz)[\w.-]*\s*(?:=|:\s))\s*(\S.*)$", re.IGNORECASE)


def redact_yaml_text(text: str) -> str:
    """YAML (Hydra's .hydra files): values of secret-looking keys and overrides replaced by ``***``."""
    return "\n".join(_SECRET_LINE.sub(lambda m: m.group(1) + REDACTED, line) for line in text.split("\n"))
