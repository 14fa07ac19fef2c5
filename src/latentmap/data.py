"""Every image source becomes one ``datasets.Dataset`` with the columns

* ``image``: a ``datasets.Image`` feature (decoded lazily, one batch at a time),
* ``label``: a ``ClassLabel`` (absent for an unlabelled set, such as a flat folder of images),
* ``index``: each row's position in the source as loaded, before ``limit``.

Sources are selected by ``_target_`` from ``conf/dataset``; constructors store arguments and
``load(seed)`` does the work. ``limit`` keeps the first N rows of a seeded, class-balanced
shuffle (a round-robin over the classes, each class shuffled with the seed).
"""

from __future__ import annotations

import abc
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentmap.errors import ConfigError, is_network_error, require_int

log = logging.getLogger(__name__)


def _image_features(labelled_names: list[str] | None):
    from datasets import ClassLabel, Features, Image, Value

    columns = {"image": Image(), "index": Value("int64")}
    if labelled_names is not None:
        columns["label"] = ClassLabel(names=labelled_names)
    return Features(columns)


def class_names(dataset) -> list[str] | None:
    """The class names of a labelled dataset, or None for an unlabelled one."""
    feature = dataset.features.get("label")
    return list(feature.names) if feature is not None else None


def labels_of(dataset) -> np.ndarray | None:
    """(N,) int64 labels, or None for an unlabelled dataset."""
    if "label" not in dataset.column_names:
        return None
    return np.asarray(dataset["label"], dtype=np.int64)


def balanced_order(labels: np.ndarray | None, n_rows: int, seed: int) -> np.ndarray:
    """A seeded shuffle of ``range(n_rows)`` whose every prefix keeps the class balance.

    Each class is shuffled on its own, then the classes are interleaved round-robin, so the first
    N rows hold (nearly) N / n_classes images of each class.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        return rng.permutation(n_rows)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    # Rank of every row inside its class, then order by (rank, class): a round-robin.
    ranks = np.concatenate([np.arange(len(rows)) for rows in per_class])
    rows = np.concatenate(per_class)
    class_ids = np.concatenate([np.full(len(r), i) for i, r in enumerate(per_class)])
    order = np.lexsort((class_ids, ranks))
    return rows[order]


PARTS = ("all", "train", "holdout")


def apply_limit(dataset, limit: int | None, seed: int, holdout: float = 0.0, part: str = "all"):
    """Keep ``limit`` rows of a seeded class-balanced shuffle, then one part of a holdout split.

    ``holdout`` is the fraction of rows (stratified by class, seeded) set aside from fine-tuning;
    ``part`` picks ``all`` rows, the ``train`` part or the ``holdout`` part. Rows stay in source
    order, so the same seed always gives the same, disjoint parts.
    """
    if limit is not None:
        require_int("dataset.limit", limit, 1, "dataset.limit=500, or null for all rows")
        if limit < len(dataset):
            chosen = balanced_order(labels_of(dataset), len(dataset), seed)[:limit]
            dataset = dataset.select(np.sort(chosen))
    if part not in PARTS:
        raise ConfigError(f"dataset.part={part!r} is not a part: choose one of {', '.join(PARTS)}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ConfigError(f"dataset.holdout={holdout!r} must be a fraction in [0, 1), e.g. 0.3")
    if part == "all":
        return dataset
    if holdout == 0:
        raise ConfigError(f"dataset.part={part} needs a holdout fraction: set e.g. dataset.holdout=0.3")
    train_rows, holdout_rows = holdout_split(labels_of(dataset), len(dataset), holdout, seed)
    return dataset.select(train_rows if part == "train" else holdout_rows)


def holdout_split(labels: np.ndarray | None, n_rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train rows, held-out rows): a seeded split, stratified by class when labelled."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(n_rows)
    try:
        train, held = train_test_split(rows, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as error:
        raise ConfigError(f"dataset.holdout={fraction} cannot split {n_rows} images by class: {error}") from error
    return np.sort(train), np.sort(held)


@dataclass(kw_only=True)
class Source(abc.ABC):
    """What every source shares: ``limit``, ``holdout``, ``part`` and ``on_error``.

    ``load(seed)`` reads every row (``read``, one per source) and then keeps ``limit`` rows and one
    ``part`` of the holdout split (:func:`apply_limit`). ``on_error`` is read by the runner, which
    skips or refuses unreadable images at extraction.
    """

    limit: int | None = None
    holdout: float = 0.0
    part: str = "all"
    on_error: str = "skip"

    def load(self, seed: int):
        """The dataset: ``image``, ``index`` and (when labelled) ``label``, limited and split."""
        return apply_limit(self.read(), self.limit, seed, self.holdout, self.part)

    @abc.abstractmethod
    def read(self):
        """Every row of the source, as a ``datasets.Dataset`` with ``image`` and ``index``
        (the row's position in the source) and, when labelled, a ``ClassLabel`` ``label``."""


@dataclass
class DigitsSource(Source):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), as 8x8 greyscale images."""

    def read(self):
        from datasets import Dataset
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
        dataset = Dataset.from_dict(
            {
                "image": [Image.fromarray(image) for image in pixels],
                "index": np.arange(len(pixels)),
                "label": digits.target.astype(np.int64),
            },
            features=_image_features([str(d) for d in range(10)]),
        )
        return dataset


@dataclass
class HubSource(Source):
    """Any Hugging Face hub image dataset (``datasets.load_dataset``), any split slice."""

    name: str
    split: str = "train"
    image_column: str = "image"
    label_column: str | None = "label"
    config_name: str | None = None
    revision: str | None = None

    def read(self):
        from datasets import ClassLabel, Image, load_dataset

        try:
            dataset = load_dataset(
                self.name, self.config_name, split=self.split, revision=self.revision
            )
        except Exception as error:  # datasets raises many types; all are a bad name or no network
            if is_network_error(error):
                raise ConfigError(
                    f"dataset.name={self.name!r} could not be downloaded: the Hugging Face hub is "
                    "unreachable. Run once with network access, or use dataset=imagefolder "
                    "dataset.path=<dir> for local images"
                ) from error
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                f"dataset.name={self.name!r} split={self.split!r} could not be loaded: {first_line}"
            ) from error
        for key, column in (("image_column", self.image_column), ("label_column", self.label_column)):
            if column is not None and column not in dataset.column_names:
                raise ConfigError(
                    f"dataset.{key}={column!r} is not a column of {self.name}: "
                    f"choose one of {', '.join(dataset.column_names)}"
                )
        keep = [c for c in (self.image_column, self.label_column) if c is not None]
        dataset = dataset.select_columns(keep).rename_column(self.image_column, "image")
        if not isinstance(dataset.features["image"], Image):
            dataset = dataset.cast_column("image", Image())
        if self.label_column is not None:
            dataset = dataset.rename_column(self.label_column, "label")
            if not isinstance(dataset.features["label"], ClassLabel):
                dataset = dataset.class_encode_column("label")
        return dataset.add_column("index", np.arange(len(dataset), dtype=np.int64))


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


@dataclass
class ImageFolderSource(Source):
    """A local folder: ``<path>/<class>/<image>`` (labels from sorted sub-folder names), or a
    flat folder of images (an unlabelled set). Files are listed in sorted order."""

    path: str

    def read(self):
        from datasets import Dataset

        root = Path(self.path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"dataset.path={self.path!r} is not a directory ({root.resolve()})")
        extensions = _image_extensions()

        def images_in(folder: Path, recursive: bool) -> list[str]:
            found = folder.rglob("*") if recursive else folder.iterdir()
            return sorted(str(p) for p in found if p.is_file() and p.suffix.lower() in extensions)

        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        class_files = {d.name: images_in(d, recursive=True) for d in class_dirs}
        class_files = {name: files for name, files in class_files.items() if files}
        if class_files:
            names = sorted(class_files)
            loose = images_in(root, recursive=False)
            if loose:
                log.warning("ignoring %d images directly in %s: it has class sub-folders", len(loose), root)
            paths = [p for name in names for p in class_files[name]]
            labels = [i for i, name in enumerate(names) for _ in class_files[name]]
            columns = {"image": paths, "index": np.arange(len(paths)), "label": labels}
            features = _image_features(names)
        else:
            paths = images_in(root, recursive=False)
            if not paths:
                raise ConfigError(
                    f"dataset.path={self.path!r} holds no images ({root.resolve()}): expected "
                    f"<class>/<image> sub-folders or image files ({', '.join(sorted(extensions)[:6])}, ...)"
                )
            log.info("%s has no class sub-folders: an unlabelled set of %d images", root, len(paths))
            columns = {"image": paths, "index": np.arange(len(paths))}
            features = _image_features(None)
        return Dataset.from_dict(columns, features=features)


def undecoded(dataset):
    """The same rows with ``image`` as ``{"bytes", "path"}`` records (no decoding)."""
    from datasets import Image

    return dataset.cast_column("image", Image(decode=False))


def decode_rgb(record: dict[str, Any], index: int):
    """Decode one undecoded image record into an RGB PIL image.

    Raises:
        ConfigError: naming the file (or the row) when the image cannot be read.
    """
    from PIL import Image, UnidentifiedImageError

    where = record.get("path") or f"row {index}"
    try:
        source = io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"]
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, TypeError) as error:
        raise ConfigError(
            f"unreadable image {where}: {type(error).__name__}: {error}. Remove or replace the file, "
            "or set dataset.on_error=skip"
        ) from error


ON_ERROR = ("skip", "raise")


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(f"dataset.on_error={on_error!r}: use skip (drop unreadable images with a warning) or raise")


def fingerprint(dataset) -> str:
    """sha256 of the dataset's content: image bytes (or path, size and mtime), index and label."""
    digest = hashlib.sha256()
    raw = undecoded(dataset)
    labels = labels_of(dataset)
    digest.update(repr(class_names(dataset)).encode())
    for start in range(0, len(raw), 1024):
        batch = raw[start : start + 1024]
        for record, index in zip(batch["image"], batch["index"]):
            if record.get("bytes"):
                digest.update(hashlib.sha256(record["bytes"]).digest())
            else:
                path = Path(record["path"])
                stat = path.stat() if path.exists() else None
                digest.update(f"{path.resolve()}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode())
            digest.update(str(index).encode())
    if labels is not None:
        digest.update(labels.tobytes())
    return digest.hexdigest()
