"""The one decision "is this the network being unreachable?", and the integer check every key uses."""

from __future__ import annotations

import pytest

from latentmap.errors import ConfigError, is_network_error, require_int


class LocalEntryNotFoundError(Exception):
    """Named as huggingface_hub names it when a file is neither cached nor downloadable."""


@pytest.mark.parametrize("error", [
    ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub (OfflineModeIsEnabled)"),
    OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
    LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
    OSError("HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded"),
    OSError("[Errno -3] Temporary failure in name resolution"),
    TimeoutError("timed out"),
])
def test_network_failures_are_recognised(error):
    assert is_network_error(error)


@pytest.mark.parametrize("error", [
    OSError("someone/not-a-model is not a local folder and is not a valid model identifier"),
    ValueError("Unrecognized model in /tmp/x. Should have a `model_type` key in its config.json"),
    KeyError("vit_huge"),
])
def test_other_failures_are_not_blamed_on_the_network(error):
    assert not is_network_error(error)


def test_require_int():
    assert require_int("k", 3, 1) == 3
    for bad in (0, -1, 2.5, "3", True, None):
        with pytest.raises(ConfigError, match=rf"^k={bad!r} must be a positive integer \(e.g. k=10\)$"):
            require_int("k", bad, 1, "k=10")
    with pytest.raises(ConfigError, match="must be an integer >= 0"):
        require_int("n", -1, 0)
