"""latentmap against its baselines, side by side in one process.

    python scripts/bench.py                 # default sizes (about 12 minutes on 2 CPU cores)
    python scripts/bench.py --full          # adds trustworthiness at 100k, t-SNE at 20k, metrics at 100k,
                                            # and the whole-run scale row at 100k images
    python scripts/bench.py --only trust tsne

Rows (every row: baseline, ours, ratio, and whether both computed the same thing):
  extract  the tutorial's loop (one image at a time through processor and model) against
           latentmap's batched extraction; ViT-B/16 architecture with random weights
  workers  (only when named) extraction with its images decoded in the main process
           (num_workers=0) against the automatic worker processes (num_workers=null, the default):
           20,000 synthetic 32x32 PNGs through model=pixels, 1,000 CIFAR-10 images through
           EfficientNet-Lite0, each way twice
  decode   (only when named) decoding 20,000 32x32 PNGs in batches of 64: decode_rgb for each image
           against one data.rgb_decoder a batch (extraction's path), alternated
  allocator  (only when named: about 5 minutes) CPU extraction of 250 CIFAR-10 images (synthetic
           ones without ../shared; batch 64) with glibc's own malloc thresholds against
           machine.reuse_freed_memory (extraction's default): EfficientNet-Lite0, MobileNetV2
           (../shared), ResNet-50 and ViT-B/16 (random weights), each side in its own process,
           alternated twice: time, page faults, peak RSS
  gpu-preprocess  (CUDA only) a timm CNN with all preprocessing in the workers against
           normalisation on the GPU
  sweep    layer x reducer jobs sharing the cache against the same jobs each extracting for itself
  cache    a run that hits the cache against one that misses
  trust    trustworthiness + continuity: latentmap's blocked exact version against
           sklearn.manifold.trustworthiness, time and peak extra memory; ours alone beyond
  tsne     openTSNE (reducer=opentsne) against sklearn's t-SNE: time and trustworthiness of the maps
  metrics  k-NN accuracy and silhouette (latentmap.metrics) at scale: time and peak memory
  scoring  the six classic metrics (baseline) against them plus bootstrap intervals and the
           readouts (weighted k-NN, linear probe), on one array of 2,000 (--full: and 20,000) points
  nulls    the similarity panel of one pair of representations (500 images; --full: also 1,000 and
           2,000): the five measures' values alone against the values with 200 permutations and 100
           bootstrap resamples
  jit      UMAP of 2,000 points in a second process that loads numba's disk cache, against the
           first process's warm call (and the first process's cold import and first call)
  umap-fit  UMAP fitted on scikit-learn's digits (unit rows), all 1,797 and a half-sample's 899 (below
           4,096 points it measures every distance): umap-learn's own fit against the same fit with
           latentmap's compiled distance matrix, alternated twice; the maps compared to the bit
  neighbours  every point's 10 nearest (cosine) of 30,000 (--full: 100,000) noisy 768-d points:
           exact brute force against latentmap's approximate search (faiss HNSW in this process),
           with its recall; scripts/bench_search.py compares the libraries
  map      map.html of 100,000 (--full: and 1,000,000) points: megabytes, thumbnails within the
           60 MB budget, first draw and a legend click in Chromium
  scale    a whole run.py over 20,000 (--full: 100,000) synthetic images with PCA: wall time, each
           stage's time and peak RSS
  audit    (only when named: about 8 minutes) the data audit's stage of a whole run.py over 1,000,
           20,000 and 100,000 synthetic images, beside the run's other stages
  calibration  (only when named: about 30 minutes at R=300) coverage of the intervals and false
           rejection and power of the paired test on Gaussian mixtures, after and before
           (--replications, --sizes, --mixtures, --map pca|fixed, --coverage-only); also written to
           outputs/bench/calibration-<map>[-coverage].{json,md}
  per-class  (only when named: about a minute at R=40) the fine-tuning study's per-class test where two
           models are equally good: false rejections at 6, 15, 30 and 100 images a class, by its
           rule and by the half-sample test alone (--replications, default 40 here)
  protocols  (only when named) the similarity measures against layer monotonicity (ReSi) on
           MobileNetV2, corresponding blocks across 5 seeds of a small CNN (Kornblith et al. 2019),
           TwoNN on d-spheres; also written to outputs/bench/protocols.{json,md}
  transform  (only when named) UMAP fitted on 20,000 of the scale row's images (16x16 pixels,
           unit rows) placing 200,000 (--full: also 1,000,000): latentmap's transform (vectorised
           placement, blocked searches on every core) against umap-learn's own on the same fitted
           model, alternated; the share of points placed alike
  million  (only when named: 15 minutes or more here, writing the million PNG files included)
           the whole run.py over 100,000 and 1,000,000 synthetic images, reducer=umap
           reducer.fit_sample=20000: time per stage, peak RSS, recall, map size
  refit    (only when named) the metric stage of 20,000 x 768 points with its 30 half-samples, the PCA
           map held fixed (baseline) against refitted on each half (metrics.refit_map), alternated twice
  refit-workers  (only when named: about 2 minutes here) the 30 UMAP refits of a run's half-samples
           of the digits (raw pixels, half the 1,797 each, after a fit of all of them in this process)
           one after another in this process (the run's way) against two worker processes started
           by a forkserver, alternated; the maps compared to the bit
  refit-threads  (only when named: about 5 minutes here) the default run's metric stage (its UMAP
           map and the probe refitted on 30 half-samples) with the fits one after another (the code
           before) against side by side in threads, alternated twice; every value compared
  refit-run  (only when named: about 7 minutes here, --full 12) the scale row's whole run.py over 20,000
           (--full: 100,000) images, metrics.refit_map=false and true on this code, alternated twice
  compare  (only when named) compare.html of three maps at 1,000 and 100,000 images a map in
           Chromium: megabytes, every map drawn, a selection, a recolouring and a hover's ring

Results go to stdout as a table and to outputs/bench/bench.{csv,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tests"))  # helpers.compose: the config run.py would get

ROWS: list[dict] = []


def record(row: str, size: str, baseline_s: float | None, ours_s: float, same: str, **extra) -> None:
    ratio = baseline_s / ours_s if baseline_s else None
    ROWS.append({"row": row, "size": size, "baseline_s": baseline_s, "ours_s": ours_s,
                 "speedup": None if ratio is None else round(ratio, 2), "same": same, **extra})
    print(f"{row:8} {size:26} baseline {baseline_s if baseline_s is None else round(baseline_s, 2)!s:>8} s  "
          f"ours {ours_s:8.2f} s  x{'' if ratio is None else f'{ratio:.2f}':>6}  same: {same}  "
          + "  ".join(f"{k}={v}" for k, v in extra.items()), flush=True)


def timed(function, *args, **kwargs):
    """(result, wall seconds). No allocation tracing: tracemalloc slows allocation-heavy code
    (openTSNE ran 4x slower under it); memory is measured as peak RSS in child processes."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def images(n: int, tmp: Path) -> Path:
    """A folder of real CIFAR-10 test images when ../shared has them, else synthetic ones."""
    folder = tmp / "images"
    if (SHARED / "data" / "cifar10-test").is_dir():
        for class_dir in sorted((SHARED / "data" / "cifar10-test").iterdir()):
            target = folder / class_dir.name
            target.mkdir(parents=True)
            for path in sorted(class_dir.glob("*.jpg"))[: max(1, n // 10)]:
                os.symlink(path, target / path.name)
    else:
        from helpers import write_class_images

        write_class_images(folder, n_per_class=max(1, n // 4))
    return folder


def vit_dir(tmp: Path, hidden: int, name: str) -> Path:
    """A ViT with 12 blocks and random weights, saved like a hub checkpoint."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    path = tmp / name
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=12, num_attention_heads=hidden // 64,
                       intermediate_size=4 * hidden, image_size=224, patch_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor().save_pretrained(path)
    return path


def bench_extract(tmp: Path, n: int, device: str = "cpu", batch_size: int = 16, num_workers: int = 0) -> None:
    """The tutorial's loop against latentmap's extraction on ``device``; on CUDA also bf16 and fp16."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    from latentmap import data
    from latentmap.extract import extract
    from latentmap.models import TransformersBackbone

    from helpers import extraction

    folder, model_dir = images(n, tmp), vit_dir(tmp, 768, "vit-b16")
    dataset = data.ImageFolderSource(path=str(folder)).load(seed=0)
    paths = [r["path"] for r in data.undecoded(dataset)["image"]]

    def tutorial():
        processor = AutoImageProcessor.from_pretrained(model_dir)
        model = AutoModel.from_pretrained(model_dir).to(device).eval()
        rows = []
        with torch.no_grad():
            for path in paths:
                inputs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt").to(device)
                rows.append(model(**inputs).last_hidden_state[:, 0].cpu().numpy())
        return np.concatenate(rows)

    def ours(precision: str, on_device: bool | None = None):
        backbone = TransformersBackbone(name=str(model_dir), preprocess_on_device=on_device)
        backbone.load(device, precision)
        how = extraction(batch_size=batch_size, num_workers=num_workers, device=device, precision=precision)
        features = extract(backbone, dataset, how, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return features["embed"]

    if device.startswith("cuda"):
        # fp32 means fp32 on both sides: no TF32 in cuDNN convolutions or matmuls.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        ours("fp32")  # warm-up: CUDA context, cuDNN autotuning, worker start-up outside the timings
    reference, base_s = timed(tutorial)
    where = f"ViT-B/16 {device}, {len(paths)} images, batch {batch_size}, {num_workers} workers"
    # On CUDA: each precision with resizing and normalising on the GPU (the default there), and
    # fp32 and bf16 with all preprocessing in the workers: what moving it saves, and what it
    # changes (a resized pixel may round one uint8 level apart on the GPU).
    cases = [("fp32", None), ("fp32", False), ("bf16", None), ("fp16", None), ("bf16", False)] \
        if device.startswith("cuda") else [("fp32", None)]
    for precision, on_device in cases:
        features, ours_s = timed(ours, precision, on_device)
        error = float(np.abs(features - reference).max())
        same = f"{error <= 1e-4} (max abs diff {error:.2g})" if precision == "fp32" else f"max abs diff {error:.2g}"
        label = f"{where}, {precision}" + (", preprocessing in workers" if on_device is False else "")
        record("extract", label, base_s, ours_s, str(same),
               baseline_img_s=round(len(paths) / base_s, 2), ours_img_s=round(len(paths) / ours_s, 2),
               threads=torch.get_num_threads())


def bench_workers(tmp: Path) -> None:
    """Extraction with decoding in the main process (num_workers=0, the baseline) against the
    automatic workers (num_workers=null, the default: extract.loader_workers), each way twice,
    alternated, best of two; the same features either way."""
    from latentmap import data
    from latentmap.extract import extract, loader_workers
    from latentmap.models import PixelsBackbone
    from latentmap.models.timm_models import EfficientNetLite0

    from helpers import extraction, write_class_images

    synthetic = tmp / "synthetic"
    write_class_images(synthetic, n_per_class=5000)
    for name, backbone, folder in (("pixels 16x16", PixelsBackbone(size=16), synthetic),
                                   ("EfficientNet-Lite0", EfficientNetLite0(), images(1000, tmp))):
        backbone.load("cpu", "fp32")
        dataset = data.ImageFolderSource(path=str(folder)).load(seed=0)
        times: dict[str, list[float]] = {"serial": [], "automatic": []}
        features = {}
        for _ in range(2):
            for side, workers in (("serial", 0), ("automatic", None)):
                found, seconds = timed(extract, backbone, dataset, extraction(num_workers=workers), progress=False)
                times[side].append(seconds)
                features[side] = found["embed"]
        record("workers", f"{name}, {len(dataset)} images", min(times["serial"]), min(times["automatic"]),
               str(np.array_equal(features["serial"], features["automatic"])),
               workers=loader_workers(None, len(dataset)), serial_s=[round(t, 2) for t in times["serial"]],
               automatic_s=[round(t, 2) for t in times["automatic"]])


def bench_decode(tmp: Path, n: int = 20_000) -> None:
    """Decoding a batch's images: decode_rgb for each (PIL's limit and a warning filter set and put
    back an image at a time, as extraction did before; the baseline, a few us slower than that
    former function, since decode_rgb now opens a decoder for its one image) against one
    data.rgb_decoder for the batch (extraction's path), batches of 64 alternated, each way twice,
    best of two; the same pixels either way. On 32x32 PNGs, what model=pixels extraction spends
    most of its time on."""
    from latentmap import data

    from helpers import write_class_images

    write_class_images(tmp / "synthetic", n_per_class=n // 4)
    raw = data.undecoded(data.ImageFolderSource(path=str(tmp / "synthetic")).load(seed=0))[:]
    rows = list(zip(raw["image"], raw["index"]))
    batches = [rows[start:start + 64] for start in range(0, len(rows), 64)]
    limit = data.PIL_MAX_IMAGE_PIXELS

    def each(batch):
        return [data.decode_rgb(record, index, limit) for record, index in batch]

    def once(batch):
        with data.rgb_decoder(limit) as decode:
            return [decode(record, index) for record, index in batch]

    times: dict[str, list[float]] = {"each": [], "once": []}
    found = {}
    for _ in range(2):
        for side, way in (("each", each), ("once", once)):
            images, seconds = timed(lambda decode=way: [image for batch in batches for image in decode(batch)])
            times[side].append(seconds)
            found[side] = images
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(found["each"], found["once"]))
    each_s, once_s = min(times["each"]), min(times["once"])
    record("decode", f"{len(rows)} 32x32 PNGs, batches of 64", each_s, once_s, str(same),
           each_us=round(each_s / len(rows) * 1e6, 1), once_us=round(once_s / len(rows) * 1e6, 1))


def _allocator_backbone(model: str, tmp: Path):
    """The allocator row's models, by name: real weights where they ship offline, else random."""
    from latentmap.models import TransformersBackbone
    from latentmap.models.timm_models import EfficientNetLite0, TimmBackbone

    if model == "EfficientNet-Lite0":
        return EfficientNetLite0()
    if model == "MobileNetV2":
        return TransformersBackbone(name=str(SHARED / "models" / "mobilenet_v2_1.0_224"))
    if model == "ResNet-50":
        return TimmBackbone(name="resnet50", pretrained=False)
    return TransformersBackbone(name=str(tmp / "vit-b16"))


def _allocator_child(side: str, model: str, tmp: Path) -> None:
    """One side of the allocator row in this (child) process: extraction of the row's images by
    ``model`` with ``side`` ``glibc`` (``reuse_freed_memory=false``: glibc's own thresholds, as
    before the setting) or ``reuse`` (the default). Prints its result as JSON."""
    import hashlib
    import resource

    import torch

    from latentmap import data
    from latentmap.extract import extract

    from helpers import extraction

    torch.manual_seed(0)
    backbone = _allocator_backbone(model, tmp)
    backbone.load("cpu", "fp32")
    dataset = data.ImageFolderSource(path=str(tmp / "images")).load(seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    how = extraction(batch_size=64, num_workers=0, reuse_freed_memory=side == "reuse")
    features = extract(backbone, dataset, how, progress=False)["embed"]
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "faults": after.ru_minflt - before.ru_minflt,
                      "rss_before_mb": round(before.ru_maxrss / 1024), "peak_mb": round(after.ru_maxrss / 1024),
                      "sha256": hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest(),
                      "images": len(features)}))


def bench_allocator(tmp: Path, n: int = 250) -> None:
    """CPU extraction with glibc's own malloc thresholds (the baseline) against
    machine.reuse_freed_memory (the default), each side in a fresh process so that neither inherits
    the other's heap or thresholds, alternated twice, best of two; the same features either way."""
    import subprocess

    images(n, tmp)
    vit_dir(tmp, 768, "vit-b16")
    models = ["EfficientNet-Lite0", "ResNet-50", "ViT-B/16"]
    if (SHARED / "models" / "mobilenet_v2_1.0_224").is_dir():
        models.insert(1, "MobileNetV2")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    for model in models:
        found: dict[str, list[dict]] = {"glibc": [], "reuse": []}
        for _ in range(2):
            for side in found:
                result = subprocess.run([sys.executable, __file__, "--allocator-child", side, model, str(tmp)],
                                        capture_output=True, text=True, env=environment)
                if result.returncode != 0:
                    raise SystemExit(f"allocator row, {model}, {side}: {result.stderr.strip()[-500:]}")
                found[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
        best = {side: min(runs, key=lambda run: run["seconds"]) for side, runs in found.items()}
        same = len({run["sha256"] for runs in found.values() for run in runs}) == 1
        record("allocator", f"{model} on the CPU, {best['reuse']['images']} images, batch 64",
               best["glibc"]["seconds"], best["reuse"]["seconds"], str(same),
               glibc_s=[round(run["seconds"], 2) for run in found["glibc"]],
               reuse_s=[round(run["seconds"], 2) for run in found["reuse"]],
               glibc_faults=best["glibc"]["faults"], reuse_faults=best["reuse"]["faults"],
               glibc_peak_mb=max(run["peak_mb"] for run in found["glibc"]),
               reuse_peak_mb=max(run["peak_mb"] for run in found["reuse"]))


def bench_gpu_preprocess(tmp: Path, n: int, batch_size: int, num_workers: int) -> None:
    """CUDA only: a timm CNN (EfficientNet-B0, random weights, bf16) with all preprocessing in the
    workers (float32 pixels) against resize and crop in the workers and ToTensor's scaling and
    Normalize on the GPU (uint8 pixels): latentmap's two paths, same images, same process."""
    import torch

    from latentmap import data
    from latentmap.extract import extract
    from latentmap.models import TimmBackbone

    from helpers import extraction

    dataset = data.ImageFolderSource(path=str(images(n, tmp))).load(seed=0)

    def run(on_device: bool):
        torch.manual_seed(0)
        backbone = TimmBackbone(name="efficientnet_b0", pretrained=False, preprocess_on_device=on_device)
        backbone.load("cuda", "bf16")
        how = extraction(batch_size=batch_size, num_workers=num_workers, device="cuda", precision="bf16")
        features = extract(backbone, dataset, how, progress=False)
        torch.cuda.synchronize()
        return features["embed"]

    run(False)  # warm-up: CUDA context, cuDNN autotuning
    workers, base_s = timed(run, False)
    device, ours_s = timed(run, True)
    error = float(np.abs(device - workers).max())
    record("gpu-preprocess", f"timm efficientnet_b0 cuda bf16, {len(dataset)} images, batch {batch_size}, "
           f"{num_workers} workers", base_s, ours_s, f"max abs diff {error:.2g}",
           baseline="preprocessing in the workers", ours="normalisation on the GPU",
           baseline_img_s=round(len(dataset) / base_s, 2), ours_img_s=round(len(dataset) / ours_s, 2))


def bench_sweep(tmp: Path, n: int) -> None:
    """12 layers x (pca, umap) of one model: shared cache against a fresh cache per job."""
    from latentmap.runner import run

    from helpers import compose

    folder, model_dir = images(n, tmp), vit_dir(tmp, 384, "vit-s16")
    jobs = [(layer, reducer) for layer in range(12) for reducer in ("pca", "umap")]

    def sweep(shared: bool) -> tuple[int, list[dict]]:
        misses, all_scores = 0, []
        for i, (layer, reducer) in enumerate(jobs):
            cache_dir = tmp / ("shared-cache" if shared else f"job-cache-{i}")
            cfg = compose(["model=hf", f"model.name={model_dir}", "dataset=imagefolder", f"dataset.path={folder}",
                           f"layer={layer}", "pool=cls", f"reducer={reducer}", f"cache_dir={cache_dir}",
                           "plots.enabled=false", "tracking=none", "metrics.k=5"], tmp / "out")
            before = len(list(cache_dir.glob("[0-9a-f]*"))) if cache_dir.exists() else 0
            all_scores.append(run(cfg))
            misses += len(list(cache_dir.glob("[0-9a-f]*"))) - before
        return misses, all_scores

    compose([], tmp)  # warm-up: hydra and numba compile outside the timings
    (base_passes, base_scores), base_s = timed(sweep, False)
    (our_passes, our_scores), ours_s = timed(sweep, True)
    same = all(np.allclose(list(a.values()), list(b.values())) for a, b in zip(base_scores, our_scores))
    record("sweep", f"ViT-S/16 12 layers x 2 reducers, {n} img", base_s, ours_s, str(same),
           baseline_extractions=base_passes, ours_extractions=our_passes)


def bench_cache(tmp: Path, n: int) -> None:
    from latentmap.runner import run

    from helpers import compose

    folder = images(n, tmp)
    cfg = compose(["dataset=imagefolder", f"dataset.path={folder}", "reducer=pca", "plots.enabled=false",
                   "tracking=none", f"cache_dir={tmp / 'cache-bench'}"], tmp / "out")
    miss, miss_s = timed(run, cfg)
    hit, hit_s = timed(run, cfg)
    record("cache", f"EfficientNet-Lite0, {n} img", miss_s, hit_s, str(miss == hit))


def clustered(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, d) float64 blobs of 10 classes, their labels, and a 2-D PCA map of them."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    centres = rng.normal(scale=3.0, size=(10, d))
    points = centres[labels] + rng.normal(size=(n, d))
    return points, labels, PCA(2, random_state=0).fit_transform(points)


def _child(which: str, n: int, k: int = 10) -> None:
    """One measurement in this (child) process: a side of the trust row (ours, sklearn) or a
    metric of the metrics row (knn, silhouette). Prints its result as JSON."""
    import resource

    from sklearn.manifold import trustworthiness as sklearn_trustworthiness

    from latentmap import metrics

    points, labels, coords = clustered(n, 768)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if which == "ours":
        values = [metrics.trustworthiness(points, coords, k), metrics.continuity(points, coords, k)]
    elif which == "knn":
        values = [metrics.knn_accuracy(points, labels, k, 5, "cosine", 0)]
    elif which == "silhouette":
        values = [metrics.silhouette(points, labels, "cosine")]
    else:
        values = [sklearn_trustworthiness(points, coords, n_neighbors=k),
                  sklearn_trustworthiness(coords, points, n_neighbors=k)]
    seconds = time.perf_counter() - start
    extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"values": values, "seconds": seconds, "extra_mb": round(extra_mb)}))


def _in_child(which: str, n: int) -> dict:
    """Each side in its own process: peak RSS is its own, and a crash cannot end the benchmark."""
    import subprocess

    result = subprocess.run([sys.executable, __file__, "--child", which, str(n)], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}: {(result.stderr.strip().splitlines() or ['killed'])[-1][:120]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_trust(sizes: list[int], ours_only: list[int], k: int = 10) -> None:
    for n in sizes + ours_only:
        ours = _in_child("ours", n)
        base = _in_child("sklearn", n) if n not in ours_only else None
        if "error" in ours:
            record("trust", f"N={n} d=768 k={k}", None, float("nan"), ours["error"])
            continue
        if base is None or "error" in base:
            record("trust", f"N={n} d=768 k={k}", None, ours["seconds"], base["error"] if base else "-",
                   ours_peak_extra_mb=ours["extra_mb"])
            continue
        same = bool(np.allclose(ours["values"], base["values"], rtol=0, atol=1e-9))
        record("trust", f"N={n} d=768 k={k}", base["seconds"], ours["seconds"], str(same),
               baseline_peak_extra_mb=base["extra_mb"], ours_peak_extra_mb=ours["extra_mb"])


def bench_tsne(sizes: list[int]) -> None:
    from openTSNE.sklearn import TSNE as OpenTSNE
    from sklearn.manifold import TSNE

    from latentmap import metrics

    for n in sizes:
        points, _, _ = clustered(n, 50)
        base_map, base_s = timed(TSNE(perplexity=30, init="pca", random_state=0).fit_transform, points)
        our_map, ours_s = timed(OpenTSNE(perplexity=30, n_jobs=-1, random_state=0).fit_transform, points)
        base_t, our_t = metrics.trustworthiness(points, base_map, 10), metrics.trustworthiness(points, our_map, 10)
        record("tsne", f"N={n} d=50", base_s, ours_s, f"trust {base_t:.4f} vs {our_t:.4f}",
               trust_gap=round(abs(base_t - our_t), 4))


def bench_metrics(sizes: list[int]) -> None:
    """k-NN accuracy (5-fold, cosine) and silhouette (cosine), each in its own process."""
    for n in sizes:
        for which, name in (("knn", "kNN acc"), ("silhouette", "silhouette")):
            result = _in_child(which, n)
            if "error" in result:
                record("metrics", f"{name} N={n} d=768", None, float("nan"), result["error"])
                continue
            record("metrics", f"{name} N={n} d=768", None, result["seconds"], "-", value=round(result["values"][0], 4),
                   peak_extra_mb=result["extra_mb"])


def bench_scoring(n: int) -> None:
    """The cost of numbers you can defend, side by side on one array (N x 768, 10 classes, a PCA map):
    the six classic metrics (what a run scored before per-image scores, intervals and readouts)
    against every metric with the readouts and its half-sample interval (metrics.bootstrap=30)."""
    import numpy as np
    from sklearn.decomposition import PCA

    from latentmap import metrics, resampling

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    embeddings = (rng.normal(size=(n, 768)) + 0.6 * rng.normal(size=(10, 768))[labels]).astype(np.float32)
    coords = PCA(2, random_state=0).fit_transform(embeddings)
    per_image, classic_s = timed(metrics.per_image, embeddings, coords, labels, 10, 5, 0, "cosine")
    halves = resampling.halves(labels, n, 30, 0)
    found, ours_s = timed(lambda: resampling.intervals(resampling.evaluate(
        embeddings, [coords], labels, halves, k=10, folds=5, seed=0, distance="cosine"), halves, 0.95))
    same = all(abs(found[name].value - float(values.mean())) < 1e-9 for name, values in per_image.items())
    record("scoring", f"N={n} d=768, 10 classes", classic_s, ours_s, "yes" if same else "NO",
           knn_acc_hd=round(found["knn_acc_hd"].value, 4), probe_acc=round(found["probe_acc"].value, 4),
           knn_acc_weighted=round(found["knn_acc_weighted"].value, 4))


def bench_refit(n: int) -> None:
    """What refitting a PCA map on every half-sample (metrics.refit_map, PCA's default) costs the metric
    stage: every metric and interval of N x 768 points (10 classes, a PCA map, 30 half-samples, the
    probe), the map held fixed (baseline) against refitted on each half, alternated twice."""
    import numpy as np
    from sklearn.decomposition import PCA

    from latentmap import metrics, resampling

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    embeddings = (rng.normal(size=(n, 768)) + 0.6 * rng.normal(size=(10, 768))[labels]).astype(np.float32)
    space = metrics.embedding_space(embeddings, "cosine")
    coords = PCA(2, random_state=0).fit_transform(space)
    halves = resampling.halves(labels, n, 30, 0)

    def score(refit):
        return resampling.intervals(resampling.evaluate(embeddings, [coords], labels, halves, k=10, folds=5, seed=0,
                                                        distance="cosine", refit=refit), halves, 0.95)

    def refit(rows, fit):
        return PCA(2, random_state=fit).fit_transform(space[rows])

    score(None)  # numba's kernels compiled or loaded, not timed
    for _ in range(2):
        fixed, fixed_s = timed(score, None)
        refitted, refit_s = timed(score, refit)
        same = all(fixed[name].value == refitted[name].value for name in fixed)
        record("refit", f"N={n} d=768, 10 classes, 30 halves", fixed_s, refit_s, "values" if same else "NO",
               silhouette_2d_width_fixed=round(fixed["silhouette_2d"].hi - fixed["silhouette_2d"].lo, 4),
               silhouette_2d_width_refit=round(refitted["silhouette_2d"].hi - refitted["silhouette_2d"].lo, 4))


def bench_protocols(tmp: Path, out: Path) -> None:
    """The similarity measures and TwoNN against external protocols (latentmap.protocols): layer
    monotonicity on the real MobileNetV2 blocks (../shared, 500 CIFAR-10 images), corresponding
    blocks across 5 seeds of a small digits CNN, TwoNN on d-spheres; to <out>/protocols.{json,md}."""
    import platform

    from latentmap import docs, protocols

    found: dict = {"command": "python scripts/bench.py --only protocols", "date": time.strftime("%Y-%m-%d"),
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}
    model, images = SHARED / "models" / "mobilenet_v2_1.0_224", SHARED / "data" / "cifar10-test"
    if model.is_dir() and images.is_dir():
        started = time.perf_counter()
        from helpers import extraction

        found["monotonicity"] = protocols.layer_protocol(str(model), str(images), str(tmp / "cache"),
                                                         extraction(batch_size=50))
        record("protocols", "monotonicity, MobileNetV2", None, time.perf_counter() - started, "-")
    else:
        print("protocols: ../shared's MobileNetV2 and CIFAR-10 images are absent: no monotonicity row", flush=True)
    started = time.perf_counter()
    found["seeds"] = protocols.seeds_protocol(5)
    record("protocols", "5 seeds, digits CNN", None, time.perf_counter() - started, "-")
    found["twonn"] = protocols.twonn_protocol()
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocols.json").write_text(json.dumps(found, indent=2))
    text = docs.protocols_tables(found)  # the same tables the documentation renders from this JSON
    (out / "protocols.md").write_text(text + "\n")
    print(text, flush=True)


def bench_calibration(sizes: list[int], replications: int, mixtures: list[str], out: Path, map_: str = "pca",
                      paired: bool = True, hold: bool = False, beside: bool = True, seed: int = 0) -> None:
    """Coverage of the 95% intervals and the paired test's rejection rates on Gaussian mixtures
    (latentmap.calibration), after and before (the per-image bootstrap), with Monte Carlo errors;
    written to <out>/calibration.{json,md}."""
    import platform
    import re

    from latentmap import calibration, docs

    table = []
    for n in sizes:
        for mixture in mixtures:
            started = time.perf_counter()
            settings = calibration.Settings(n=n, map=map_, paired=paired, refit_map=not hold, beside=beside)
            rows = calibration.run(mixture, replications, settings, seed=seed, jobs=min(2, os.cpu_count() or 1))
            seconds = time.perf_counter() - started
            for row in rows:
                table.append({"mixture": mixture, "n": n, "map": map_ + (" held fixed" if hold else ""), **row})
            record("calibration", f"{mixture} N={n} R={replications}", None, seconds, "-")
    out.mkdir(parents=True, exist_ok=True)
    given = re.sub(r"--out \S+", "", " ".join(sys.argv[1:]).replace("--only calibration", ""))  # not what it measured
    meta = {"command": ("python scripts/bench.py --only calibration " + " ".join(given.split())).strip(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d")}
    name = (f"calibration-{map_}" + ("-held" if hold else "") + ("" if paired else "-coverage")
            + ("" if beside else "-run"))
    (out / f"{name}.json").write_text(json.dumps({**meta, "rows": table}, indent=2))
    text = docs.calibration_table({**meta, "rows": table})  # the table the documentation renders from this JSON
    (out / f"{name}.md").write_text(text + "\n")
    print(text, flush=True)


def bench_per_class(sizes: list[int], replications: int) -> None:
    """False rejections of the fine-tuning study's per-class test where two models are equally good
    (latentmap.calibration.per_class_null: 10 classes, k = 10), by the rule it uses (the exact sign
    test below audit.EXACT_BELOW images a class, the half-sample test above) and by the half-sample
    test alone, at each class size."""
    from latentmap import calibration

    print("| images a class | tests | by its rule: p < 0.05 | p < 0.01 | half-samples alone: p < 0.05 | p < 0.01 |")
    print("|---|---|---|---|---|---|")
    for per_class in sizes:
        started = time.perf_counter()
        rates = calibration.per_class_null(per_class, replications)
        record("per-class", f"{per_class} a class R={replications}", None, time.perf_counter() - started, "-")
        print(f"| {per_class} | {rates['chosen_tests']} | {rates['chosen_p05']:.3f} | {rates['chosen_p01']:.3f} | "
              f"{rates['halves_p05']:.3f} | {rates['halves_p01']:.3f} |", flush=True)


def bench_nulls(n: int, width: int, permutations: int = 200, resamples: int = 100) -> None:
    """The cost of a similarity panel's nulls and intervals: one pair of (N, width) representations of
    the same images (a shared 20-dimensional latent), the five measures' values alone (baseline)
    against the values with ``permutations`` permutations and ``resamples`` bootstrap resamples."""
    import numpy as np

    from latentmap import measures

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n, 20))
    a = (latent @ rng.normal(size=(20, width))).astype(np.float32)
    b = (latent @ rng.normal(size=(20, width)) + rng.normal(size=(n, width))).astype(np.float32)
    values, values_s = timed(measures.panel_values, a, b, 10)
    found, panel_s = timed(measures.panel, a, b, 10, permutations, resamples, 0.95, 0)
    record("nulls", f"N={n} d={width}, {permutations} permutations, {resamples} resamples", values_s, panel_s,
           "equal" if all(abs(found[m].value - values[m]) < 1e-9 for m in values) else "DIFFERENT",
           cka_debiased=round(found["cka_debiased"].value, 4), p_value=round(found["cka_debiased"].p_value, 4))


def bench_scale(tmp: Path, n: int, reducer: list[str], baseline: str | None = None) -> None:
    """A whole run (run.py in a child process) over ``n`` synthetic 32x32 images with model=pixels
    at 16x16 (768 dims): wall time, each stage's time (the run's time_<stage>_s, from its log), the
    child's peak RSS and its CPU seconds (user and system, its threads and the processes it waited
    for). The images are written once per size and reused across reducers. With
    ``baseline`` (a git revision), the same run first with that revision's code (a worktree of it,
    its src first on the path), then with this one: the before and after of one bench run."""
    if baseline:
        import subprocess

        tree = tmp / f"baseline-{baseline}"
        if not tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), baseline], check=True,
                           capture_output=True)
        try:
            _scale_row(tmp, n, reducer, tree, f"before ({baseline})")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    _scale_row(tmp, n, reducer, ROOT, "after" if baseline else "")


def bench_transform(sizes: list[int], fitted: int = 20_000) -> None:
    """UMAP fitted on ``fitted`` points (seeded, class-stratified: what reducer.fit_sample fits) of
    the scale row's synthetic images as a run maps them (16x16 pixels, unit rows:
    bench_search.synthetic), then the transform of N points:
    umap-learn's own against latentmap's (reduce.fast_umap_transform), on the same fitted model,
    alternated (twice below a million points)."""
    import umap
    from bench_search import synthetic  # the scale row's images as a run maps them, made in memory

    from latentmap import data, jit, reduce

    jit.cache_in(jit.machine_folder(Path(tempfile.gettempdir()) / "latentmap-bench-numba"))
    for n in sizes:
        points, labels = synthetic(n), np.arange(n) % 4  # unit rows (metrics.distance=cosine), 4 classes
        rows = np.sort(data.balanced_order(labels, n, 42)[:fitted])
        estimator = umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=42, n_jobs=1)
        jit.enable()
        with reduce.seeded_umap():
            estimator.fit(points[rows])
            estimator._knn_search_index.query(points[:2], 15)  # readies the search for both sides
            times: dict[str, list[float]] = {"umap-learn": [], "latentmap": []}
            for _ in range(2 if n < 1_000_000 else 1):
                theirs, seconds = timed(estimator.transform, points)
                times["umap-learn"].append(seconds)
                with reduce.fast_umap_transform("umap.UMAP", estimator):
                    ours, seconds = timed(estimator.transform, points)
                times["latentmap"].append(seconds)
        alike = float(np.all(ours == theirs, axis=1).mean())
        record("transform", f"UMAP fitted on {fitted}, transform of {n} synthetic images (16x16 unit rows)",
               min(times["umap-learn"]), min(times["latentmap"]), f"{alike:.2%} of points placed alike",
               umap_learn_s=[round(t, 1) for t in times["umap-learn"]],
               latentmap_s=[round(t, 1) for t in times["latentmap"]],
               largest_difference=round(float(np.abs(ours - theirs).max()), 4))
        del points, ours, theirs


def bench_umap_fit() -> None:
    """A small-data UMAP fit (below 4,096 points umap-learn measures every distance) as the default run
    and its refitted half-samples fit it: scikit-learn's digits (unit rows), all 1,797 and a half of
    899; umap-learn's own fit against the same fit with latentmap's compiled distance matrix
    (reduce.compiled_umap_distances), alternated twice, the maps compared to the bit."""
    import umap
    from sklearn.datasets import load_digits

    from latentmap import jit, reduce

    jit.cache_in(jit.machine_folder(Path(tempfile.gettempdir()) / "latentmap-bench-numba"))
    jit.enable()
    points = load_digits().data.astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)

    def fit(rows):
        with reduce.seeded_umap():
            return umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=42, n_jobs=1).fit_transform(points[rows])

    def compiled(rows):
        with reduce.compiled_umap_distances("umap.UMAP"):
            return fit(rows)

    compiled(np.arange(200))  # numba's code loaded or compiled for both sides, not timed
    for rows in (np.arange(len(points)), np.arange(0, len(points), 2)):
        times: dict[str, list[float]] = {"umap-learn": [], "latentmap": []}
        for _ in range(2):
            theirs, seconds = timed(fit, rows)
            times["umap-learn"].append(seconds)
            ours, seconds = timed(compiled, rows)
            times["latentmap"].append(seconds)
        record("umap-fit", f"UMAP fit of {len(rows)} digits (unit rows)", min(times["umap-learn"]),
               min(times["latentmap"]), "map bit for bit" if np.array_equal(ours, theirs) else "NO",
               umap_learn_s=[round(t, 2) for t in times["umap-learn"]],
               latentmap_s=[round(t, 2) for t in times["latentmap"]])


def _scale_row(tmp: Path, n: int, reducer: list[str], code: Path, which: str) -> None:
    import re
    import subprocess

    from helpers import write_class_images

    folder = tmp / f"images-{n}"
    written_s = 0.0
    if not folder.exists():
        start = time.perf_counter()
        write_class_images(folder, n_per_class=n // 4)
        written_s = time.perf_counter() - start
    measure = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "used = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(code, used.ru_maxrss, used.ru_utime + used.ru_stime)")
    command = [sys.executable, "-c", measure, sys.executable, str(code / "run.py"), "model=pixels", "model.size=16",
               "dataset=imagefolder", f"dataset.path={folder}", *reducer, f"output_dir={tmp / 'out'}",
               f"cache_dir={tmp / ('cache-' + (which.split()[0] if which else 'run'))}"]  # each side its own: a miss
    shutil.rmtree(tmp / ('cache-' + (which.split()[0] if which else 'run')), ignore_errors=True)
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}  # the run's own
    env["PYTHONPATH"] = os.pathsep.join([str(code / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=env)
    seconds = time.perf_counter() - start
    code, peak_kb, cpu_s = result.stdout.strip().splitlines()[-1].split()
    stages = re.findall(r"stages: (.*)", result.stderr)
    laps = {name: float(value) for name, value in re.findall(r"(\w+) ([\d.]+) s", stages[-1])} if stages else {}
    recall = re.findall(r"recall ([\d.]+) \[([\d.]+), ([\d.]+)\] on \d+ sampled images; their mean distance "
                        r"([\d.]+)% above", result.stderr)
    page = re.findall(r"map.html: (\d+) points, (\d+) with thumbnails, ([\d.]+) MB", result.stderr)
    record("scale", f"run.py, {n} images, pixels 16x16, {' '.join(reducer)}" + (f", {which}" if which else ""), None,
           seconds,
           "finished" if code == "0" else f"exit {code}: {result.stderr.strip().splitlines()[-1][:200]}",
           peak_rss_mb=round(int(peak_kb) / 1024), cpu_s=round(float(cpu_s), 1),
           **{f"{k}_s": round(v, 1) for k, v in laps.items()},
           neighbour_recall=" ".join(recall[-1][:3]) if recall else "exact",
           outlier_score_excess_pct=float(recall[-1][3]) if recall else 0.0,
           map_mb=float(page[-1][2]) if page else None, map_thumbnails=int(page[-1][1]) if page else None,
           images_written_s=round(written_s, 1))


def bench_audit(tmp: Path, sizes: list[int]) -> None:
    """The data audit's cost in a whole run (its ``audit`` stage, timed inside the run, beside the other
    stages) at each size, on synthetic 32x32 images with model=pixels at 16x16 (768 dims)."""
    for n in sizes:
        bench_scale(tmp, n, ["reducer=pca"])
        ROWS[-1]["row"] = "audit"


JIT_CHILD = """
import json, sys, time
start = time.perf_counter()
from latentmap import jit
jit.cache_in(sys.argv[1])
import umap
jit.enable()
imported = time.perf_counter() - start
import numpy as np
points = np.random.default_rng(0).normal(size=(2000, 50)).astype(np.float32)
times = []
for seed in (0, 1):
    start = time.perf_counter()
    umap.UMAP(random_state=seed, n_jobs=1).fit_transform(points)
    times.append(time.perf_counter() - start)
print(json.dumps({"import": imported, "first": times[0], "warm": times[1]}))
"""


def bench_jit(tmp: Path) -> None:
    """UMAP of 2,000 points in two fresh processes sharing <cache_dir>/numba (latentmap.jit): the
    first compiles and saves, the second loads. Baseline: the first process's warm (second) call;
    goal: the second process's first call within 3 s of it."""
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    folder = tmp / "cache" / "numba"
    found = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", JIT_CHILD, str(folder)], capture_output=True, text=True,
                                env=env)
        found.append(json.loads(result.stdout.strip().splitlines()[-1]))
    first, second = found
    record("jit", "UMAP of 2,000 points", first["warm"], second["first"],
           f"second process within {second['first'] - first['warm']:+.1f} s of a warm call",
           first_process_import_s=round(first["import"], 1), first_process_first_call_s=round(first["first"], 1),
           second_process_import_s=round(second["import"], 1))


def _neighbours_row(size: str, space: np.ndarray, k: int) -> None:
    """Exact brute force (scikit-learn, what latentmap did) against latentmap's approximate search on one array, with
    the recall the run logs and the recall over all points."""
    from latentmap import neighbours

    approximate, ours_s = timed(neighbours.every_nearest, space, k, "cosine", 1, 0)
    exact, exact_s = timed(neighbours.every_nearest, space, k, "cosine", None, 0)
    overlap = (approximate.indices[:, :, None] == exact.indices[:, None, :]).any(axis=2).mean()
    record("neighbours", size, exact_s, ours_s, f"recall {overlap:.3f} on all points",
           neighbour_recall=round(float(approximate.recall.mean()), 3),
           distance_error=round(float(approximate.distance_error.mean()), 4))


def bench_neighbours(n: int, k: int = 10) -> None:
    """Every point's k nearest neighbours (cosine): ``n`` 768-d points in 10 noisy clusters (the hard
    case: noise-like neighbourhoods), and the CIFAR-10 test images as 16x16 pixels when ../shared
    has them (real images), each exact against the approximate search (latentmap.neighbours above
    metrics.exact_neighbours)."""
    from latentmap import metrics

    points, _, _ = clustered(n, 768)
    _neighbours_row(f"N={n} d=768 k={k}", metrics.embedding_space(points.astype(np.float32), "cosine"), k)
    del points
    folder = SHARED / "data" / "cifar10-test"
    if folder.is_dir():
        from PIL import Image

        paths = sorted(folder.glob("*/*.jpg"))
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR),
                                      np.float32).ravel() / 255 for p in paths])
        _neighbours_row(f"CIFAR-10 test, {len(paths)} images, pixels 16x16", metrics.embedding_space(pixels, "cosine"),
                        k)


def _chromium_tab(playwright, width: int, height: int):
    """(browser, page) of the system's Chromium at ``width`` x ``height`` px."""
    browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "chromium", args=["--no-sandbox"])
    return browser, browser.new_page(viewport={"width": width, "height": height})


def bench_map(sizes: list[int], max_mb: float = 60) -> None:
    """map.html at each size: page megabytes, thumbnails that fit the budget, and the time from
    navigation to the first draw in Chromium (WebGL), with a hover and a legend click checked."""
    from playwright.sync_api import sync_playwright

    from latentmap import interactive, plots

    rng = np.random.default_rng(0)
    images = [np.asarray(rng.integers(0, 256, (40, 40, 3)) // 32 * 32, dtype=np.uint8) for _ in range(64)]
    with tempfile.TemporaryDirectory() as tmp_name:
        for n in sizes:
            labels = rng.integers(0, 10, n)
            coords = (rng.normal(size=(10, 2))[labels] * 6 + rng.normal(size=(n, 2))).astype(np.float32)
            order = rng.permutation(n)[:20000]
            start = time.perf_counter()
            page, rows = interactive.page_within(
                coords, labels, [f"class {c}" for c in range(10)], np.arange(n), order,
                lambda part: [images[r % 64] for r in part], lambda kept: rng.integers(0, len(kept), (len(kept), 8)),
                8, plots.class_colors(10), f"{n} points", "", "cosine", max_mb)
            built_s = time.perf_counter() - start
            path = Path(tmp_name) / f"map-{n}.html"
            path.write_text(page)
            with sync_playwright() as playwright:
                browser, tab = _chromium_tab(playwright, 1300, 860)
                tab.goto(path.as_uri(), timeout=300_000)
                tab.wait_for_function("window.lmFirstDraw !== undefined", timeout=300_000)
                first_draw = tab.evaluate("window.lmFirstDraw")
                start = time.perf_counter()
                tab.locator(".legend .traces").nth(0).click()
                tab.wait_for_function("document.getElementById('lm-map')._fullData[0].visible === 'legendonly'")
                toggle_s = time.perf_counter() - start
                browser.close()
            record("map", f"map.html, {n} points", None, first_draw / 1000, f"{len(page) / 1e6:.1f} MB",
                   page_mb=round(len(page) / 1e6, 1), thumbnails=len(rows), legend_toggle_s=round(toggle_s, 2),
                   built_s=round(built_s, 1))


def bench_compare(sizes: list[int]) -> None:
    """compare.html of three maps at each size (1,000 thumbnails): page megabytes, the time from
    navigation to every map drawn, a selection of a tenth of the images, a recolouring, and a hover,
    whose ring (a layout shape: no trace redrawn) is timed side by side with the first version's
    ring trace (a restyle, which redraws the WebGL points of every map)."""
    from playwright.sync_api import sync_playwright

    from latentmap import linked, plots

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        for n in sizes:
            labels = rng.integers(0, 10, n)
            maps = linked.aligned([linked.Map(title, (rng.normal(size=(n, 2)) + labels[:, None]).astype(np.float32))
                                   for title in ("A", "B", "C")])
            outcome = linked.outcome(rng.integers(0, 2, n).astype(float), rng.integers(0, 2, n).astype(float))
            columns = [linked.Column("k-NN", "outcome", outcome),
                       linked.Column("kept", "share", rng.random(n).astype(np.float32))]
            thumbs = {r: plots.png_data_uri(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
                      for r in range(min(n, 1000))}
            page = linked.page(maps, labels, [str(c) for c in range(10)], np.arange(n), columns, thumbs, "", "bench",
                               "", plots.class_colors(10))
            path = Path(tmp_name) / f"compare-{n}.html"
            path.write_text(page)
            with sync_playwright() as playwright:
                browser, tab = _chromium_tab(playwright, 1400, 900)
                start = time.perf_counter()
                tab.goto(path.as_uri(), timeout=300_000)
                tab.wait_for_function("window.lmCompare && window.lmCompare.plots.every((gd) => gd._fullLayout)",
                                      timeout=300_000)
                ready_s = time.perf_counter() - start

                def took(script: str, tab=tab) -> float:  # until the change is painted (two frames)
                    settle = "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
                    tab.evaluate(f"async () => {{ await {settle}; }}")  # nothing left over from before
                    begin = time.perf_counter()
                    tab.evaluate(f"async () => {{ await ({script}); await {settle}; }}")
                    return time.perf_counter() - begin

                select_s = took(f"window.lmCompare.select(Array.from({{length: {n // 10}}}, (_, i) => i * 10))")
                colour_s = took("window.lmCompare.colour('c0')")
                hover_s = took("window.lmCompare.hover(5)")
                tab.evaluate("Promise.all(window.lmCompare.plots.map((gd) => Plotly.addTraces(gd, "
                             "{type: 'scatter', x: [], y: [], mode: 'markers'})))")
                restyle_s = took("Promise.all(window.lmCompare.plots.map((gd, i) => Plotly.restyle(gd, "
                                 "{x: [[gd.data[0].x[5]]], y: [[gd.data[0].y[5]]]}, [gd.data.length - 1])))")
                browser.close()
            record("compare", f"compare.html, 3 maps of {n} images, hover ring", restyle_s, hover_s,
                   f"{len(page) / 1e6:.1f} MB", page_mb=round(len(page) / 1e6, 1), ready_s=round(ready_s, 1),
                   select_tenth_s=round(select_s, 2), colour_s=round(colour_s, 2))


def _refit_worker_ready() -> None:
    """A forkserver worker of bench_refit_workers, readied as a run's would be: umap-learn imported
    and numba's disk cache on (the folder the parent chose, inherited through NUMBA_CACHE_DIR), one
    numba thread (two workers share the two cores)."""
    import numba
    import umap  # noqa: F401

    from latentmap import jit

    jit.enable()
    numba.set_num_threads(1)


def _refit_in_worker(job: tuple) -> np.ndarray:
    """One half-sample's UMAP map as runner._map_refit fits it: (reducer config, rows of the space, fit, seed)."""
    from latentmap import reduce

    reducer, points, fit, seed = job
    return reduce.to_2d(reduce.build(reducer, fit), points, seed)


def bench_refit_workers(halves: int = 30) -> None:
    """Whether a run's UMAP map refits would pay in worker processes: UMAP's layout, 88% of a
    half-sample's fit, runs on one core and holds the GIL (threads do not overlap), and workers forked
    after a fit abort (numba's GNU OpenMP), so the candidate is two workers started by a forkserver.
    scikit-learn's digits (raw pixels as unit rows: the default run's images, not its EfficientNet
    features), a UMAP fitted on all 1,797 here first, then the 30 half-samples a run draws
    (``resampling.halves``, cv_seed 42) each fitted as ``runner._map_refit`` fits them (the reducer
    built for fit 0, seeded reducer_seed 42): one after another in this process (the run's way)
    against two forkserver workers, alternated twice, the maps compared to the bit. numba's disk
    cache is the machine's, as in a run, so the workers load what it holds instead of compiling."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from sklearn.datasets import load_digits

    from latentmap import jit

    jit.cache_in(jit.machine_folder(Path(tempfile.gettempdir()) / "latentmap-bench-numba"))  # before umap's import
    import umap  # noqa: F401

    from latentmap import metrics, reduce, resampling

    from helpers import compose

    jit.enable()

    found = load_digits()
    space = metrics.embedding_space(found.data.astype(np.float32), "cosine")
    reducer = compose(["reducer=umap"], Path(tempfile.gettempdir())).reducer
    reduce.to_2d(reduce.build(reducer), space, 42)  # the run's own fit: numba's code ready in this process
    members = resampling.halves(found.target, len(space), halves, 42).members
    jobs = [(reducer, space[np.flatnonzero(member)], 0, 42) for member in members]
    times: dict[str, list[float]] = {"here": [], "workers": []}
    for _ in range(2):
        here, seconds = timed(lambda: [_refit_in_worker(job) for job in jobs])
        times["here"].append(seconds)
        start = time.perf_counter()
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver"),
                                 initializer=_refit_worker_ready) as pool:
            workers = list(pool.map(_refit_in_worker, jobs))
        times["workers"].append(time.perf_counter() - start)
    same = all(np.array_equal(a, b) for a, b in zip(here, workers))
    record("refit-workers", f"{halves} UMAP refits of {len(jobs[0][1])} digits", min(times["here"]),
           min(times["workers"]), "maps bit for bit" if same else "NO",
           here_s=[round(t, 2) for t in times["here"]], workers_s=[round(t, 2) for t in times["workers"]])


def bench_refit_threads(tmp: Path) -> None:
    """The default run's metric stage (1,797 digits, EfficientNet-Lite0 features from a run of
    ``run.py`` first, its UMAP map refitted on each of the 30 half-samples, the probe refitted on
    each) with the fits one after another (the code before: UMAP's refits in the run's thread, the
    probe's threads only from 2 million numbers a fit) against side by side in threads (seeded UMAP
    fits with umap-learn's layout compiled to let go of the GIL; the probe's from 200,000 numbers),
    alternated twice in this process; every metric's value and half-sample values compared."""
    import subprocess

    from sklearn.datasets import load_digits

    from latentmap import jit

    work = tmp / "refit-threads"
    subprocess.run([sys.executable, str(ROOT / "run.py"), f"output_dir={work}", "tracking=none",
                    "metrics.refit_map=false", "metrics.bootstrap=2", "audit.enabled=false"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    (features,) = list((work / "cache").glob("*/embed.npy"))
    jit.cache_for_runs(work / "cache")  # the machine's numba cache, as a run's (before umap's import)
    from latentmap import metrics, probes, reduce, resampling, runner

    from helpers import compose

    cfg = compose([], work)
    embeddings, labels = np.load(features), load_digits().target
    assert len(embeddings) == len(labels)
    seed, distance = int(cfg.cv_seed), str(cfg.metrics.distance)
    space = metrics.embedding_space(embeddings, distance)
    maps = [reduce.to_2d(reduce.build(cfg.reducer), space, int(cfg.reducer_seed), labels)]
    halves = resampling.halves(labels, len(labels), int(cfg.metrics.bootstrap), seed)

    def score() -> resampling.Evaluation:
        return resampling.evaluate(embeddings, maps, labels, halves, k=int(cfg.metrics.k), folds=int(cfg.metrics.folds),
                                   seed=seed, distance=distance, refit=runner._map_refit(cfg, space, labels, halves))

    def before() -> resampling.Evaluation:
        side_by_side, threshold = reduce.side_by_side, probes.PARALLEL_REFITS_FROM
        reduce.side_by_side, probes.PARALLEL_REFITS_FROM = (lambda reducers, points: 1), 2_000_000
        try:
            return score()
        finally:
            reduce.side_by_side, probes.PARALLEL_REFITS_FROM = side_by_side, threshold

    times: dict[str, list[float]] = {"before": [], "threads": []}
    for _ in range(2):
        old, seconds = timed(before)
        times["before"].append(seconds)
        new, seconds = timed(score)
        times["threads"].append(seconds)
        same = (old.values == new.values and old.resampled.keys() == new.resampled.keys()
                and all(np.array_equal(old.resampled[name], new.resampled[name], equal_nan=True)
                        for name in old.resampled))
        record("refit-threads", f"default run, {halves.count} halves", times["before"][-1], times["threads"][-1],
               "values and halves" if same else "NO")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="add the large sizes")
    parser.add_argument("--only", nargs="*",
                        choices=["extract", "workers", "decode", "allocator", "gpu-preprocess", "sweep", "cache",
                                 "trust", "tsne", "metrics", "scoring", "nulls", "jit", "neighbours", "map", "scale",
                                 "transform", "million", "calibration", "protocols", "audit", "compare", "refit",
                                 "refit-run", "refit-workers", "refit-threads", "umap-fit", "per-class"])
    parser.add_argument("--replications", type=int, default=None,
                        help="calibration: datasets drawn per setting (default 300); per-class: draws (default 40)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[500], help="calibration: images per dataset")
    parser.add_argument("--map", choices=["pca", "fixed", "umap", "tsne", "opentsne"], default="pca",
                        help="calibration: the map a run with that reducer fits on each draw (pca, umap, tsne, "
                             "opentsne), or the population's fixed PCA projection (fixed)")
    parser.add_argument("--hold-map", action="store_true",
                        help="calibration: hold each draw's map fixed on its half-samples (a run's "
                             "metrics.refit_map=false) instead of fitting it again on each")
    parser.add_argument("--coverage-only", action="store_true", help="calibration: skip the paired tests")
    parser.add_argument("--run-only", action="store_true",
                        help="calibration: the run's intervals alone, without the before and held-fixed columns")
    parser.add_argument("--calibration-seed", type=int, default=0, help="calibration: the draws' seed")
    parser.add_argument("--mixtures", nargs="*", default=["mixture-hard", "mixture-easy"],
                        help="calibration: which populations: Gaussian mixtures (latentmap.calibration.MIXTURES: "
                             "mixture-hard, mixture-easy, mixture-imbalanced, mixture-many) or features:<folder>, "
                             "a run's arrays folder (its embeddings.npy and labels.npy)")
    parser.add_argument("--cuda-images", type=int, default=10000, help="images for the CUDA extract row")
    parser.add_argument("--cuda-batch", type=int, default=256, help="batch size of the CUDA extract row")
    parser.add_argument("--cuda-workers", type=int, default=8, help="DataLoader workers of the CUDA extract row")
    parser.add_argument("--baseline", help="scale, million: also run this git revision's code first (before/after)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--allocator-child", nargs=3, metavar=("SIDE", "MODEL", "TMP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allocator_child:
        side, model, folder = args.allocator_child
        _allocator_child(side, model, Path(folder))
        return
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chosen = set(args.only or ["extract", "gpu-preprocess", "sweep", "cache", "trust", "tsne", "metrics", "scoring",
                               "nulls", "jit", "neighbours", "map", "scale", "umap-fit"])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "extract" in chosen:
            bench_extract(tmp / "extract-cpu", 48)
            import torch

            if torch.cuda.is_available():
                bench_extract(tmp / "extract-cuda", args.cuda_images, "cuda", batch_size=args.cuda_batch,
                              num_workers=min(args.cuda_workers, os.cpu_count() or 1))
        if "workers" in chosen:
            bench_workers(tmp / "workers")
        if "decode" in chosen:
            bench_decode(tmp / "decode")
        if "allocator" in chosen:  # only when named: about 5 minutes here
            bench_allocator(tmp / "allocator")
        if "gpu-preprocess" in chosen:
            import torch

            if torch.cuda.is_available():
                bench_gpu_preprocess(tmp / "gpu-preprocess", args.cuda_images, args.cuda_batch,
                                     min(args.cuda_workers, os.cpu_count() or 1))
            else:
                print("gpu-preprocess: needs a CUDA device; none here", flush=True)
        if "sweep" in chosen:
            bench_sweep(tmp / "sweep", 60)
        if "cache" in chosen:
            bench_cache(tmp / "cache", 300)
        if "jit" in chosen:
            bench_jit(tmp / "jit")
        if "scale" in chosen:
            bench_scale(tmp / "scale", 100_000 if args.full else 20_000, ["reducer=pca"], args.baseline)
        if "refit-run" in chosen:  # only when named: about 7 minutes here (--full: 12)
            for _ in range(2):  # alternated: this machine's speed drifts within minutes
                for refit in ("false", "true"):
                    _scale_row(tmp / "scale", 100_000 if args.full else 20_000,
                               ["reducer=pca", f"metrics.refit_map={refit}"], ROOT,
                               "held fixed" if refit == "false" else "refitted")
        if "protocols" in chosen:
            bench_protocols(tmp / "protocols", Path(args.out))
        if "audit" in chosen:  # only when named: about 8 minutes here
            bench_audit(tmp / "scale", [1000, 20000, 100_000])
        if "million" in chosen:  # 15 minutes or more here: the files 3.4-6.9, the million-image run 7.4-8.7
            for n in (100_000, 1_000_000):
                bench_scale(tmp / "scale", n, ["reducer=umap", "reducer.fit_sample=20000"], args.baseline)
    if "trust" in chosen:
        bench_trust([2000, 5000, 10000, 20000], [50000] + ([100000] if args.full else []))
    if "tsne" in chosen:
        bench_tsne([5000] + ([20000] if args.full else []))
    if "scoring" in chosen:
        for n in ([2000, 20000] if args.full else [2000]):
            bench_scoring(n)
    if "umap-fit" in chosen:
        bench_umap_fit()
    if "refit-workers" in chosen:  # only when named: about 2 minutes here
        bench_refit_workers()
    if "refit-threads" in chosen:  # only when named: about 5 minutes here
        bench_refit_threads(tmp)
    if "refit" in chosen:  # only when named: about 3 minutes here
        bench_refit(20_000)
    if "nulls" in chosen:
        for n, width in ([(500, 320), (500, 1280)] + ([(1000, 320), (2000, 768)] if args.full else [])):
            bench_nulls(n, width)
    if "calibration" in chosen and args.hold_map and args.map == "fixed":
        parser.error("--hold-map holds each draw's own map fixed; --map fixed holds one map for every draw already")
    if "calibration" in chosen:  # only when named: about 30 minutes at R=300 here
        bench_calibration(args.sizes, args.replications or 300, args.mixtures, Path(args.out), args.map,
                          not args.coverage_only, hold=args.hold_map, beside=not args.run_only,
                          seed=args.calibration_seed)
    if "per-class" in chosen:  # only when named: about a minute here at R=40, its default
        bench_per_class([6, 15, 30, 100], args.replications or 40)
    if "metrics" in chosen:
        bench_metrics([20000] + ([100000] if args.full else []))
    if "transform" in chosen:
        bench_transform([200_000] + ([1_000_000] if args.full else []))
    if "neighbours" in chosen:
        bench_neighbours(100_000 if args.full else 30_000)
    if "map" in chosen:
        bench_map([100_000] + ([1_000_000] if args.full else []))
    if "compare" in chosen:  # only when named
        bench_compare([1000, 100_000])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(ROWS, indent=2))
    import pandas as pd

    pd.DataFrame(ROWS).to_csv(out / "bench.csv", index=False)
    print(f"wrote {out / 'bench.csv'} and {out / 'bench.json'}")


if __name__ == "__main__":
    main()
