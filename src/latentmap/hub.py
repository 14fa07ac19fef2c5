"""The Hugging Face hub edge: is it reachable, and if not, load from the local cache at once.

Without a network, ``from_pretrained`` and ``hf_hub_download`` retry each file with back-off (about
20 s a file, each retry printed), so an offline sweep of hub models used to take minutes to fail.
:func:`use_cache_if_offline` asks once per process whether the hub (``HF_ENDPOINT``, or the proxy in
``HTTPS_PROXY``) accepts a TCP connection within 2 s; when it does not, it switches huggingface_hub,
transformers, timm and datasets to offline mode (``HF_HUB_OFFLINE``), so a model or dataset in the
local cache loads and one that is not fails at once with one line. Every job of a sweep run by the
basic launcher shares the process, so only the first job waits for the probe.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_reachable: bool | None = None  # asked once per process


def _target() -> tuple[str, int]:
    url = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
           or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    parsed = urlparse(url if "://" in url else f"http://{url}")
    return parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)


def reachable(timeout: float = 2.0) -> bool:
    """Whether the hub accepts a connection (False at once when HF_HUB_OFFLINE is set)."""
    global _reachable
    if _reachable is None:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
            _reachable = False
        else:
            try:
                socket.create_connection(_target(), timeout=timeout).close()
                _reachable = True
            except OSError:
                _reachable = False
    return _reachable


def quiet_library_handlers() -> None:
    """huggingface_hub and transformers attach a stderr handler of their own, so each of their
    warnings (``Retrying in 8s``) printed twice beside the job's log handler: drop theirs."""
    for name in ("huggingface_hub", "transformers"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)


def use_cache_if_offline(what: str) -> None:
    """Before downloading ``what`` (e.g. ``model.name='vit-base'``): when the hub is unreachable,
    switch to offline mode (the local cache only) and say so once."""
    quiet_library_handlers()
    if reachable():
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in _TRUE:
        host, port = _target()
        log.warning("the Hugging Face hub (%s:%d) is unreachable: %s and anything else from the hub is read "
                    "from the local cache only (HF_HUB_OFFLINE=1)", host, port, what)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at each call; the env var only at import
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
