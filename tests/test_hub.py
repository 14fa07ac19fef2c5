"""The Hugging Face hub edge: an unreachable hub is found once, said once, and every hub model of a
sweep fails at once with the same line (no per-file retries)."""

from __future__ import annotations

import re

import pytest

from latentmap import hub

from helpers import run_script


@pytest.fixture
def unreachable_hub(monkeypatch):
    """HF_ENDPOINT on a closed local port: a connection is refused at once, as without a network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(hub, "_reachable", None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    yield


def test_reachability_is_asked_once_per_process(unreachable_hub, monkeypatch):
    calls = []
    real = hub.socket.create_connection

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(hub.socket, "create_connection", counted)
    assert hub.reachable() is False and hub.reachable() is False
    assert calls == [("127.0.0.1", 9)]


def test_an_offline_sweep_of_hub_models_fails_fast_with_one_line_each(unreachable_hub, class_folder, tmp_path,
                                                                     monkeypatch):
    """Two hub models in one sweep, no hub: one warning says the hub is unreachable; each job ends
    with the same one line; the hub is asked once (the second job fails without a connection
    attempt); no retry line; a short closing line."""
    calls = []
    real = hub.socket.create_connection
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    code, err = run_script(["run.py", "-m", f"output_dir={tmp_path}", "model=hf",
                            "model.name=someone/model-a,someone/model-b", "dataset=imagefolder",
                            f"dataset.path={class_folder}", "reducer=pca", "metrics.k=5", "tracking=none"], tmp_path)
    assert code == 1 and "Traceback" not in err and "Retrying" not in err, err[-3000:]
    lines = err.splitlines()
    warnings = [line for line in lines if "][latentmap.hub][WARNING]" in line]
    assert len(warnings) == 1 and "the Hugging Face hub (127.0.0.1:9) is unreachable" in warnings[0]
    errors = [line for line in lines if "][ERROR] - " in line]
    assert [re.sub(r"model-[ab]", "model-?", e.split(" - ", 1)[1]) for e in errors] == [
        "model.name='someone/model-?' could not be downloaded: the network (Hugging Face hub) is unreachable. "
        "Run once with network access to fill the local cache, or point model.name at a local save_pretrained "
        "directory"] * 2

    # The second job asks no one: the hub's reachability is found out once per process (one warning
    # above), so no second connection attempt and no retry line.
    starts = [line for line in lines if re.search(r"\[HYDRA\] \t#\d : ", line)]
    assert len(starts) == 2 and calls == [("127.0.0.1", 9)]
    closing = [line for line in lines if "jobs failed" in line]
    assert len(closing) == 1 and "2 of 2 jobs failed (#0, #1)" in closing[0] and len(closing[0]) < 150
    # tracking=none: the sweep says it writes no report (there is no parent run to hold one)
    assert sum("tracking=none: this sweep has no MLflow parent run, so no report.html" in line for line in lines) == 1
