"""The similarity measures and TwoNN held against protocols from the literature.

* Layer monotonicity (the ReSi benchmark's test, Klabunde et al. 2024): within one network, block i
  should be more similar to its near neighbours in depth than to far ones. Per measure: the mean
  over blocks of Spearman's correlation between similarity to block i and -|i - j|, and the
  violation rate (pairs j, j' on the same side of i with |i - j| < |i - j'| whose similarity is in
  the wrong order).
* Corresponding layers across seeds (Kornblith et al. 2019, their Table 2): networks that differ only
  in their seed; for each block of one network, is the most similar block of another its own
  counterpart? Per measure: the share of blocks so matched over every ordered pair of networks.
* TwoNN on manifolds of known dimension: points uniform on a d-sphere, rotated into a wider space;
  the estimate, its half-sample interval, and whether the interval reaches d.

Every measure is :mod:`latentmap.measures`'s (values, no nulls); Procrustes is a distance, so its
sign is flipped before ranking.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def _similarities(matrices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from latentmap.measures import LOWER_IS_CLOSER

    return {m: -matrix if m in LOWER_IS_CLOSER else matrix for m, matrix in matrices.items()}


def monotonicity(matrices: dict[str, np.ndarray]) -> list[dict]:
    """Per measure of (L, L) block x block ``matrices``: mean Spearman of similarity against
    -|i - j| over blocks i, and the violation rate of the depth order."""
    from scipy.stats import spearmanr

    rows = []
    for measure, similarity in _similarities(matrices).items():
        blocks = len(similarity)
        rhos, violations, pairs = [], 0, 0
        for i in range(blocks):
            others = np.array([j for j in range(blocks) if j != i])
            rhos.append(spearmanr(similarity[i, others], -np.abs(others - i)).statistic)
            for side in (others[others < i][::-1], others[others > i]):  # nearest first
                for a in range(len(side)):
                    for b in range(a + 1, len(side)):
                        pairs += 1
                        violations += similarity[i, side[a]] < similarity[i, side[b]]
        rows.append({"measure": measure, "spearman": float(np.nanmean(rhos)), "violation_rate": violations / pairs,
                     "blocks": blocks})
    return rows


def corresponding_blocks(between: dict[tuple[int, int], dict[str, np.ndarray]]) -> list[dict]:
    """Per measure: the share of blocks i of network a whose most similar block of network b is i,
    over every ordered pair (a, b) of ``between`` ((L, L) matrices of each measure)."""
    found: dict[str, list[bool]] = {}
    for matrices in between.values():
        for measure, similarity in _similarities(matrices).items():
            found.setdefault(measure, []).extend(similarity.argmax(axis=1) == np.arange(len(similarity)))
    return [{"measure": m, "accuracy": float(np.mean(hits)), "blocks_tested": len(hits)} for m, hits in found.items()]


def layer_protocol(model_dir: str, images_dir: str, cache_dir: str, how, n_images: int = 500,
                   k: int = 10) -> list[dict]:
    """Monotonicity of every measure over the blocks of a transformers model (mean-pooled blocks of
    ``n_images`` class-balanced images of an image folder), extracted through latentmap's cache with
    ``how`` (an :class:`latentmap.extract.Extraction`)."""
    from latentmap import cache, data, measures
    from latentmap.models import TransformersBackbone

    backbone = TransformersBackbone(name=model_dir)
    dataset = data.ImageFolderSource(path=images_dir, limit=n_images).load(seed=0)
    first = cache.embeddings(backbone, dataset, 0, "mean", cache_dir, how)
    blocks = cache.block_features(cache_dir, first.key, "mean")
    return monotonicity(measures.panel_matrices(blocks, k))


# --- small CNNs that differ only in their seed ------------------------------------------------------


def _digits_cnn(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 64), nn.ReLU()),
        nn.Linear(64, 10),
    )


def train_digits_cnns(seeds: list[int], epochs: int = 8) -> tuple[list, np.ndarray, np.ndarray, list[float]]:
    """Train one small CNN per seed on the same 1,297 of scikit-learn's digits (the seed sets the
    initial weights and the order of batches, nothing else), returning the networks, the 500
    held-out images, their labels and each network's held-out accuracy."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:-500], order[-500:]
    networks, accuracies = [], []
    for seed in seeds:
        network = _digits_cnn(seed)
        optimiser = torch.optim.Adam(network.parameters(), lr=2e-3)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for batch in torch.randperm(len(train), generator=generator).split(64):
                rows = train[batch.numpy()]
                optimiser.zero_grad()
                torch.nn.functional.cross_entropy(network(images[rows]), labels[rows]).backward()
                optimiser.step()
        network.eval()
        with torch.inference_mode():
            accuracies.append(float((network(images[test]).argmax(1) == labels[test]).float().mean()))
        networks.append(network)
    return networks, images[test], labels[test].numpy(), accuracies


def block_outputs(network, images) -> list[np.ndarray]:
    """(N, D) flattened output of each block (every module of the Sequential but the classifier)."""
    import torch

    outputs, current = [], images
    with torch.inference_mode():
        for block in list(network)[:-1]:
            current = block(current)
            outputs.append(current.flatten(1).numpy().astype(np.float64))
    return outputs


def seeds_protocol(networks: int = 5, k: int = 10) -> dict:
    """Train ``networks`` CNNs and match their blocks across every ordered pair, per measure."""
    from latentmap import measures

    trained, images, _, accuracies = train_digits_cnns(list(range(networks)))
    outputs = [block_outputs(network, images) for network in trained]
    between = {(a, b): measures.panel_matrices_between(outputs[a], outputs[b], k)
               for a in range(networks) for b in range(networks) if a != b}
    return {"accuracies": accuracies, "rows": corresponding_blocks(between)}


# --- TwoNN on manifolds of known dimension ----------------------------------------------------------


def sphere(dimension: int, n: int, ambient: int, seed: int) -> np.ndarray:
    """(n, ambient) points uniform on the unit ``dimension``-sphere, randomly rotated."""
    rng = np.random.default_rng(seed)
    ball = rng.normal(size=(n, dimension + 1))
    rotation = np.linalg.qr(rng.normal(size=(ambient, ambient)))[0][: dimension + 1]
    return (ball / np.linalg.norm(ball, axis=1, keepdims=True)) @ rotation


def twonn_protocol(dimensions=(2, 5, 10, 20, 40), n: int = 2000, ambient: int = 64, halves: int = 30) -> list[dict]:
    """TwoNN's estimate and its half-sample interval on d-spheres of ``n`` points; whether it reaches d."""
    from latentmap import resampling

    rows = []
    for dimension in dimensions:
        points = sphere(dimension, n, ambient, seed=dimension)
        drawn = resampling.halves(None, n, halves, 0)
        found = resampling.intervals(resampling.evaluate(points, None, None, drawn, k=10, folds=5, seed=0,
                                                         distance="euclidean"), drawn, 0.95)["twonn_id"]
        rows.append({"dimension": dimension, "n": n, "estimate": found.value, "lo": found.lo, "hi": found.hi,
                     "covers": bool(found.lo <= dimension <= found.hi)})
    return rows
