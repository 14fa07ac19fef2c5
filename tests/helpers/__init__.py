"""The tests' shared helpers (conftest.py holds the fixtures): the repository's paths, composed
configs, running a script as a user would, reading MLflow back, synthetic class images, tiny local
models. Importing this sets the environment the suite runs in (no hub, a shared numba cache).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def _share_the_cores() -> int:
    """Under pytest-xdist, each worker's share of the CPU cores: its thread count for BLAS, OpenMP,
    torch and numba, and its child processes' (sweeps, servers) through the environment. Two workers
    of two threads each on two cores wait on each other's spinning threads: a timm feature test
    that takes 0.9 s alone took 12.6 s in the suite. A count set in ``OMP_NUM_THREADS`` stays."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return 0
    from latentmap.machine import usable_cores

    cores = usable_cores()
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, cores // workers))  # a count set by hand stays
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    return threads


THREADS = _share_the_cores()

import numpy as np  # noqa: E402 - after the thread counts, which BLAS reads when it loads
import pytest  # noqa: E402

if THREADS:  # libraries a plugin loaded before this module, and torch's own pool
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(THREADS)
    torch.set_num_threads(THREADS)

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# numba's compiled code (UMAP, pynndescent, latentmap's loops: latentmap.jit), shared by the suite's
# processes and kept for its next runs in this user's cache, where the new MLflow stores' template
# lives (latentmap.tracking.store): as numba keeps it per environment without a folder, not per
# clone. A machine's first run compiles it (about 100 s of CPU); a fresh clone on a machine that has
# run the suite loads UMAP's and pynndescent's code (entries are per source file: a clone's own loops
# compile once); where that cache cannot be written, the clone's outputs/test-cache (jit.machine_folder,
# as a run chooses its own: tests/test_task.py). A folder of its own, test-numba: each fresh clone's
# entries (one per source path) stay out of the runs' numba folder.


def _numba_cache() -> Path:
    from latentmap.jit import machine_folder

    return machine_folder(ROOT / "outputs" / "test-cache" / "numba", name="test-numba")


if not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = str(_numba_cache())


def compose(overrides: list[str], output_dir: Path):
    """The config ``run.py`` would get for ``overrides``, writing under ``output_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=[f"output_dir={output_dir}", *overrides])


def cache_entries(cache_dir: Path) -> list[Path]:
    """What a cache folder holds besides its per-key lock files: entries and any staging leftovers."""
    return sorted(p for p in Path(cache_dir).iterdir() if not p.name.endswith(".lock"))


def sweep_runs(runs) -> tuple[list, list]:
    """(parent runs, child runs) of a multirun's MLflow runs."""
    parents = [r for r in runs if r.data.tags.get("latentmap.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def assert_one_job_failed(result, message: str) -> None:
    """A sweep's process output when exactly job #0 failed with the user error ``message``: exit 1,
    no traceback, that one error line, and one short closing line counting the jobs and naming the
    failed one (not repeating its message)."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "][ERROR] - " in line]
    assert len(errors) == 1 and message in errors[0], errors
    closing = [line for line in (result.stdout + result.stderr).splitlines() if " jobs failed (" in line]
    assert (len(closing) == 1 and "] sweep FAILED: 1 of " in closing[0]
            and "jobs failed (#0), each said why above" in closing[0])
    # the job, not its message
    assert message not in closing[0] and "http://127.0.0.1:5000/#/experiments/" in closing[0], closing


def run_script(args: list[str], cwd: Path) -> tuple[int, str]:
    """``python <args>`` (a script of the repository and its arguments) run in this process, in
    ``cwd``, as ``__main__``: (exit code, what it wrote to stderr and stdout, where Hydra's own lines
    go). Hydra's state is cleared after."""
    import contextlib
    import io
    import runpy
    import sys

    from hydra.core.hydra_config import HydraConfig

    script = ROOT / args[0]
    old_argv, old_cwd, err = sys.argv, Path.cwd(), io.StringIO()
    sys.argv = [str(script), *args[1:]]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        HydraConfig.instance().cfg = None
    return code, err.getvalue()


def mlflow_runs(output_dir: Path):
    """All runs of the default experiment in the store under ``output_dir``, as entities."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("latentmap")
    if experiment is None:
        return client, []
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def write_class_images(root: Path, n_per_class: int = 8, size: int = 32, seed: int = 0) -> list[str]:
    """Four classes a tiny network can tell apart: a colour and a stripe direction each, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 50, 40), "yellow": (220, 200, 40)}
    yy, xx = np.mgrid[0:size, 0:size]
    patterns = {
        "blue": (xx // 4) % 2,
        "green": (yy // 4) % 2,
        "red": ((xx + yy) // 4) % 2,
        "yellow": ((xx // 8 + yy // 8) % 2),
    }
    for name, colour in colours.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = np.asarray(colour, float)[None, None] * (0.6 + 0.4 * patterns[name][..., None])
            pixels = np.clip(base + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return sorted(colours)


def save_tiny_vit(path: Path, seed: int, hidden: int, blocks: int) -> Path:
    """A random ViT on 32x32 images (8x8 patches), saved with its processor like a hub checkpoint."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=2,
                       intermediate_size=2 * hidden, image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def save_tiny_mobilenet_v2(path: Path, seed: int = 0) -> Path:
    """A random MobileNetV2 classifier on 32x32 images (a quarter of the width, 1,000 outputs),
    saved with its processor as ../shared/models/mobilenet_v2_1.0_224 is (config, safetensors,
    processor config): the real checkpoint's family and file layout at a hundredth of its cost."""
    import torch
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ImageProcessor

    torch.manual_seed(seed)
    model = MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=1000))
    for module in model.modules():  # transformers' N(0, 0.02) init vanishes by the 3rd block (std 1e-11)
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    model.save_pretrained(path)
    MobileNetV2ImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def tiny_shared(root: Path) -> Path:
    """A stand-in for ../shared with the paths the README's real-asset commands name: the tiny
    MobileNetV2 at ``models/mobilenet_v2_1.0_224`` and 4 classes x 25 synthetic images at
    ``data/cifar10-test``."""
    save_tiny_mobilenet_v2(root / "models" / "mobilenet_v2_1.0_224")
    write_class_images(root / "data" / "cifar10-test", n_per_class=25)
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def requires_shared(*parts: str):
    """Skip (with the reason) when the real assets in ../shared are absent, as in a user's clone."""
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"real assets not present at {path}")



@functools.cache
def _default_extraction():
    from latentmap.extract import Extraction

    return Extraction.of(compose([], ROOT / "outputs"))


def extraction(**changes):
    """The extraction settings of the default config (conf/), on the CPU, with ``changes``."""
    import dataclasses

    return dataclasses.replace(_default_extraction(), **{"device": "cpu", **changes})


def cosine_knn(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: brute-force cosine distances with scipy, self excluded, nearest first."""
    from scipy.spatial.distance import cdist

    distances = cdist(points, points, "cosine")
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1, kind="stable")[:, :k], np.sort(distances, axis=1)[:, :k]
