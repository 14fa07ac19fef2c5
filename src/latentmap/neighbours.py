"""Nearest neighbours in the embedding space, and the outlier scores built on them.

The distance is the embedding space's one geometry (``metrics.distance``: cosine, 1 - cosine
similarity, by default; or euclidean), the one ``knn_acc_hd`` uses. A point is never its own
neighbour.
"""

from __future__ import annotations

import base64
import io

import numpy as np


def nearest(embeddings: np.ndarray, k: int, queries: np.ndarray | None = None,
            metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances), each (Q, k): the k nearest rows of ``embeddings`` to each query row
    (all rows when ``queries`` is None), nearest first, excluding the query itself, by ``metric``
    (``metrics.distance``: cosine or euclidean).

    scikit-learn's brute-force search works through the distance matrix in chunks
    (``sklearn.set_config(working_memory=...)``), so memory stays bounded at any N.
    """
    from sklearn.neighbors import NearestNeighbors

    embeddings = np.asarray(embeddings, dtype=np.float32)
    if not 1 <= k < len(embeddings):
        raise ValueError(f"k={k} must be in 1..{len(embeddings) - 1}")
    index = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute").fit(embeddings)
    if queries is None:
        distances, indices = index.kneighbors()  # excludes each point itself
        return indices, distances
    distances, indices = index.kneighbors(embeddings[queries], n_neighbors=k + 1)
    keep = indices != np.asarray(queries)[:, None]
    # Drop the query itself (or the farthest neighbour when a duplicate took its place).
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(indices, order, 1), np.take_along_axis(distances, order, 1)


def outlier_scores(indices: np.ndarray, distances: np.ndarray, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per image: ``outlier_score`` (mean distance to its k nearest neighbours) and, when
    labelled, ``neighbour_disagreement`` (share of those neighbours with another label)."""
    scores = {"outlier_score": distances.mean(axis=1).astype(np.float32)}
    if labels is not None:
        scores["neighbour_disagreement"] = (labels[indices] != labels[:, None]).mean(axis=1).astype(np.float32)
    return scores


def png_data_uri(image: np.ndarray) -> str:
    """An (h, w, 3) uint8 image as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
