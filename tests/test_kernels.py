"""latentmap.kernels against their plain-numpy definitions, ties and missing neighbours included."""

from __future__ import annotations

import numpy as np

from latentmap import kernels


def test_closer_in_plane_counts_the_other_points_strictly_closer_than_each_neighbour():
    rng = np.random.default_rng(0)
    points = np.round(rng.normal(size=(300, 2)), 1)  # a coarse grid: many tied distances
    points[5] = points[6]  # a duplicate: its neighbour at distance 0 has nobody closer
    neighbours = rng.integers(0, 300, (300, 7))
    neighbours = np.where(neighbours == np.arange(300)[:, None], (neighbours + 1) % 300, neighbours)  # never itself
    neighbours[5, 0] = 6
    neighbours[::4, 3] = -1  # no neighbour in this slot
    found = kernels.closer_in_plane(points, neighbours)
    squared = ((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(squared, np.inf)  # a point is not closer to itself
    for i in range(300):
        for s, j in enumerate(neighbours[i]):
            expected = 0 if j < 0 else int((squared[i] < squared[i, j]).sum())
            assert found[i, s] == expected, (i, s, j)
    assert found[5, 0] == 0


def test_count_below_equals_a_binary_search_in_the_sorted_row():
    rng = np.random.default_rng(1)
    values = np.round(rng.random((40, 500)), 2)  # ties
    values[np.arange(40), rng.integers(0, 500, 40)] = np.inf  # the pass's own-image entries
    thresholds = np.take_along_axis(values, rng.integers(0, 500, (40, 30)), axis=1)
    expected = np.stack([np.searchsorted(np.sort(row), limits, side="left") for row, limits in zip(values, thresholds)])
    np.testing.assert_array_equal(kernels.count_below(values, thresholds), expected)
    # thresholds above every entry, below every entry, and none at all
    outside = np.column_stack([np.full(40, 2.0), np.full(40, -1.0), thresholds[:, :3]])
    np.testing.assert_array_equal(kernels.count_below(values, outside)[:, :2],
                                  np.column_stack([np.isfinite(values).sum(axis=1), np.zeros(40, int)]))
    assert kernels.count_below(values, thresholds[:, :0]).shape == (40, 0)


def test_positions_in_finds_each_items_first_place_in_its_rows_list():
    rng = np.random.default_rng(2)
    items, lists = rng.integers(0, 40, (50, 12)), rng.integers(0, 40, (50, 20))  # repeats and absences
    match = items[:, :, None] == lists[:, None, :]
    expected = np.where(match.any(axis=2), match.argmax(axis=2), -1)
    np.testing.assert_array_equal(kernels.positions_in(items, lists), expected)
    assert (expected == -1).any() and (expected >= 0).any()


def test_plane_class_sums_are_the_distance_matrix_times_the_class_one_hot():
    from sklearn.metrics import pairwise_distances

    rng = np.random.default_rng(3)
    points = rng.normal(size=(250, 2)) * 4
    points[7] = points[8]  # a duplicate: distance 0
    labels = rng.integers(0, 6, 250)
    labels[labels == 4] = 5  # a class with no points: its column is 0
    expected = pairwise_distances(points) @ np.eye(6)[labels]
    found = kernels.plane_class_sums(points, labels.astype(np.int64), 6)
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-9)
    assert (found[:, 4] == 0).all()
