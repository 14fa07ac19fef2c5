"""Shared fixtures: tiny local models, synthetic images with class structure, one real sweep.

Nothing here touches the network: transformers models are built from tiny configs and saved
with ``save_pretrained`` into a temporary folder, then loaded back through ``model=hf``. The
helpers the tests import live in ``tests/helpers``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from helpers import free_port, run_script, save_tiny_vit, write_class_images

# The default suite's longest tests (``--durations``: 10 s to 70 s each), started first: pytest-xdist
# hands tests out in collection order, and a long test collected last would run alone at the end.
# One worker takes the 1st and 3rd, the other the 2nd and 4th (xdist's scheduler starts each on
# two). On a fresh machine numba compiles UMAP (about 35 s) in the first process that fits one and
# caches it for the others, so the two that fit UMAP go to one worker while the other runs PCA-only
# tests: the compile is paid once, not twice.
LONGEST = ("test_readme_layer_study_and_its_reports",  # UMAP
           "test_intervals_cover_on_draws_from_a_known_mixture",  # no UMAP
           "test_readme_similarity_and_fine_tuning",  # UMAP and AlignedUMAP
           "test_mobilenet_v2_beats_pixels_on_cifar10",  # PCA
           "test_joblib_parallel_sweep_extracts_once_and_goes_on_past_a_failing_job",  # PCA
           "test_readme_default_runs_a_folder_and_the_audit",
           "test_submitit_local_shards_assemble_the_entry_one_process_would_write",
           "test_every_nearest_is_exact_up_to_the_limit_and_measures_its_recall_above")  # NN-descent's compile


# Fixtures that run a whole run or sweep (5 s to 20 s each) for many tests: every test using one is
# sent to the same xdist worker (``--dist loadgroup``), so the fixture runs once, not once a worker.
# A module's fixture is grouped by module and name; a session's (``layer_sweep``, ``mlflow_server``)
# serves two modules.
SHARED_RUNS = ("layer_sweep", "mlflow_server", "one_run", "audited_run", "runs", "finished", "finished_run",
               "looked_run", "finetuned", "built_site")
SESSION_RUNS = ("layer_sweep", "mlflow_server")  # grouped by name alone


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Group the tests of each of :data:`SHARED_RUNS`; run :data:`LONGEST` first, in that order, then
    the groups (each a long unit of work), then the rest in their order (``--no-loadscope-reorder``
    keeps this order)."""
    rank = {name: i for i, name in enumerate(LONGEST)}
    grouped = set()
    for item in items:
        used = next((name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())), None)
        if used:
            group = used if used in SESSION_RUNS else f"{item.module.__name__}.{used}"
            item.add_marker(pytest.mark.xdist_group(group))
            grouped.add(item.nodeid)
    items.sort(key=lambda item: (rank.get(item.originalname, len(LONGEST)), item.nodeid not in grouped))


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when used (a test's capture, or the terminal)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno...
        return getattr(sys.stderr, name)


@pytest.hookimpl(tryfirst=True)  # before any fixture of the test, shared runs included
def pytest_runtest_setup(item):
    """A library's log handler made while an earlier test captured stderr (transformers makes its
    own on first use) still holds that test's closed stream: point it at the current stderr, or its
    next warning prints logging's "--- Logging error ---" traceback into this test's output."""
    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
                handler.stream = _CurrentStderr()  # not setStream: it flushes the closed stream first
                handler.__dict__.pop("flush", None)  # transformers pins flush to the old stream's


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 and a free port (SQLite backend, one worker), shared by the
    tests that need one (on one xdist worker: :data:`SHARED_RUNS`); stopped by PID at the end.
    Yields its URI."""
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    port = free_port()
    store = tmp_path_factory.mktemp("server")
    # MLflow 3's server also starts a job runner and seven huey consumers (its GenAI jobs), each
    # importing MLflow: about 80 s of CPU that no test here uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--artifacts-destination", str(store / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=(store / "log").open("w"), start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(store / 'log').read_text()[-2000:]}") from error
                time.sleep(0.5)
        yield uri
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


@pytest.fixture(scope="session")
def class_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classes")
    write_class_images(root)
    return root


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"), seed=0, hidden=32, blocks=3)


@pytest.fixture(scope="session")
def tiny_vit_b(tmp_path_factory) -> Path:
    """A second tiny ViT (other seed, width and depth) for sweeps over two models."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit-b"), seed=1, hidden=24, blocks=2)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32, "vocab_size": 100},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        projection_dim=12,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> Path:
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-resnet")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 1, 1])
    ResNetModel(config).save_pretrained(path)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def layer_sweep(tiny_vit, tiny_vit_b, class_folder, tmp_path_factory) -> Path:
    """One real multirun (``python run.py -m ...``, run in this process), shared by the sweep and
    layer-study tests: two tiny ViTs (3 and 2 blocks) x blocks 0 and 1, pool=cls, PCA, no per-run
    plots (test_runner checks those); its output folder."""
    out = tmp_path_factory.mktemp("layer-sweep")
    code, err = run_script(["run.py", "-m", f"output_dir={out}", "model=hf", f"model.name={tiny_vit},{tiny_vit_b}",
                            "pool=cls", "layer=0,1", "reducer=pca", "dataset=imagefolder",
                            f"dataset.path={class_folder}",
                            "metrics.k=5", "metrics.probe=false", "plots.enabled=false", "study.permutations=200",
                            "study.bootstrap=20"], out)
    assert code == 0, err[-3000:]
    return out
