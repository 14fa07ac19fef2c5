"""What the embedding says about the data: per-class results, suspected label errors, exact and near
duplicates (and leakage across a split or into a second image set), and the clusters the model finds.

Everything here reads what a run has already computed: the out-of-fold predictions of the probe and
the k-NN classifier on the scored images, each image's nearest neighbours in the run's geometry,
and the half-samples of the calibration, so every rate has an interval that means what the run's
metrics' intervals mean.

* ``tables/per_class.csv``: each class's k-NN and probe accuracy (out of fold) and silhouette, with
  half-sample intervals; ``tables/confusion.csv`` and ``plots/confusion.png``: the probe's
  out-of-fold confusion matrix.
* ``tables/label_issues.csv``: images whose given label the probe's out-of-fold probabilities doubt,
  ranked, from cleanlab's ``find_label_issues`` (confident learning) and ``get_label_quality_scores``.
* ``tables/duplicates.csv``: exact duplicates (the same bytes) and near duplicates (pairs closer than
  ``audit.duplicate_ratio`` x the median nearest-neighbour distance), and whether a pair crosses the
  holdout split; ``tables/leakage.csv`` with ``audit.against=``.
* ``tables/clusters.csv``: k-means (k = the number of classes) and HDBSCAN clusters, each with its
  size, majority class and purity; NMI and ARI against the labels, with intervals.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from latentmap import stats

log = logging.getLogger(__name__)

# The rates of the per-class table: (column, the evaluation's per-image score), each a proportion.
PER_CLASS = (("knn_acc", "knn_acc_hd"), ("probe_acc", "probe_acc"), ("silhouette", "silhouette_hd"))
CLUSTER_METRICS = ("nmi_kmeans", "ari_kmeans", "nmi_hdbscan", "ari_hdbscan")


@dataclass
class Audit:
    """A run's audit: its tables, its scores with intervals, and per-image columns for map.html."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    scores: dict[str, stats.Interval] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    per_image: dict[str, np.ndarray] = field(default_factory=dict)  # over the scored rows
    confusion: np.ndarray | None = None  # over the classes with scored images, named in confusion_names
    confusion_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the log and the report say


def _class_rate(values: np.ndarray, labels: np.ndarray, c: int) -> float:
    chosen = labels == c
    return float(values[chosen].mean()) if chosen.any() else float("nan")


def per_class(labels: np.ndarray, names: list[str], per_image: dict[str, np.ndarray],
              halved: dict[str, list[tuple[np.ndarray, np.ndarray]]], scale: float,
              confidence: float) -> pd.DataFrame:
    """One row per class: its image count and, for each of :data:`PER_CLASS` the run computed, the
    class's mean and its half-sample interval (the per-image scores of each half-sample's members,
    averaged over the class: the same resampling as the run's metrics)."""
    rows = []
    for c, name in enumerate(names):
        n = int((labels == c).sum())
        if n == 0:
            continue
        row: dict[str, object] = {"class": name, "label": c, "n": n}
        for column, score in PER_CLASS:
            if score not in per_image:
                continue
            value = _class_rate(per_image[score], labels, c)
            resampled = np.array([_class_rate(values, labels[members], c) for members, values in halved.get(score, [])])
            found = stats.from_halves(value, resampled, scale, n, confidence, proportion=column != "silhouette",
                                      bounds=(-1.0, 1.0) if column == "silhouette" else None)
            row.update({column: found.value, f"{column}_lo": found.lo, f"{column}_hi": found.hi})
        rows.append(row)
    return pd.DataFrame(rows)


def confusion(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts: row = given label, column = the probe's out-of-fold prediction."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predicted, labels=np.arange(n_classes))


def confused_note(pairs: list[tuple[str, str, int, float]]) -> str:
    """The log's line for :func:`most_confused`'s pairs: ``3 -> 5: 4 images (2% of 3)``."""
    return "most confused (given -> the probe's out-of-fold prediction): " + "; ".join(
        f"{given} -> {taken}: {count} image{'s' if count != 1 else ''} ({share:.0%} of {given})"
        for given, taken, count, share in pairs)


def most_confused(matrix: np.ndarray, names: list[str], top: int = 5) -> list[tuple[str, str, int, float]]:
    """The ``top`` off-diagonal cells: (given, predicted as, count, share of the given class)."""
    off = matrix.astype(float).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:top]
    found = []
    for flat in order:
        given, predicted = np.unravel_index(flat, off.shape)
        if off[given, predicted] == 0:
            break
        total = max(int(matrix[given].sum()), 1)
        found.append((names[given], names[predicted], int(off[given, predicted]), off[given, predicted] / total))
    return found


def label_issues(labels: np.ndarray, probabilities: np.ndarray, names: list[str], indices: np.ndarray,
                 method: str = "prune_by_noise_rate") -> tuple[pd.DataFrame, np.ndarray]:
    """Images whose given label is probably wrong, most likely first: cleanlab's ``find_label_issues``
    on the probe's out-of-fold probabilities (``method``: its ``filter_by``), ranked by its label
    quality score (self-confidence: the probability of the given label). Returns the table (dataset
    index, given and suggested label, score) and each scored image's quality score."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probabilities = np.clip(probabilities, 1e-12, 1.0)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    quality = get_label_quality_scores(labels, probabilities)
    # n_jobs=1: cleanlab's own process pool fails inside a launcher's worker (joblib's loky: "name
    # 'pred_probs_by_class' is not defined"), and the step is a small one beside the probe that made the probabilities
    flagged = find_label_issues(labels, probabilities, filter_by=method, return_indices_ranked_by="self_confidence",
                                n_jobs=1)
    suggested = probabilities.argmax(axis=1)
    table = pd.DataFrame({"index": indices[flagged], "row": flagged,
                          "given": [names[c] for c in labels[flagged]],
                          "suggested": [names[c] for c in suggested[flagged]],
                          "score": quality[flagged]})
    return table, quality


def _with_paths(table: pd.DataFrame, paths: list[str] | None, columns: dict[str, str]) -> None:
    """Add to ``table``, for each of its row columns, the image file of that row (``{"row": "path"}``),
    so that the file to look at, fix or delete is named; nothing when the images have no paths."""
    if paths is None:
        return
    for row_column, path_column in columns.items():
        table[path_column] = [paths[int(row)] for row in table[row_column]]


def content_hashes(dataset) -> list[str]:
    """Each row's image bytes hashed (blake2b): equal hashes are exact duplicates. The image
    records are read through Arrow a batch of 4,096 rows at a time (the dataset's row order, a
    selection's included; memory holds one batch): 2.9x faster than a row at a time through
    datasets' formatting on 100,000 image files (the same hashes)."""
    from latentmap import data

    hashes = []
    for batch in data.undecoded(dataset).with_format("arrow").iter(batch_size=4096):
        for record in batch.column("image").to_pylist():
            raw = record.get("bytes") if isinstance(record, dict) else None
            if raw is None and isinstance(record, dict) and record.get("path"):
                hashes.append(_file_digest(record["path"]))
            else:
                hashes.append(_digest(raw))
    return hashes


def _digest(raw: bytes | None) -> str:
    """One image's content hash (blake2b, 16 bytes, in hex); "" for no bytes."""
    return hashlib.blake2b(raw, digest_size=16).hexdigest() if raw else ""


def _file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return _digest(handle.read())


# Below this many image files the hashes are read in the audit itself (a process's start costs more).
BESIDE_MIN = 50_000


class FileHashes:
    """:func:`content_hashes` of a dataset's rows, read in a process forked now, beside the run's
    next stages, where the rows are files (an image folder) and processes start by fork; elsewhere,
    or below :data:`BESIDE_MIN` files, in :meth:`result` itself. Reading a million files took 13 s of
    the audit on one core here, while UMAP's fit, a few stages before, leaves the other core idle.
    :meth:`result` gives the same list in either case (tested); if the process failed (a file that
    cannot be read, say) it reads them again here, raising what the audit raised before."""

    def __init__(self, dataset) -> None:
        import multiprocessing
        import weakref

        from latentmap.machine import forks_by_default

        self.dataset = dataset
        self._receive = self._stop = None
        self.paths: list[str] | None = None  # the rows' files, when read here (the audit's tables name them)
        if len(dataset) < BESIDE_MIN or not forks_by_default():
            return
        paths = self.paths = file_paths(dataset)
        if paths is None:
            return
        context = multiprocessing.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_send_file_digests, args=(paths, send), daemon=True,
                                  name="latentmap-hashes")
        process.start()
        send.close()
        self._stop = weakref.finalize(self, _stop_process, process, self._receive)  # on any exit

    @property
    def beside(self) -> bool:
        """Whether a process is reading the files."""
        return self._stop is not None

    def result(self) -> list[str]:
        if self._stop is not None:
            try:
                ok, found = self._receive.recv()
            except (EOFError, OSError) as error:  # the process died (killed for memory, say)
                ok, found = False, repr(error)
            self._stop()
            if ok:
                return found
            log.debug("audit: the hashing process failed (%s); hashing the files here", found)
        return content_hashes(self.dataset)


def file_paths(dataset) -> list[str] | None:
    """Each row's image file, in row order, read a batch of rows at a time; None where a row holds
    its image's bytes (a hub dataset's name beside them is no file to open)."""
    from latentmap import data

    paths = []
    for batch in data.undecoded(dataset).with_format("arrow").iter(batch_size=65_536):
        images = batch.column("image").combine_chunks()
        if images.type.num_fields == 0 or images.field("bytes").null_count != len(images):
            return None
        column = images.field("path")
        if column.null_count:
            return None
        paths.extend(column.to_pylist())
    return paths


def _send_file_digests(paths: list[str], send) -> None:
    """In the forked process: every file's digest, or what went wrong, through ``send``."""
    try:
        found = (True, [_file_digest(path) for path in paths])
    except BaseException as error:  # noqa: BLE001 (reported to the parent, which reads them again)
        found = (False, repr(error))
    send.send(found)
    send.close()


def _stop_process(process, receive) -> None:
    receive.close()
    if process.is_alive():
        process.terminate()
    process.join()


def near_threshold(distances: np.ndarray, ratio: float) -> float:
    """The near-duplicate distance: ``ratio`` x the median distance from an image to its nearest
    neighbour, so the rule means the same in any model's geometry (cosine or euclidean, any scale)."""
    return float(ratio * np.median(distances[:, 0])) if len(distances) else 0.0


def duplicates(hashes: list[str], indices: np.ndarray, neighbour_rows: np.ndarray, neighbour_distances: np.ndarray,
               threshold: float, held_out: np.ndarray | None = None) -> pd.DataFrame:
    """Pairs of images that are the same bytes (``exact``) or closer than ``threshold`` in the run's
    geometry (``near``, from each image's nearest neighbours), each pair once, nearest first;
    ``crosses_split`` when one image is held out (``held_out``: (N,) bool) and the other is not."""
    pairs: dict[tuple[int, int], tuple[str, float]] = {}
    by_hash: dict[str, list[int]] = {}
    for row, digest in enumerate(hashes):
        if digest:
            by_hash.setdefault(digest, []).append(row)
    for rows in by_hash.values():  # each copy paired with the first of its group (n - 1 pairs, not n^2 / 2)
        for b in rows[1:]:
            pairs[(rows[0], b)] = ("exact", 0.0)
    close = np.argwhere(neighbour_distances <= threshold)
    for row, column in close:
        other = int(neighbour_rows[row, column])
        key = (min(int(row), other), max(int(row), other))
        if key[0] != key[1] and key not in pairs:
            pairs[key] = ("near", float(neighbour_distances[row, column]))
    ordered = sorted(pairs.items(), key=lambda item: (item[1][1], item[0]))
    table = pd.DataFrame([{"row_a": a, "row_b": b, "index_a": int(indices[a]), "index_b": int(indices[b]),
                           "kind": kind, "distance": distance,
                           "crosses_split": bool(held_out is not None and held_out[a] != held_out[b])}
                          for (a, b), (kind, distance) in ordered],
                         columns=["row_a", "row_b", "index_a", "index_b", "kind", "distance", "crosses_split"])
    return table


def leakage(space: np.ndarray, other: np.ndarray, indices_other: np.ndarray, indices: np.ndarray,
            threshold: float, distance: str) -> pd.DataFrame:
    """Images of a second set (``other``, in the same geometry as ``space``) whose nearest image in
    this run's set is closer than ``threshold``: (index in the other set, its nearest here, distance)."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=1, metric="euclidean", algorithm="brute").fit(space)
    euclidean, rows = index.kneighbors(other)
    found = euclidean[:, 0] ** 2 / 2 if distance == "cosine" else euclidean[:, 0]  # the run's distance
    leaked = np.flatnonzero(found <= threshold)
    return pd.DataFrame({"index_other": indices_other[leaked], "index": indices[rows[leaked, 0]],
                         "distance": found[leaked]}).sort_values("distance").reset_index(drop=True)


_AGREEMENT_BOUNDS = {"nmi": (0.0, 1.0), "ari": (-0.5, 1.0)}


def _agreement(labels: np.ndarray, clusters: np.ndarray) -> tuple[float, float]:
    """(NMI, ARI) of a labelling and a clustering, both coded 0..K-1: scikit-learn's
    ``normalized_mutual_info_score`` (arithmetic mean of the entropies) and ``adjusted_rand_score``,
    from one contingency table. The same values to 1e-12 (tested) at about 1/100 of the time, which
    matters on the few hundred half-samples an interval recomputes them on."""
    n = len(labels)
    n_labels, n_clusters = int(labels.max()) + 1, int(clusters.max()) + 1
    table = np.bincount(labels * n_clusters + clusters, minlength=n_labels * n_clusters).reshape(n_labels, n_clusters)
    rows, columns = table.sum(1), table.sum(0)
    rows, columns, cells = rows[rows > 0], columns[columns > 0], table[table > 0].astype(np.float64)
    if (len(rows) == len(columns) == 1) or len(rows) == len(columns) == n:  # sklearn's perfect cases
        return 1.0, 1.0

    def entropy(counts: np.ndarray) -> float:
        share = counts / n
        return float(-(share * np.log(share)).sum())

    outer = np.outer(table.sum(1), table.sum(0))[table > 0]
    mutual = float((cells / n * (np.log(cells) - np.log(outer) + np.log(n))).sum())
    nmi = 0.0 if mutual <= 0 else mutual / max((entropy(rows) + entropy(columns)) / 2, np.finfo(np.float64).eps)

    def pairs(counts: np.ndarray) -> float:
        counts = counts.astype(np.float64)
        return float((counts * (counts - 1) / 2).sum())

    together, by_label, by_cluster = pairs(cells), pairs(rows), pairs(columns)
    expected = by_label * by_cluster / (n * (n - 1) / 2)
    ceiling = (by_label + by_cluster) / 2
    ari = 1.0 if ceiling == expected else (together - expected) / (ceiling - expected)
    return float(min(nmi, 1.0)), float(ari)


def _recoded(labels: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def codes(values: np.ndarray) -> np.ndarray:  # 0..K-1 in the values' order
        return np.unique(values, return_inverse=True)[1].reshape(-1)

    return codes(labels), codes(clusters)


def clusters(space: np.ndarray, labels: np.ndarray | None, names: list[str] | None, min_cluster_size: int,
             dimensions: int, seed: int, members: np.ndarray, scale: float, confidence: float,
             purity: float) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, stats.Interval]]:
    """k-means (k = the number of classes among the images, or 10 unlabelled) on the embedding space, and HDBSCAN on a
    PCA of it to ``dimensions`` (density estimates need few dimensions, and HDBSCAN's cost grows fast
    with them: at 20,000 images, 50 dimensions took over three times as long as 10), each cluster's size,
    majority class and purity, and NMI and ARI against the labels with half-sample intervals (the
    clusters fixed, the agreement recomputed on each half). HDBSCAN's noise points (-1) are a
    cluster of their own for NMI and ARI.
    """
    from sklearn.cluster import HDBSCAN, KMeans
    from sklearn.decomposition import PCA

    reduced = np.asarray(space, dtype=np.float32)
    dimensions = min(dimensions, len(reduced) - 1)  # PCA keeps at most N - 1 directions
    if reduced.shape[1] > dimensions:
        reduced = PCA(dimensions, random_state=seed).fit_transform(reduced)
    # k: the classes present among these images (a class name without images, or one whose every image
    # was unreadable, added a cluster: NMI 0.21 against 0.11 for the same 60 images), or 10 unlabelled
    k = len(np.unique(labels)) if labels is not None else 10
    found = {"kmeans": KMeans(k, n_init=3, random_state=seed).fit_predict(np.asarray(space, dtype=np.float32)),
             "hdbscan": HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(reduced)}
    rows, scores = [], {}
    for method, assigned in found.items():
        for cluster in np.unique(assigned):
            chosen = assigned == cluster
            row = {"method": method, "cluster": int(cluster), "size": int(chosen.sum())}
            if labels is not None:
                counts = np.bincount(labels[chosen])
                top = int(counts.argmax())
                row.update({"majority": names[top] if names else top, "purity": float(counts[top] / chosen.sum()),
                            "classes": int((counts > 0).sum())})
                row["mixed"] = bool(cluster != -1 and row["purity"] < purity)
            rows.append(row)
        if labels is None:
            continue
        codes = np.unique(assigned, return_inverse=True)[1].reshape(-1)  # noise (-1) a cluster of its own
        nmi, ari = _agreement(labels, codes)
        halves = [_agreement(*_recoded(labels[member], codes[member])) for member in members]
        for name, value, column in (("nmi", nmi, 0), ("ari", ari, 1)):
            resampled = np.array([h[column] for h in halves])
            # NMI lies in [0, 1]; ARI in [-1/2, 1] (its least value, for two clusterings of any size)
            scores[f"{name}_{method}"] = stats.from_halves(value, resampled, scale, len(labels), confidence,
                                                           bounds=_AGREEMENT_BOUNDS[name], held="the clusters")
    return pd.DataFrame(rows), found, scores


def held_out_rows(dataset_node, labels: np.ndarray | None, n: int, seed: int) -> np.ndarray | None:
    """(N,) True for the images a ``dataset.holdout`` split holds out, when the run maps both parts
    (``part=all``); None when there is no split to cross."""
    from latentmap import data

    holdout = float(dataset_node.holdout)
    if holdout <= 0 or dataset_node.part != "all":
        return None
    _, held = data.holdout_split(labels, n, holdout, seed)
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return mask


def run(settings, *, dataset, space: np.ndarray, scored_rows: np.ndarray, labels: np.ndarray | None,
        names: list[str] | None, evaluation, halves, neighbour_rows: np.ndarray, neighbour_distances: np.ndarray,
        held_out: np.ndarray | None, confidence: float, seed: int, distance: str, other=None,
        hashes: FileHashes | None = None) -> Audit:
    """The audit ``settings`` (``cfg.audit``) ask for, from what the run computed: ``space`` (N, D) the
    embedding space of every image, ``scored_rows`` the images the metrics scored (the evaluation's
    rows, and the half-samples'), every image's nearest neighbours (their distances in ``distance``,
    ``metrics.distance``), ``other`` (M, D) a second set in the same space with its dataset
    indices, for the leakage check, and ``hashes`` the dataset's content hashes, when begun before
    (:class:`FileHashes`)."""
    from latentmap import data

    found = Audit()
    n = len(space)
    indices = data.column(dataset, "index")
    wants_paths = settings.label_issues or settings.duplicates or other is not None
    read = hashes.paths if hashes is not None else None  # read once already, for the hashing process
    paths = (read if read is not None else file_paths(dataset)) if wants_paths else None  # where images are files
    scored_labels = None if labels is None else labels[scored_rows]
    column = np.full(n, -2, dtype=np.int64)  # per image over all N; -2: not scored
    if labels is not None and names and settings.per_class:
        found.tables["per_class"] = per_class(scored_labels, names, evaluation.per_image, evaluation.halved,
                                              halves.scale, confidence)
        if evaluation.probe_predicted is not None:
            # A class with no scored image (every one skipped, or a name in the data's class list
            # that no row has) is left out, as from per_class.csv and the plots.
            present = np.unique(scored_labels)
            found.confusion = confusion(scored_labels, evaluation.probe_predicted, len(names))[np.ix_(present, present)]
            found.confusion_names = [names[c] for c in present]
            found.tables["confusion"] = pd.DataFrame(found.confusion, index=found.confusion_names,
                                                     columns=found.confusion_names)
            pairs = most_confused(found.confusion, found.confusion_names)
            if pairs:
                found.notes.append(confused_note(pairs))
            correct = column.copy()
            correct[scored_rows] = evaluation.probe_predicted == scored_labels
            found.per_image["probe_correct"] = correct
    if labels is not None and names and settings.label_issues and evaluation.probe_probabilities is not None:
        table, quality = label_issues(scored_labels, evaluation.probe_probabilities, names,
                                      indices[scored_rows], str(settings.label_filter))
        table["row"] = scored_rows[table["row"].to_numpy()]  # a row of the whole dataset
        _with_paths(table, paths, {"row": "path"})
        found.tables["label_issues"] = table
        found.counts["n_label_issues"] = len(table)
        flagged, suggested = column.copy(), column.copy()
        flagged[scored_rows] = 0
        flagged[table["row"].to_numpy()] = 1
        suggested[scored_rows] = evaluation.probe_probabilities.argmax(axis=1)
        found.per_image.update({"label_issue": flagged, "suggested": suggested})
        found.notes.append(f"{len(table)} suspected label errors of {len(scored_rows)} images (cleanlab, "
                           f"{settings.label_filter}); tables/label_issues.csv ranks them")
    elif labels is not None and names and settings.label_issues:  # it was skipped without a word
        found.notes.append("label issues: not looked for, they need the linear probe's out-of-fold probabilities "
                           "(metrics.probe=false)")
    threshold = near_threshold(neighbour_distances, float(settings.duplicate_ratio))
    if settings.duplicates:
        table = duplicates(hashes.result() if hashes is not None else content_hashes(dataset), indices, neighbour_rows,
                           neighbour_distances, threshold, held_out)
        _with_paths(table, paths, {"row_a": "path_a", "row_b": "path_b"})
        found.tables["duplicates"] = table
        found.counts.update({"n_duplicates_exact": int((table["kind"] == "exact").sum()),
                             "n_duplicates_near": int((table["kind"] == "near").sum())})
        if held_out is not None:
            found.counts["n_duplicates_across_split"] = int(table["crosses_split"].sum())
        marked = np.zeros(n, dtype=np.int64)
        marked[np.concatenate([table["row_a"].to_numpy(), table["row_b"].to_numpy()]).astype(np.int64)] = 1
        found.per_image["duplicate"] = marked
        found.notes.append(f"{found.counts['n_duplicates_exact']} exact and {found.counts['n_duplicates_near']} near "
                           f"duplicate pairs (distance <= {threshold:.4g}: {settings.duplicate_ratio} x the median "
                           "nearest-neighbour distance)")
    if other is not None:
        other_space, other_indices, *other_paths = other  # (M, D) space, dataset indices, and its image files
        table = leakage(space, other_space, other_indices, indices, threshold, distance)
        if other_paths and other_paths[0] is not None:
            by_index = dict(zip(other_indices.tolist(), other_paths[0]))
            table["path_other"] = [by_index[int(i)] for i in table["index_other"]]
        if paths is not None:
            here = dict(zip(indices.tolist(), paths))
            table["path"] = [here[int(i)] for i in table["index"]]
        found.tables["leakage"] = table
        found.counts["n_leaked"] = len(table)
        found.notes.append(f"{len(table)} of the {len(other_space)} images of audit.against lie within the duplicate "
                           "distance of this run's images (tables/leakage.csv)")
    if settings.clusters and len(scored_rows) >= 10:
        size = settings.min_cluster_size or max(5, len(scored_rows) // 100)
        table, assigned, scores = clusters(space[scored_rows], scored_labels, names, int(size),
                                           int(settings.cluster_dimensions), seed, halves.members, halves.scale,
                                           confidence, float(settings.mixed_purity))
        found.tables["clusters"] = table
        found.counts["n_clusters_hdbscan"] = int((np.unique(assigned["hdbscan"]) >= 0).sum())
        if not found.counts["n_clusters_hdbscan"]:  # one "cluster" of noise: its NMI and ARI are 0 by
            # construction, [0, 0] on every half, which would read as a measured disagreement
            scores = {name: value for name, value in scores.items() if not name.endswith("_hdbscan")}
            found.notes.append(f"HDBSCAN found no cluster of at least {int(size)} images: every image is noise, so "
                               f"nmi_hdbscan and ari_hdbscan are not reported; lower audit.min_cluster_size "
                               f"(now {int(size)})")
        found.scores.update(scores)
        for method, values in assigned.items():
            full = column.copy()
            full[scored_rows] = values
            found.per_image[f"cluster_{method}"] = full
        if "mixed" in table:
            mixed = table[table["mixed"].fillna(False).astype(bool)]
            if len(mixed):
                found.notes.append("clusters that mix classes: " + "; ".join(
                    f"{r.method} {r.cluster} ({r.size} images, {r.purity:.0%} {r.majority})"
                    for r in mixed.head(8).itertuples()))
    return found


# Below this many images a class's paired difference is tested exactly, on its images whose score
# changed (sign_test): where two models are equally good, its half-sample test called 14.0% of classes
# of 6 images different at p < 0.05 (k = 10 neighbours against 3 of the class in a half-sample), the
# exact test 0.1%; at 15, 30 and 100 images the half-sample test rejects 1.8%, 1.5% and 1.5%, and keeps
# its intervals (scripts/bench.py --only per-class --replications 200: 2,000 tests a size).
EXACT_BELOW = 20


def sign_test(a: np.ndarray, b: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
    """One class's paired difference of two 0/1 per-image scores: (difference, lo, hi, p). The
    p-value is exact: of the m images whose score changed, u went from 0 to 1; under no difference
    each change is as likely either way, so u ~ Binomial(m, 1/2) (McNemar's exact test). The interval
    is Newcombe's hybrid score interval for paired proportions with continuity correction (his
    method 11, 1998), which does not take m as known: the Clopper-Pearson interval of u/m scaled by
    m/n did, and covered 56-74% at "95%" on classes of 6 to 19 images; this one's exact coverage is
    at least 0.944 on classes of 4 to 19 images (tests/test_audit.py enumerates it). No image changed:
    0, its interval, p = 1."""
    from scipy.stats import binomtest

    up, down = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    both = int(((a == 1) & (b == 1)).sum())
    lo, hi = paired_proportions_interval(both, up, down, len(a) - both - up - down, confidence)
    p_value = float(binomtest(up, up + down, 0.5).pvalue) if up + down else 1.0
    return (up - down) / len(a), lo, hi, p_value


def _wilson_corrected(x: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval for x of n with continuity correction (Newcombe 1998, method 4)."""
    p, scale = x / n, 2 * (n + z * z)
    lo = 0.0 if x == 0 else max(0.0, (2 * n * p + z * z - 1
                                      - z * np.sqrt(z * z - 2 - 1 / n + 4 * p * (n * (1 - p) + 1))) / scale)
    hi = 1.0 if x == n else min(1.0, (2 * n * p + z * z + 1
                                      + z * np.sqrt(z * z + 2 - 1 / n + 4 * p * (n * (1 - p) - 1))) / scale)
    return float(lo), float(hi)


def paired_proportions_interval(both: int, first: int, second: int, neither: int,
                                confidence: float) -> tuple[float, float]:
    """The interval of p1 - p2 for paired 0/1 outcomes (``both`` 1, only the ``first`` 1, only the
    ``second``, ``neither``): Newcombe's hybrid score interval with continuity correction (method 11),
    from each proportion's corrected Wilson interval and the pairs' correlation."""
    from scipy.stats import norm

    n = both + first + second + neither
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p1, p2 = (both + first) / n, (both + second) / n
    l1, u1 = _wilson_corrected(both + first, n, z)
    l2, u2 = _wilson_corrected(both + second, n, z)
    spread = (both + first) * (second + neither) * (both + second) * (first + neither)
    cross = both * neither - first * second
    cross = max(cross - n / 2, 0) if cross > 0 else min(cross + n / 2, 0)  # the continuity correction
    phi = cross / np.sqrt(spread) if spread > 0 else 0.0
    difference = p1 - p2
    below = np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    above = np.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return float(difference - below), float(difference + above)


def per_class_differences(labels: np.ndarray, names: list[str], a, b, scale: float, confidence: float,
                          scores: tuple[str, ...] = ("knn_acc_hd", "probe_acc")) -> pd.DataFrame:
    """Each class's paired difference A - B of the per-image ``scores`` of two evaluations on the same
    images and half-samples (fine-tuned against base): value, interval and p-value from
    :func:`latentmap.stats.paired_halves` on the class's members of each half-sample or, for a class
    of fewer than :data:`EXACT_BELOW` images, from :func:`sign_test` on its images (exact p-value,
    Newcombe's interval; the ``test`` column says which), and Holm's adjustment over the whole table
    (one family: which classes a change helped or hurt)."""
    rows = []
    for score in scores:
        if score not in a.per_image or score not in b.per_image:
            continue
        for c, name in enumerate(names):
            in_class = labels == c
            n = int(in_class.sum())
            if n == 0:
                continue
            mine_a, mine_b = np.asarray(a.per_image[score])[in_class], np.asarray(b.per_image[score])[in_class]
            if n < EXACT_BELOW and np.isin(mine_a, (0, 1)).all() and np.isin(mine_b, (0, 1)).all():
                difference, lo, hi, p_value = sign_test(mine_a, mine_b, confidence)
                rows.append({"class": name, "metric": score, "n": n, "a": float(mine_a.mean()),
                             "b": float(mine_b.mean()), "difference": difference, "lo": lo, "hi": hi,
                             "p_value": p_value, "test": "exact sign test"})
                continue
            halves_a = np.array([_class_rate(values, labels[members], c) for members, values in a.halved[score]])
            halves_b = np.array([_class_rate(values, labels[members], c) for members, values in b.halved[score]])
            found = stats.paired_halves(_class_rate(a.per_image[score], labels, c),
                                        _class_rate(b.per_image[score], labels, c), halves_a, halves_b, scale, n,
                                        confidence)
            rows.append({"class": name, "metric": score, "n": n, "a": found.a, "b": found.b,
                         "difference": found.difference, "lo": found.lo, "hi": found.hi, "p_value": found.p_value,
                         "test": "half-samples"})
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = stats.adjust(table["p_value"].to_numpy(), "holm")
    return table
