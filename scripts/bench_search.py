"""Every image's k nearest neighbours, library against library, side by side on the same arrays.

    python scripts/bench_search.py                  # 100,000 synthetic + the real CIFAR-10 set
    python scripts/bench_search.py --million        # adds 1,000,000 synthetic (the fastest methods)

(``pip install -e ".[bench]"`` installs hnswlib, usearch and voyager; faiss is a dependency.)

What the run's ``neighbours`` stage needs: the k = 10 nearest (euclidean on unit rows, the cosine
order) of every one of N images among all N, not itself. Each method runs in its own process (its
peak RSS is its own; a crash cannot end the bench) on the same float32 array:

* ``exact``: scikit-learn's blocked brute force (what latentmap does up to metrics.exact_neighbours);
* ``pynndescent``: latentmap's NN-descent graph (3k + 1 candidates), first in a process that compiles
  its numba code into an empty cache, then in one that loads it (what every later run on a machine
  pays);
* ``faiss-hnsw``, ``faiss-ivf``, ``hnswlib``, ``usearch``, ``voyager``: an index of all N built and
  queried with all N (k + 1, the image itself dropped), on both cores; latentmap's ``faiss-hnsw``
  starts each image's search at the image itself in the graph's bottom level, ``faiss-hnsw-top``
  (not in the default list) searches the same graph from its top, as latentmap did before;
* ``faiss-hnsw-sq8``, ``faiss-hnsw-fp16``: latentmap's HNSW graph over rows stored in 8 bits or half
  floats a dimension, ``faiss-hnsw-pca128``: over their 128 principal dimensions (3k + 1 candidates);
  each re-ranks its candidates by their exact distances (not in the default list: ask with
  ``--methods``);
* ``faiss-nndescent``: faiss's NN-descent graph (:data:`NNDESCENT_GRAPH` neighbours a row,
  :data:`NNDESCENT_ROUNDS` rounds), compiled C++ like its HNSW (not in the default list).

Recall: the share of each of 1,000 seeded images' exact k nearest that a method found, with its
mean relative excess of the mean neighbour distance (the outlier score's error).

Data: ``synthetic``, the whole-run bench's images (four classes of a colour and a stripe pattern
plus pixel noise, 32x32, pooled to 16x16 pixels: 768 dims, noise-like neighbourhoods, the hard
case); ``cifar10``, the 10,000 real CIFAR-10 test images of ../shared at 16x16 pixels.

Results: a table on stdout and outputs/bench/search.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
K = 10
QUERIES = 1000
# faiss's NN-descent: neighbours kept a row, and rounds (at 30,000 synthetic rows, 7 rounds recalled
# 0.67, 8 rounds 0.76 and 10 rounds 0.87, against HNSW's 0.69; 16 kept recalled more than 32 or 64)
NNDESCENT_GRAPH, NNDESCENT_ROUNDS = 16, 8


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    """(n, 768) float32 unit rows: tests/helpers.write_class_images' four classes, made in memory
    (no files) and pooled 2x2 to 16x16 pixels."""
    rng = np.random.default_rng(seed)
    colours = np.array([(40, 60, 200), (40, 180, 60), (200, 50, 40), (220, 200, 40)], float)
    yy, xx = np.mgrid[0:32, 0:32]
    patterns = np.stack([(xx // 4) % 2, (yy // 4) % 2, ((xx + yy) // 4) % 2, (xx // 8 + yy // 8) % 2])
    out = np.empty((n, 768), np.float32)
    for start in range(0, n, 50_000):
        rows = min(50_000, n - start)
        label = np.arange(start, start + rows) % 4
        base = colours[label][:, None, None, :] * (0.6 + 0.4 * patterns[label][..., None])
        pixels = np.clip(base + rng.normal(0, 18, (rows, 32, 32, 3)), 0, 255).astype(np.uint8).astype(np.float32)
        pooled = pixels.reshape(rows, 16, 2, 16, 2, 3).mean(axis=(2, 4)) / 255
        out[start:start + rows] = pooled.reshape(rows, -1)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def cifar10() -> np.ndarray | None:
    """(10000, 768) float32 unit rows of the real CIFAR-10 test images at 16x16, or None."""
    from PIL import Image

    paths = sorted((SHARED / "data" / "cifar10-test").glob("*/*.jpg"))
    if not paths:
        return None
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR),
                                  np.float32).ravel() / 255 for p in paths])
    return pixels / np.linalg.norm(pixels, axis=1, keepdims=True)


def _drop_self(indices: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(indices)
    keep = (indices != np.arange(n)[:, None]) & (indices >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(indices, order, 1), np.take_along_axis(distances, order, 1)


def search(method: str, space: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, squared euclidean distances), each (N, k), of every row's k nearest other rows."""
    n, d = space.shape
    threads = os.cpu_count() or 1
    if method == "exact":
        from latentmap import neighbours

        indices, euclidean = neighbours.nearest(space, k, metric="euclidean")
        return indices, euclidean**2
    if method.startswith("pynndescent"):  # what latentmap used before: 3k + 1 candidates, numba cache on
        from pynndescent import NNDescent

        from latentmap import jit

        jit.enable()
        index = NNDescent(space, metric="euclidean", n_neighbors=min(n - 1, 3 * k + 1), random_state=0,
                          low_memory=True, compressed=True, verbose=False)
        indices, distances = index.neighbor_graph
        return _drop_self(indices, distances**2, k)
    if method.startswith("faiss"):
        from latentmap import neighbours

        faiss = neighbours.faiss_module()
        faiss.omp_set_num_threads(threads)

        if method == "faiss-hnsw":  # latentmap's settings (neighbours.HNSW_*)
            indices, euclidean = neighbours._hnsw(space, k)
            return indices, euclidean.astype(np.float64) ** 2
        if method == "faiss-hnsw-top":  # the same graph searched from its top level (latentmap before)
            _, candidates = neighbours._hnsw_graph(np.ascontiguousarray(space), k).search(space, k + 1)
            indices, euclidean = neighbours._own_removed(space, candidates, k)
            return indices, euclidean.astype(np.float64) ** 2
        if method in ("faiss-hnsw-sq8", "faiss-hnsw-fp16"):  # the same graph over 8-bit or half-float rows
            kind = faiss.ScalarQuantizer.QT_8bit if method.endswith("sq8") else faiss.ScalarQuantizer.QT_fp16
            index = faiss.IndexHNSWSQ(d, kind, neighbours.HNSW_LINKS)
            index.train(space)
            index.hnsw.efConstruction = neighbours.HNSW_BUILD
            index.add(space)
            index.hnsw.efSearch = max(neighbours.HNSW_SEARCH, k + 1)
            _, candidates = index.search(space, k + 1)
            indices, euclidean = neighbours._own_removed(space, candidates, k)  # exact re-ranking, as the run's
            return indices, euclidean.astype(np.float64) ** 2
        if method == "faiss-hnsw-pca128":  # the graph in 128 principal dimensions, 3k + 1 candidates re-ranked
            pca = faiss.PCAMatrix(d, 128)
            pca.train(space[np.sort(np.random.default_rng(0).choice(n, min(n, 20_000), replace=False))])
            low = pca.apply(space)
            index = faiss.IndexHNSWFlat(128, neighbours.HNSW_LINKS)
            index.hnsw.efConstruction = neighbours.HNSW_BUILD
            index.add(low)
            index.hnsw.efSearch = max(neighbours.HNSW_SEARCH, 3 * k + 2)
            _, candidates = index.search(low, min(n, 3 * k + 2))
            indices, euclidean = neighbours._own_removed(space, candidates, k)  # exact re-ranking, as the run's
            return indices, euclidean.astype(np.float64) ** 2
        if method == "faiss-nndescent":  # faiss's own NN-descent (compiled C++, nothing to compile here)
            index = faiss.IndexNNDescentFlat(d, NNDESCENT_GRAPH)
            index.nndescent.iter = NNDESCENT_ROUNDS
            index.add(space)
            graph = faiss.vector_to_array(index.nndescent.final_graph).reshape(n, NNDESCENT_GRAPH)
            indices, euclidean = neighbours._own_removed(space, graph, k)
            return indices, euclidean.astype(np.float64) ** 2
        if method == "faiss-ivf":
            lists = int(4 * np.sqrt(n))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, lists)
            sample = np.random.default_rng(0).choice(n, min(n, 40 * lists), replace=False)
            index.train(space[np.sort(sample)])
            index.add(space)
            index.nprobe = 16
            distances, indices = index.search(space, k + 1)
            return _drop_self(indices, distances, k)
        raise ValueError(method)
    if method == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="l2", dim=d)
        index.init_index(max_elements=n, M=16, ef_construction=100, random_seed=0)
        index.add_items(space, np.arange(n), num_threads=threads)
        index.set_ef(64)
        indices, distances = index.knn_query(space, k + 1, num_threads=threads)
        return _drop_self(indices.astype(np.int64), distances, k)
    if method == "usearch":
        from usearch.index import Index

        index = Index(ndim=d, metric="l2sq", dtype="f32", connectivity=16, expansion_add=128, expansion_search=64)
        index.add(np.arange(n), space, threads=threads)
        found = index.search(space, k + 1, threads=threads)
        return _drop_self(np.asarray(found.keys, np.int64), np.asarray(found.distances), k)
    if method == "voyager":
        from voyager import Index, Space

        index = Index(Space.Euclidean, num_dimensions=d, M=16, ef_construction=100, random_seed=0)
        index.add_items(space, np.arange(n), num_threads=threads)
        indices, distances = index.query(space, k + 1, num_threads=threads, query_ef=64)
        return _drop_self(indices.astype(np.int64), distances, k)
    raise ValueError(method)


def child(method: str, data: str, exact: str) -> None:
    space = np.load(data)
    exact_indices, exact_distances = np.load(exact)["indices"], np.load(exact)["distances"]
    queries = np.load(exact)["queries"]
    data_mb = space.nbytes / 2**20
    start = time.perf_counter()
    indices, distances = search(method, space, K)
    seconds = time.perf_counter() - start
    recall = (indices[queries][:, :, None] == exact_indices[:, None, :]).any(axis=2).mean(axis=1)
    found, true = np.sqrt(distances[queries]).mean(axis=1), np.sqrt(exact_distances).mean(axis=1)
    excess = np.where(true > 0, (found - true) / np.where(true > 0, true, 1), 0.0)
    # The process's own high-water mark (ru_maxrss would carry the parent's over from the fork).
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    peak = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
    peak_mb = int(peak[0]) / 1024 if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "recall": float(recall.mean()), "recall_min": float(recall.min()),
                      "distance_excess_pct": float(100 * excess.mean()), "peak_mb": peak_mb, "data_mb": data_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--million", action="store_true", help="add 1,000,000 synthetic images")
    parser.add_argument("--methods", nargs="*",
                        default=["exact", "pynndescent-first", "pynndescent", "faiss-hnsw", "faiss-ivf", "hnswlib",
                                 "usearch", "voyager"])
    parser.add_argument("--million-methods", nargs="*", default=["pynndescent", "faiss-ivf", "usearch"])
    parser.add_argument("--data", nargs="*", default=["synthetic", "cifar10"], help="which sets")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sets = [("synthetic", 100_000, lambda: synthetic(100_000), args.methods),
                ("cifar10", 10_000, cifar10, args.methods)]
        sets = [entry for entry in sets if entry[0] in args.data]
        if args.million:
            sets.append(("synthetic", 1_000_000, lambda: synthetic(1_000_000), args.million_methods))
        for name, n, make, methods in sets:
            space = make()
            if space is None:
                print(f"{name}: no data here, skipped", flush=True)
                continue
            data = tmp / f"{name}-{n}.npy"
            np.save(data, space)
            from latentmap import neighbours

            queries = np.sort(np.random.default_rng(0).choice(len(space), QUERIES, replace=False))
            indices, euclidean = neighbours.nearest(space, K, queries, metric="euclidean")
            np.savez(tmp / "exact.npz", indices=indices, distances=euclidean**2, queries=queries)
            del space
            numba_cache = tmp / f"numba-{name}-{n}"
            for method in methods:
                env = {**os.environ, "NUMBA_CACHE_DIR": str(numba_cache)}
                command = [sys.executable, __file__, "--child", method, str(data), str(tmp / "exact.npz")]
                result = subprocess.run(command, capture_output=True, text=True, env=env)
                if result.returncode:
                    found = {"error": (result.stderr.strip().splitlines() or ["killed"])[-1][:160]}
                else:
                    found = json.loads(result.stdout.strip().splitlines()[-1])
                row = {"data": name, "images": n, "method": method, **found}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", "scripts/bench_search.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"),
            "k": K, "recall_queries": QUERIES}
    (out / "search.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| data | images | method | seconds | recall (mean) | recall (worst query) | distance excess | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['data']} | {row['images']:,} | {row['method']} | failed: {row['error']} | | | | |")
            continue
        lines.append(f"| {row['data']} | {row['images']:,} | {row['method']} | {row['seconds']:.1f} | "
                     f"{row['recall']:.3f} | {row['recall_min']:.1f} | {row['distance_excess_pct']:.2f}% | "
                     f"{row['peak_mb'] / 1024:.1f} GB |")
    (out / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
