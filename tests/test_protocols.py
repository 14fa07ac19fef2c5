"""latentmap.protocols: the external protocols' scoring, on matrices whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from latentmap import protocols


def _by_depth(blocks: int) -> np.ndarray:
    depth = np.arange(blocks)
    return 1.0 - np.abs(depth[:, None] - depth[None, :]) / blocks  # falls with |i - j|


def test_monotonicity_of_a_perfect_and_of_a_reversed_depth_order():
    perfect = _by_depth(6)
    found = {r["measure"]: r for r in protocols.monotonicity({"cka": perfect, "rsa": 1 - perfect,
                                                               "procrustes": 1 - perfect})}
    assert found["cka"]["spearman"] == pytest.approx(1.0) and found["cka"]["violation_rate"] == 0
    assert found["rsa"]["spearman"] == pytest.approx(-1.0) and found["rsa"]["violation_rate"] == 1
    # Procrustes is a distance: growing with depth is the right order.
    assert found["procrustes"]["spearman"] == pytest.approx(1.0) and found["procrustes"]["violation_rate"] == 0


def test_corresponding_blocks_count_each_block_matched_to_its_counterpart():
    matched = np.eye(4) + 0.1
    shifted = np.roll(np.eye(4), 1, axis=1)  # every block most similar to the next one
    rows = protocols.corresponding_blocks({(0, 1): {"cka": matched, "rsa": shifted},
                                           (1, 0): {"cka": matched, "rsa": matched}})
    found = {r["measure"]: r for r in rows}
    assert found["cka"]["accuracy"] == 1.0 and found["rsa"]["accuracy"] == 0.5 and found["cka"]["blocks_tested"] == 8


def test_points_on_a_sphere_have_its_dimension_and_twonn_finds_a_low_one():
    points = protocols.sphere(3, 1000, 20, seed=0)
    assert points.shape == (1000, 20) and np.allclose(np.linalg.norm(points, axis=1), 1.0)
    assert np.linalg.matrix_rank(points) == 4  # a 3-sphere spans 4 dimensions
    (row,) = protocols.twonn_protocol(dimensions=(3,), n=1000, ambient=20, halves=10)
    assert abs(row["estimate"] - 3) < 0.4 and row["lo"] < row["estimate"] < row["hi"]
