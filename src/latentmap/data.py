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
import contextlib
import errno
import functools
import hashlib
import io
import itertools
import logging
import os
import re
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISLNK
from typing import Any

import numpy as np

from latentmap import hub, settings
from latentmap.errors import ConfigError, UnreadableImage, is_network_error

log = logging.getLogger(__name__)

# PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS, about 9,459 x 9,459), a fact of PIL's, not a
# setting: cache keys name dataset.max_image_pixels only when it differs from it (so entries made before
# the setting existed stay valid), and runs logged before then were read under it.
PIL_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


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


def column(dataset, name: str) -> np.ndarray:
    """(N,) int64 values of a dataset's integer column (``index``, ``label``), in its row order (a
    selection's included), through Arrow: ``np.asarray(dataset[name])`` goes through one Python
    object a row (docs/performance.md). A column with missing values is refused in one line."""
    values = dataset.with_format("arrow")[name]
    if values.null_count:
        raise ConfigError(f"dataset column {name!r} has {values.null_count} missing values of {len(values)}: "
                          "drop those rows (or pick a dataset whose every image has one)")
    return np.asarray(values, dtype=np.int64).copy()  # writable, like the arrays it replaced


def labels_of(dataset) -> np.ndarray | None:
    """(N,) int64 labels, or None for an unlabelled dataset."""
    if "label" not in dataset.column_names:
        return None
    return column(dataset, "label")


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




def apply_limit(dataset, limit: int | None, seed: int, holdout: float = 0.0, part: str = "all"):
    """Keep ``limit`` rows of a seeded class-balanced shuffle, then one part of a holdout split.

    ``holdout`` is the fraction of rows (stratified by class, seeded) set aside from fine-tuning;
    ``part`` picks ``all`` rows, the ``train`` part or the ``holdout`` part. Rows stay in source
    order, so the same seed always gives the same, disjoint parts.
    """
    if limit is not None:
        settings.require("dataset.limit", limit)
        if limit < len(dataset):
            chosen = balanced_order(labels_of(dataset), len(dataset), seed)[:limit]
            dataset = dataset.select(np.sort(chosen))
        elif limit > len(dataset):
            log.info("dataset.limit=%d is more than the %d images there are: all %d are used", limit, len(dataset),
                     len(dataset))
    settings.require("dataset.part", part)
    settings.require("dataset.holdout", holdout)
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


def _default(key: str):
    """A Source field whose default is the config file's (``conf/common/dataset.yaml``)."""
    return field(default_factory=lambda: settings.defaults("dataset")[key])


@dataclass(kw_only=True)
class Source(abc.ABC):
    """What every source shares: ``limit``, ``holdout``, ``part`` and ``on_error``.

    ``load(seed)`` reads every row (``read``, one per source) and then keeps ``limit`` rows and one
    ``part`` of the holdout split (:func:`apply_limit`). ``on_error`` is read by the runner, which
    skips or refuses unreadable images at extraction.
    """

    # The defaults are conf/common/dataset.yaml's, where every dataset option gets them (see there).
    limit: int | None = _default("limit")
    holdout: float = _default("holdout")
    part: str = _default("part")
    on_error: str = _default("on_error")
    max_image_pixels: int | None = _default("max_image_pixels")
    intensity_range: Any = _default("intensity_range")  # [low, high] or None, read by the decoder (intensity_of)
    # Read by the runner, not here: the dataset, its fingerprint and the cache key stay the whole set's.
    shard: str | None = _default("shard")

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

        local = Path(self.name).expanduser()
        if not local.exists():
            hub.use_cache_if_offline(f"dataset.name={self.name!r}")
        try:
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                dataset = _saved_to_disk(local, self.split)
            elif local.is_file():  # one data file: its format's builder reads it as split "train"
                builder, options = _builder_of(local, self.name)
                dataset = load_dataset(builder, data_files=str(local), split=self.split, **options)
            else:
                if local.is_dir():  # a folder of images or data files, read by datasets' own scan
                    _refuse_outputs_inside(local, self.name)
                dataset = load_dataset(
                    str(local) if local.exists() else self.name, self.config_name, split=self.split,
                    revision=self.revision
                )
        except ConfigError:
            raise
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
                others = [name for name in dataset.column_names if key == "image_column" or name != self.image_column]
                choose = f"choose one of {', '.join(others)}" if others else ""
                if key == "label_column":  # the image column is no label; without labels the set is unlabelled
                    choose += (" or " if choose else "") + "set dataset.label_column=null for unlabelled images"
                raise ConfigError(f"dataset.{key}={column!r} is not a column of {self.name}: {choose}")
        if self.image_column == self.label_column:
            raise ConfigError(
                f"dataset.image_column and dataset.label_column are both {self.image_column!r}: "
                "name the label column, or set dataset.label_column=null for unlabelled images"
            )
        if len(dataset) == 0:
            raise ConfigError(f"dataset.split={self.split!r} selects no rows of {self.name}: choose a split or "
                              "slice that holds images")
        keep = [c for c in (self.image_column, self.label_column) if c is not None]
        # One rename for both columns, and none where a column already has its name (datasets
        # refuses to rename a column to itself: the usual "image" and "label" columns failed).
        names = {self.image_column: "image", self.label_column: "label"}
        dataset = dataset.select_columns(keep)
        dataset = dataset.rename_columns({old: new for old, new in names.items() if old is not None and old != new})
        if not isinstance(dataset.features["image"], Image):
            _check_image_paths(dataset, self.image_column, self.name, local)
            try:
                dataset = dataset.cast_column("image", Image())
            except Exception as error:  # pyarrow's and PIL's many errors: a column of something else
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ConfigError(
                    f"dataset.image_column={self.image_column!r} of {self.name} holds "
                    f"{_feature_text(dataset.features['image'])}, which datasets cannot read as images ({reason}): "
                    "it takes PIL images, encoded image bytes, paths of image files, or uint8 arrays of "
                    "(height, width) or (height, width, 3); name the column that holds the images"
                ) from error
        if self.label_column is not None:
            dataset = _without_missing_labels(dataset, self.label_column, self.name)
        if "label" in dataset.column_names and not isinstance(dataset.features["label"], ClassLabel):
            dataset = _labels_as_classes(dataset, self.label_column, self.name)
        if "label" in dataset.column_names:
            _say_look_alikes(f"dataset.label_column={self.label_column!r} of {self.name}",
                             dataset.features["label"].names, "labels")
        return dataset.add_column("index", np.arange(len(dataset), dtype=np.int64))


# A data file's suffix -> the datasets builder that reads it (dataset=hf dataset.name=<file>).
_DATA_FILE_BUILDERS = {".parquet": ("parquet", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}),
                       ".json": ("json", {}), ".jsonl": ("json", {}), ".arrow": ("arrow", {})}


def _builder_of(file: Path, name: str) -> tuple[str, dict[str, str]]:
    """The ``datasets`` builder for one local data file and its options (a .tsv's tab), or a
    ConfigError naming what is read."""
    builder = _DATA_FILE_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise ConfigError(f"dataset.name={name!r} is a file datasets does not read as a table (it reads "
                          f"{', '.join(sorted(_DATA_FILE_BUILDERS))} files): for images use dataset=imagefolder "
                          f"dataset.path=<their folder>, or name the folder that holds the data files")
    return builder


def _refuse_outputs_inside(folder: Path, name: str) -> None:
    """A local folder read by ``datasets`` takes every image below it: one that holds a latentmap
    command's output_dir (its :data:`OUTPUT_MARK`) would have that run's plots read as images."""
    for top, folders, files in os.walk(folder):
        if OUTPUT_MARK in files:
            raise ConfigError(f"dataset.name={name!r} holds latentmap's output folder {top} (an output_dir), whose "
                              "plots datasets would read as images: keep output_dir outside the dataset's folder "
                              f"(e.g. output_dir={folder.resolve().parent / 'outputs'}) and move that folder out")
        folders[:] = [f for f in folders if not f.startswith((".", "__"))]  # datasets passes over these too


def _feature_text(feature) -> str:
    """A column's datasets feature in a few words (``int64 values``, ``lists of Image``)."""
    from datasets import Value

    if isinstance(feature, Value):
        return f"{feature.dtype} values"
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return f"lists of {_feature_text(inner) if isinstance(inner, Value) else type(inner).__name__}"
    return f"{type(feature).__name__} values"


def _check_image_paths(dataset, column: str, name: str, local: Path) -> None:
    """A text column cast to images is read as file paths (relative ones from the working folder):
    where none of its first values is a file or a URL, it is text, or paths from another folder,
    said in one line before every image fails to decode."""
    from datasets import Value

    feature = dataset.features["image"]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        return
    first = [v for v in dataset.select_columns("image").with_format("arrow")[:8]["image"].to_pylist() if v]

    def is_file(path: str) -> bool:  # a caption, or an image as base64 text, may be too long for a file name
        try:
            return os.path.isfile(os.path.expanduser(path))
        except (OSError, ValueError):
            return False

    if not first or any("://" in v or is_file(v) for v in first):
        return
    beside = local if local.is_dir() else local.parent
    where = (f"; {first[0][:60]!r} is a file in {beside.resolve()}: write the paths from the folder the command "
             f"runs in ({Path.cwd()}), or absolute" if is_file(str(beside / first[0])) else "")
    raise ConfigError(f"dataset.image_column={column!r} of {name} holds text that names no image file (e.g. "
                      f"{first[0][:60]!r}; relative paths are read from {Path.cwd()}){where}: name the column that "
                      "holds the images or their paths")


def _labels_as_classes(dataset, column: str, name: str):
    """``dataset`` whose plain ``label`` column is a ClassLabel: numbers (and whole numbers written as
    text) as classes in numeric order (``2`` before ``10``, each number's class named by it), other
    text in sorted order (datasets' ``class_encode_column``). A row without a label, a NaN or an empty
    name is refused, as is a list of labels (one image, several classes)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import ClassLabel

    values = dataset.with_format("arrow")["label"]
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_struct(values.type):
        raise ConfigError(f"dataset.label_column={column!r} of {name} holds {_feature_text(dataset.features['label'])}"
                          ": latentmap maps one class an image (no multi-label sets); name a column of one label a "
                          "row, or set dataset.label_column=null to map them unlabelled")
    numeric = pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
    text = pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
    missing = values.null_count
    if pa.types.is_floating(values.type):
        missing += pc.sum(pc.is_nan(values)).as_py() or 0
    if text:
        missing += pc.sum(pc.equal(pc.utf8_trim_whitespace(values), "")).as_py() or 0
    if missing:
        raise ConfigError(f"dataset.label_column={column!r} of {name} has no label (empty, NaN or None) on {missing:,} "
                          f"of {len(values):,} rows: choose a split where every row is labelled, or set "
                          "dataset.label_column=null to map them unlabelled")
    unique = pc.unique(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)
    if numeric:
        numbers = np.sort(unique.to_numpy())
        ordered = pa.array(numbers, type=values.type)
        names = [np.format_float_positional(v, trim="-") if pa.types.is_floating(values.type) else str(v)
                 for v in numbers]
    elif text and all(re.fullmatch(r"[+-]?\d{1,18}", name) for name in unique.to_pylist()):  # "2", "10"
        names = sorted(unique.to_pylist(), key=lambda name: (int(name), name))
        ordered = pa.array(names, type=values.type)
    else:
        return dataset.class_encode_column("label")
    classes = pc.index_in(values, value_set=ordered)
    return dataset.remove_columns("label").add_column("label", np.asarray(classes, dtype=np.int64),
                                                      feature=ClassLabel(names=names))


def _without_missing_labels(dataset, column: str, name: str):
    """``dataset`` whose integer labels of -1 (the hub's "no label", as in test splits) are either
    all of them, giving an unlabelled set, or none; a mix is one line (-1 became a class of its own,
    or broke the class counts)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.with_format("arrow")["label"]  # in the dataset's row order, a selection's included
    if not pa.types.is_integer(values.type):
        return dataset
    missing = pc.sum(pc.equal(values, -1)).as_py() or 0
    if missing == 0:
        return dataset
    if missing == len(dataset):
        log.info("dataset.label_column=%r of %s is -1 (no label) on every row: an unlabelled set", column, name)
        return dataset.remove_columns("label")
    raise ConfigError(
        f"dataset.label_column={column!r} of {name} has no label (-1) on {missing:,} of {len(dataset):,} rows: "
        "choose a split where every row is labelled, or set dataset.label_column=null to map them unlabelled")


def _saved_to_disk(folder: Path, split: str):
    """A dataset written by ``save_to_disk`` (which ``load_dataset`` refuses): a ``DatasetDict``'s
    split, or a single ``Dataset`` (whose split name is not checked), either with the split's
    slice (``train[:100]``, ``train[10%:20%]``, ``train+test``) applied."""
    from datasets import DatasetDict, ReadInstruction, concatenate_datasets, load_from_disk

    saved = load_from_disk(str(folder))
    if not isinstance(saved, DatasetDict):
        name = re.match(r"\s*([\w-]+)", split)
        saved = DatasetDict({name[1] if name else "train": saved})
    try:
        parts = ReadInstruction.from_spec(split).to_absolute({name: len(part) for name, part in saved.items()})
    except (ValueError, KeyError) as error:
        raise ConfigError(
            f"dataset.split={split!r} does not name a split of the dataset saved in {folder}: "
            f"use one of {', '.join(saved)}, with a slice if you like (train[:100])"
        ) from error
    return concatenate_datasets([saved[part.splitname].select(range(part.from_, part.to)) for part in parts])


# Formats whose opener Pillow registers even where it was built without the library that decodes them.
_DECODERS = {"AVIF": "avif", "JPEG2000": "jpg_2000", "WEBP": "webp"}


def _unread_suffixes(root: Path, extensions: set[str]) -> str:
    """What a folder without images holds instead, for the refusal: its files' commonest suffixes that
    are not images PIL can read here (``; it holds 12 .heic, 3 .pdf files, which PIL cannot read
    here``), or nothing."""
    from collections import Counter

    try:
        found = Counter(Path(entry.name).suffix.lower() or "(no suffix)" for entry in os.scandir(root)
                        if entry.is_file() and not entry.name.startswith("."))
    except OSError:
        return ""
    unread = [(suffix, n) for suffix, n in found.most_common() if suffix not in extensions][:3]
    if not unread:
        return ""
    return "; it holds " + ", ".join(f"{n} {suffix}" for suffix, n in unread) + " files, which PIL cannot read here"


def _image_extensions() -> set[str]:
    """The suffixes of the formats PIL can read here: its registered ones, less those of the formats
    it only writes (``.pdf``, ``.palm``) or only identifies (MPEG video), of its stub formats that
    have no reader installed (HDF5's ``.h5``, GRIB, BUFR, WMF off Windows), and of EPS without
    Ghostscript. A ``notes.pdf``, ``features.h5`` or ``clip.mpg`` beside the images is not an image
    latentmap can read, and was listed as one, then reported as unreadable."""
    from PIL import EpsImagePlugin, Image, ImageFile, features

    Image.init()

    def readable(format_: str) -> bool:
        opener = Image.OPEN.get(format_)
        if opener is None:  # written only; MPO (a camera's multi-picture JPEG) opens through JPEG's reader
            return format_ == "MPO"
        if format_ == "MPEG":  # its header is read, its pixels never ("cannot load this image")
            return False
        if format_ == "EPS":
            return bool(EpsImagePlugin.has_ghostscript())
        if format_ in _DECODERS and not features.check(_DECODERS[format_]):  # a Pillow built without the library
            return False
        factory = opener[0]
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):  # a handler on the
            plugin = sys.modules.get(factory.__module__)  # class (Pillow 12 on) or its module (before)
            return (getattr(factory, "_handler", None) or getattr(plugin, "_handler", None)) is not None
        return True

    return {ext.lower() for ext, format_ in Image.registered_extensions().items() if readable(format_)}


@dataclass
class ImageFolderSource(Source):
    """A local folder: ``<path>/<class>/<image>`` (labels from sorted sub-folder names), or a
    flat folder of images (an unlabelled set). Files are listed in sorted order."""

    path: str

    def read(self):
        import pyarrow as pa
        from datasets import Dataset

        root = Path(self.path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"dataset.path={self.path!r} is not a directory ({root.resolve()})")
        if (root / OUTPUT_MARK).is_file():  # output_dir=<the image folder>: its plots became a class
            ours = sorted(p.name for p in root.iterdir() if p.name in OUTPUT_ENTRIES) or ["its outputs"]
            raise ConfigError(
                f"dataset.path={self.path!r} holds an earlier command's outputs ({root / OUTPUT_MARK} marks it as "
                f"an output_dir): their plots would be read as images. Move {', '.join(ours)} out of it and delete "
                f"{OUTPUT_MARK}, and keep output_dir outside it (e.g. output_dir={root.resolve().parent / 'outputs'})")
        extensions = _image_extensions()

        def images_in(folder: Path, recursive: bool) -> list[str]:
            return image_files(str(folder), extensions, recursive)

        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                            and p.name not in (MACOS_FOLDER, NAS_FOLDER))
        if unnamed := [d for d in class_dirs if not _utf8(d.name)]:  # no class name can hold it
            log.warning("left out %d folder%s whose name is not valid UTF-8: %s (rename to read them)", len(unnamed),
                        "s" if len(unnamed) > 1 else "", ", ".join(ascii(str(d)) for d in unnamed[:3]))
            class_dirs = [d for d in class_dirs if d not in unnamed]
        own = [d for d in class_dirs if (d / OUTPUT_MARK).is_file()]
        if own:  # output_dir inside the images: its plots were read back as a class of their own
            log.info("passing over %s in %s: latentmap's output folder (output_dir), not images",
                     ", ".join(d.name for d in own), root)
            for folder in own:  # output_dir=<images>/<a class>: the class's own images go unread with it
                if mine := images_in(folder, recursive=False):
                    log.warning("%s holds %d images of its own, not read: it is also a command's output_dir (%s "
                                "marks it); keep output_dir outside the image folder's classes", folder, len(mine),
                                OUTPUT_MARK)
            class_dirs = [d for d in class_dirs if d not in own]
        _refuse_linked_classes(root, class_dirs)
        class_files = {d.name: images_in(d, recursive=True) for d in class_dirs}
        empty = sorted(name for name, files in class_files.items() if not files)
        class_files = {name: files for name, files in class_files.items() if files}
        if empty and class_files:
            log.warning("%d folder%s in %s hold%s no images and %s no class: %s", len(empty),
                        "s" if len(empty) > 1 else "", root, "" if len(empty) > 1 else "s",
                        "are" if len(empty) > 1 else "is", ", ".join(empty[:8]) + (", ..." if len(empty) > 8 else ""))
        if class_files:
            names = sorted(class_files)
            _say_look_alikes(root, names)
            _check_nesting(self.path, root, class_files)
            loose = images_in(root, recursive=False)
            if loose:
                log.warning("ignoring %d images directly in %s: it has class sub-folders", len(loose), root)
            paths = [p for name in names for p in class_files[name]]
            labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(class_files[name]) for name in names])
            columns = {"image": paths, "index": np.arange(len(paths)), "label": labels}
            features = _image_features(names)
        else:
            paths = images_in(root, recursive=False)
            if not paths:
                raise ConfigError(
                    f"dataset.path={self.path!r} holds no images ({root.resolve()}): expected "
                    f"<class>/<image> sub-folders or image files ({', '.join(sorted(extensions)[:6])}, ...)"
                    + _unread_suffixes(root, extensions)
                )
            log.info("%s has no class sub-folders: an unlabelled set of %d images", root, len(paths))
            columns = {"image": paths, "index": np.arange(len(paths))}
            features = _image_features(None)
        # Arrow arrays, which datasets casts as columns (an image column from the paths), not value by
        # value: the same table, a million files' 2.6 s -> 0.2 s.
        return Dataset.from_dict({name: pa.array(values, type=pa.string() if name == "image" else pa.int64())
                                  for name, values in columns.items()}, features=features)


MACOS_FOLDER = "__MACOSX"  # what macOS's Archive Utility adds to a zip: resource forks, no images
NAS_FOLDER = "@eaDir"  # what a Synology NAS adds to every folder: its own thumbnails of the images
# The file every command leaves in its output_dir (mark_output_folder): an image folder's scan passes
# over a folder holding it, so that a run's own plots are never read back as images.
OUTPUT_MARK = ".latentmap-output"
# What latentmap's commands make in an output_dir (run folders, sweeps, the cache, fine-tuned
# checkpoints, the MLflow store and its artifacts, exports), named when an image folder holds them.
OUTPUT_ENTRIES = ("runs", "multiruns", "cache", "checkpoints", "mlartifacts", "mlruns", "mlflow.db", "reports",
                  "projector", "run.parquet", "atlas.parquet")


def mark_output_folder(folder: str) -> None:
    """Leave :data:`OUTPUT_MARK` in ``folder`` (a command's ``output_dir``), made if need be; a folder
    that cannot be written is left as it is (the command's own writes then say so)."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        mark = path / OUTPUT_MARK
        if not mark.is_file():
            mark.write_text("latentmap writes its runs here; its image-folder scans pass over this folder.\n")
    except OSError:
        pass


def _refuse_linked_classes(root: Path, class_dirs: list[Path]) -> None:
    """Class folders that are links to the image folder itself, to a folder holding another class,
    or to the same folder as another class: their images would be read in two classes (a link
    ``cat -> ..`` made every other class's images cats too), so they are one line."""
    links = [folder for folder in class_dirs if folder.is_symlink()]
    if not links:
        return
    real = {folder: folder.resolve() for folder in class_dirs}
    top = root.resolve()
    for folder in links:
        target = real[folder]
        if target == top or target in top.parents:
            raise ConfigError(f"class folder {folder} is a link to {target}, which holds the image folder {root} "
                              "itself: every image would be read again as this class; remove the link")
        shared = [other.name for other, at in real.items() if other != folder
                  and (at.is_relative_to(target) or target.is_relative_to(at))]
        if shared:
            raise ConfigError(f"class folder {folder} is a link to {target}, which holds images of class {shared[0]} "
                              "too: they would be read in two classes; remove the link, or copy the images it should "
                              "hold")


def _check_nesting(given: str, root: Path, class_files: dict[str, list[str]]) -> None:
    """Say when the class folders look like a level above the classes: one folder holding every
    image in its sub-folders (a ConfigError: one class is no labelled set; the fix is the path one
    level down), or class folders whose images all lie in two or more sub-folders of the same names
    (``train/cat``, ``test/cat``: a warning, since the top level is then what the labels are, which
    may be meant; the way to label by the inner folders is the path of one of them). One shared
    name (``cat/images``, ``dog/images``) is a wrapper, and passes. Cheap on a
    flat folder of classes: a class's first image directly in its folder ends that class's look."""
    inner: dict[str, set[str]] = {}
    for name, files in class_files.items():
        prefix = len(str(root / name)) + 1
        if any(os.sep not in path[prefix:] for path in files):
            return  # images directly in a class folder: the usual <class>/<image> layout
        inner[name] = {path[prefix:].split(os.sep, 1)[0] for path in files}
    if len(inner) == 1:
        ((name, below),) = inner.items()
        shown = ", ".join(sorted(below)[:4]) + (", ..." if len(below) > 4 else "")
        raise ConfigError(f"dataset.path={given!r} holds one folder, {name!r}, whose images lie in its sub-folders "
                          f"({shown}): one class is no labelled set; if those are the classes, point at it: "
                          f"dataset.path={str(Path(given) / name)!r}")
    shared = set.intersection(*inner.values())
    if len(shared) >= 2:  # one shared name is a wrapper (cat/images, dog/images): the labels are right
        shown = ", ".join(sorted(shared)[:4]) + (", ..." if len(shared) > 4 else "")
        outer = ", ".join(sorted(inner)[:4]) + (", ..." if len(inner) > 4 else "")
        first = next((name for name in sorted(inner) if name.lower() in ("train", "training")), sorted(inner)[0])
        log.warning("dataset.path=%r: the classes are its folders %s, whose images all lie in sub-folders of the "
                    "same names (%s), as a split a folder would; to label by those instead, point at one: "
                    "dataset.path=%r", given, outer, shown, str(Path(given) / first))


def image_files(folder: str, extensions: set[str], recursive: bool) -> list[str]:
    """The files in ``folder`` (with ``recursive``, in its sub-folders too, not through links to
    folders) whose suffix, lower-cased, is one of ``extensions``, sorted: what ``Path(folder).rglob("*")``
    (or ``iterdir()``) kept by ``is_file()`` and ``suffix`` gave, in the same spelling, by
    ``os.scandir``, whose entries know their type without a system call each (a million files: about
    10 s by pathlib here). As pathlib: hidden files count, a link to a file counts, an unreadable
    sub-folder is passed over. A hidden sub-folder is not read (``.ipynb_checkpoints``, as the class
    folders themselves), nor a NAS's thumbnail folder (``@eaDir``). What macOS adds to a folder it
    zips is not an image and is passed over: ``__MACOSX`` folders and ``._<name>`` files (resource
    forks, which failed to decode), and so is a sub-folder latentmap writes its outputs to (one
    holding :data:`OUTPUT_MARK`)."""
    found, unnamed = [], []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except PermissionError:
            if not recursive:
                raise
            continue
        if current != folder and any(entry.name == OUTPUT_MARK for entry in entries):
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("._") or name == MACOS_FOLDER:
                continue
            dot = name.rfind(".")  # pathlib's suffix: from the last dot, not a leading one, not a final one
            suffix = name[dot:].lower() if 0 < dot < len(name) - 1 else ""
            path = name if current == "." else os.path.join(current, name)  # Path(".") / name is name
            try:
                if recursive and entry.is_dir(follow_symlinks=False):
                    if name.startswith(".") or name == NAS_FOLDER:  # .ipynb_checkpoints, .git, a NAS's thumbnails
                        continue
                    (pending if name.isascii() or _utf8(name) else unnamed).append(path)
                elif suffix in extensions and entry.is_file():
                    (found if name.isascii() or _utf8(name) else unnamed).append(path)
            except OSError:  # as Path.is_file: what cannot be read is not a file
                continue
    if unnamed:  # a name from another system's encoding (an old zip): no text column can hold it
        shown = ", ".join(ascii(path) for path in sorted(unnamed)[:3]) + (", ..." if len(unnamed) > 3 else "")
        log.warning("left out %d file%s or folder%s whose name is not valid UTF-8: %s (rename them to read them, "
                    "e.g. convmv -f latin1 -t utf-8 -r --notest <folder>)", len(unnamed),
                    "s" if len(unnamed) > 1 else "", "s" if len(unnamed) > 1 else "", shown)
    return sorted(found)


def _utf8(name: str) -> bool:
    """Whether a file name as Python read it (undecodable bytes as surrogates) is valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _say_look_alikes(root: Path | str, names: list[str], what: str = "folders") -> None:
    """A warning naming class folders (or labels) whose names differ only in case, spaces at an end
    or Unicode form (``café`` typed on macOS and on Linux): they are read as two classes, shown with
    the same name in every table and plot."""
    import unicodedata

    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(unicodedata.normalize("NFC", name).strip().casefold(), []).append(name)
    alike = [group for group in groups.values() if len(group) > 1]
    if alike:
        def told(name: str) -> str:  # two Unicode forms print alike: say which one is decomposed
            return repr(name) + (" (decomposed Unicode)" if unicodedata.normalize("NFC", name) != name else "")

        shown = "; ".join(" and ".join(told(name) for name in group) for group in alike[:4])
        log.warning("class %s in %s whose names differ only in case, spaces or Unicode form are read as separate "
                    "classes: %s%s (rename or merge them if they are one class)", what, root, shown,
                    "; ..." if len(alike) > 4 else "")


def undecoded(dataset):
    """The same rows with ``image`` as ``{"bytes", "path"}`` records (no decoding)."""
    from datasets import Image

    return dataset.cast_column("image", Image(decode=False))


def decode_rgb(record: dict[str, Any], index: int, max_pixels: int | None,
               intensity: tuple[float, float] | None = None):
    """Decode one undecoded image record into an RGB PIL image.

    An image above ``max_pixels`` (``dataset.max_image_pixels``; None: no limit) is read at 1/8
    scale when it is a JPEG small enough there (PIL's draft mode: cheap, the model sees far fewer
    pixels anyway), and refused otherwise. ``intensity``: the values a one-channel 16- or 32-bit
    image's grey levels span (``dataset.intensity_range``; None: by its mode, :func:`as_rgb`). To
    decode many, :func:`rgb_decoder` sets the limit once.

    Raises:
        ConfigError: naming the file (or the row) when the image cannot be read, or is too large.
    """
    with rgb_decoder(max_pixels, intensity) as decode:
        return decode(record, index)


@contextlib.contextmanager
def rgb_decoder(max_pixels: int | None, intensity: tuple[float, float] | None = None):
    """While open, a function ``decode(record, index)`` that does what :func:`decode_rgb` does,
    PIL's limit and warning filter set once for every image it decodes (batches of 32x32 PNGs:
    63-70 instead of 71-79 us an image, ``scripts/bench.py --only decode``), and put back when it
    closes."""
    from PIL import Image

    with _pil_limit(max_pixels), warnings.catch_warnings():  # PIL only warns between 1x and 2x: we refuse above 1x
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield functools.partial(_decode_rgb, max_pixels=max_pixels, intensity=intensity)


def _decode_rgb(record: dict[str, Any], index: int, max_pixels: int | None,
                intensity: tuple[float, float] | None = None):
    """:func:`decode_rgb`'s work, inside :func:`rgb_decoder`'s limit and warning filter."""
    from PIL import Image

    if record is None or not (record.get("bytes") or record.get("path")):  # a dataset row without an image
        raise UnreadableImage(f"row {index}", "the row holds no image (None)")

    def source():
        return io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"]

    try:
        with Image.open(source()) as image:
            if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
                raise Image.DecompressionBombError(f"{image.size} is above {max_pixels} pixels")
            _refuse_thin(record.get("path") or f"row {index}", *image.size, max_pixels)
            return as_rgb(upright(image), intensity)
    except Image.DecompressionBombError:
        where = record.get("path") or f"row {index}"
        try:
            return _decode_large(source, where, max_pixels, intensity)
        except _MALFORMED as error:  # e.g. a truncated huge file
            raise UnreadableImage(where, f"{type(error).__name__}: {error}") from error
    except _MALFORMED as error:
        raise UnreadableImage(record.get("path") or f"row {index}", f"{type(error).__name__}: {error}") from error


# What PIL's readers raise on a malformed file, beyond OSError (UnidentifiedImageError is one):
# ValueError and TypeError, struct.error (a field of the wrong size or type: a WebP's or a JPEG's
# mistyped EXIF tag), EOFError (a frame cut short) and SyntaxError (a header a plugin cannot parse).
_MALFORMED = (OSError, ValueError, TypeError, struct.error, EOFError, SyntaxError)


# A model's preprocessing resizes an image's shortest side to its input side (224 to 518 pixels here)
# before cropping, so a thin image grows by its aspect ratio: 16,000 x 1 pixels (48 KB) became
# 256 x 4,096,000 (3 GB) in a shortest-edge processor, or an allocation traceback. An image that
# would grow above dataset.max_image_pixels, or PIL's default limit where that is larger, at this
# side is refused as one above the limit is (thinner than about 1:340 under PIL's limit; a panorama
# is about 1:10); dataset.max_image_pixels=null reads it.
RESIZED_SIDE = 512


def _resized_pixels(width: int, height: int) -> int:
    """Pixels of a ``width`` x ``height`` image once its shortest side is :data:`RESIZED_SIDE`."""
    short, long = min(width, height), max(width, height)
    return RESIZED_SIDE * RESIZED_SIDE * long // max(short, 1)


def _refuse_thin(where: str, width: int, height: int, max_pixels: int | None) -> None:
    """A ConfigError naming the image ``where`` (read at ``width`` x ``height``) when a model's resize
    would blow it up above ``max_pixels`` or PIL's default limit, whichever is larger (see
    :data:`RESIZED_SIDE`); nothing without a limit."""
    limit = None if max_pixels is None else max(max_pixels, PIL_MAX_IMAGE_PIXELS)
    if limit is not None and _resized_pixels(width, height) > limit:
        raise ConfigError(
            f"image {where} is {width}x{height} pixels: a model's resize of its shortest side to {RESIZED_SIDE} "
            f"would make it {_resized_pixels(width, height):,} pixels, above {limit:,}: crop or remove it, or set "
            f"dataset.max_image_pixels=null for no limit")


_ORIENTATION = 0x0112  # EXIF's Orientation tag: 1 upright, 2-8 mirrored and/or turned


def upright(image):
    """The image as its EXIF orientation says it is seen (a phone's photo held sideways is stored
    sideways with Orientation 6): turned and mirrored as ``datasets`` and viewers show it (PIL's
    ``ImageOps.exif_transpose`` turns it the same way, then rewrites the EXIF block, which raised
    ``struct.error`` on a photo with one mistyped tag: the turn alone is done here). An image
    without the tag (most PNGs, most datasets) is returned as it is."""
    from PIL import Image

    if image.format == "PNG":  # a PNG's eXIf chunk may follow its pixels: PIL reads it when it loads them
        image.load()
    if image.format != "TIFF" and not image.info.get("exif"):  # no EXIF block read with the header: no tag
        return image
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the pixels are still readable, upright or not
        return image
    turn = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}.get(orientation)  # ImageOps.exif_transpose's own table
    return image if turn is None else image.transpose(turn)


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one channel of 16 or 32 bits


def as_rgb(image, intensity: tuple[float, float] | None = None):
    """A PIL image as 8-bit RGB. PIL's own conversion clips wider greyscale values at 255, so a
    16-bit image (microscopy, medical, depth: values up to 65,535) came out almost all white; here
    its values are scaled to 8 bits instead, every image of a mode by the same range, never by an
    image's own values (a rule by each image's largest value made a brighter image darker than a
    dim one): ``intensity`` ``(low, high)`` (``dataset.intensity_range``) maps low to 0 and high to
    255, clipped; without it 16- and 32-bit integers span 0..65,535 (PIL reads a PGM's smaller
    maxval scaled to that range) by 255/65,535, rounded in integers, and floats span 0..1."""
    from PIL import Image

    if image.mode not in _WIDE_MODES:
        return image.convert("RGB")
    values = np.asarray(image)
    if intensity is None and image.mode != "F":  # round(v * 255 / 65535) = (v + 128) // 257 (65,535 = 255 x 257)
        grey = ((np.clip(values, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
    else:
        low, high = intensity or _default_range(image.mode)
        values = np.nan_to_num(values.astype(np.float64), nan=low, posinf=high, neginf=low)
        grey = np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def _default_range(mode: str) -> tuple[float, float]:
    """The values a wide image of PIL ``mode`` spans without dataset.intensity_range: 0..1 for
    floats, 0..65,535 for integers."""
    return (0.0, 1.0) if mode == "F" else (0.0, 65535.0)


def reading_of(node) -> dict[str, Any]:
    """How a logged run's dataset config reads images, as :func:`decode_rgb`'s keywords: its pixel
    limit (``max_pixels``) and its wide images' range (``intensity``)."""
    return {"max_pixels": max_pixels_of(node), "intensity": intensity_of(node)}


def intensity_of(node) -> tuple[float, float] | None:
    """``dataset.intensity_range`` of a dataset config as (low, high); None where it is null or the
    run was logged before the key existed."""
    value = None if node is None else node.get("intensity_range")
    return None if value is None else (float(value[0]), float(value[1]))


def _say_wide(record: dict[str, Any], where: str, intensity: tuple[float, float] | None) -> None:
    """A line when ``record`` (a dataset's first readable image) is one-channel 16 or 32 bits: the
    range of values read as black to white, this image's own values, and the setting to change it
    (a CT scan's -1,000..1,000 or a 12-bit camera's 0..4,095 read as 0..65,535 looks black)."""
    from PIL import Image

    source = io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"]
    with _pil_limit(None), Image.open(source) as image:
        if image.mode not in _WIDE_MODES:
            return
        values = np.asarray(image)
        mode = image.mode
    low, high = intensity or _default_range(mode)
    log.info("images are one-channel %s (PIL mode %s; the first, %s, holds values %s to %s): values %s to %s "
             "are read as black to white, the same for every image%s", "floats" if mode == "F" else "integers of "
             "16 or 32 bits", mode, where, f"{np.nanmin(values):g}", f"{np.nanmax(values):g}", f"{low:g}", f"{high:g}",
             " (dataset.intensity_range)" if intensity else "; set dataset.intensity_range=[low,high] for another "
             "range")


@contextlib.contextmanager
def _pil_limit(max_pixels: int | None):
    """PIL's process-wide decompression-bomb limit set to ``max_pixels`` while one image is opened,
    and put back after: a run's limit (say 2,000 pixels) must not stay behind for whatever the
    process opens next (the report's thumbnails, the next job of an in-process sweep)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


_DRAFTS_SAID: list[bool] = []  # whether this run said that a JPEG was read in draft mode


def reset_notices() -> None:
    """Forget the lines said once a run (JPEG draft decoding): each run, a sweep's in one process too,
    says them again."""
    _DRAFTS_SAID.clear()


def _decode_large(source, where: str, max_pixels: int, intensity: tuple[float, float] | None):
    """An image PIL refused as too large: a JPEG decoded in draft mode when that brings it under
    ``max_pixels``; otherwise a ConfigError naming the file, its size and the setting."""
    from PIL import Image

    with _pil_limit(None), Image.open(source()) as image:  # the header (and a JPEG's reduced decode) of this file
        width, height = image.size
        if image.format == "JPEG":
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # decode at 1/8 scale
            if image.size[0] * image.size[1] <= max_pixels:
                _refuse_thin(f"{where} (read in JPEG draft mode)", *image.size, max_pixels)
                first = not _DRAFTS_SAID  # a line an image, at every stage that decodes it, crowded the log
                (log.info if first else log.debug)(
                    "%s is %dx%d pixels: decoded at reduced size %dx%d (JPEG draft mode)%s", where, width, height,
                    *image.size, "; any others are read the same way, without a line each" if first else "")
                _DRAFTS_SAID[:] = [True]
                return as_rgb(upright(image), intensity)
    raise ConfigError(
        f"image {where} is {width}x{height} = {width * height:,} pixels, above dataset.max_image_pixels="
        f"{max_pixels} (PIL's decompression-bomb guard): to read it set dataset.max_image_pixels="
        f"{width * height} (or null for no limit)")


def max_pixels_of(node) -> int | None:
    """``dataset.max_image_pixels`` of a logged run's dataset config (PIL's limit for a run logged
    before the key existed)."""
    if node is None:
        return PIL_MAX_IMAGE_PIXELS
    return node.get("max_image_pixels", PIL_MAX_IMAGE_PIXELS)  # logged before the key


def check_readable(dataset, max_pixels: int | None, intensity: tuple[float, float] | None = None,
                   shown: int = 3) -> None:
    """Refuse a dataset none of whose images can be decoded, in one line naming the first few files
    and why each failed. Rows are tried in order until one decodes, so a usable dataset costs one
    decode; a line says how that image's values are read when it is 16 or 32 bits a pixel."""
    raw = undecoded(dataset)
    failures = []
    for row in range(len(raw)):
        record = raw[row]
        try:
            decode_rgb(record["image"], int(record["index"]), max_pixels, intensity)
            _say_wide(record["image"], record["image"].get("path") or f"row {record['index']}", intensity)
            return
        except ConfigError as error:
            if len(failures) < shown:
                failures.append(error.what if isinstance(error, UnreadableImage) else str(error))
    raise ConfigError(no_readable_images(len(raw), failures))


def no_readable_images(n_rows: int, failures: list[str]) -> str:
    return (f"no readable images: none of the {n_rows} images could be decoded, e.g. " + "; ".join(failures)
            + ". Point dataset.path (or dataset.name) at images")



def _resolved_stat(path: str, resolved) -> tuple[str, int | None, int | None]:
    """(``Path(path).resolve()``, size, mtime in ns; None and None for a missing file, as
    ``Path.exists`` decides), in one system call where ``resolve`` makes one a path component: a
    file that is not a link resolves to its folder's real path (``resolved``, cached) and its name.
    A link, or a path ending in ``.`` or ``..``, goes through ``resolve`` itself. A path spelled
    as pathlib spells it (most are) skips pathlib's parse."""
    if "//" in path or "/." in path or path.startswith("./") or path.endswith("/") or path in ("", "."):
        path = os.fspath(Path(path))  # as pathlib spells it: no trailing separator, no '.' parts
    link = False
    try:
        stat = os.lstat(path)  # the file's own, or the link's: then the file's it points to
        link = S_ISLNK(stat.st_mode)
        if link:
            stat = os.stat(path)
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            raise  # what Path.exists() raises too (a folder we may not read)
        size = mtime = None
    folder, name = os.path.split(path)
    if name in ("", ".", "..") or link:
        return str(Path(path).resolve()), size, mtime
    return os.path.join(resolved(folder or "."), name), size, mtime


def fingerprint(dataset) -> str:
    """sha256 of the dataset's content: image bytes (or path, size and mtime), index and label."""
    digest = hashlib.sha256()
    raw = undecoded(dataset)
    labels = labels_of(dataset)
    digest.update(repr(class_names(dataset)).encode())
    resolved = functools.lru_cache(maxsize=4096)(os.path.realpath)  # a folder's, once
    # Arrow's columns a batch at a time (the rows' order, a selection's included): the image records'
    # fields as lists, not a dict a row through datasets' formatting (a third of a million files' time).
    for batch in raw.with_format("arrow").iter(batch_size=16_384):
        images = batch.column("image").combine_chunks()
        paths = images.field("path").to_pylist()
        blobs = images.field("bytes")
        blobs = blobs.to_pylist() if blobs.null_count < len(blobs) else itertools.repeat(None)
        for blob, path, index in zip(blobs, paths, batch.column("index").to_pylist()):
            if blob:
                digest.update(hashlib.sha256(blob).digest())
            elif path is None:  # a row without an image (None): unreadable at extraction, skipped or refused
                digest.update(b"<none>")
            else:
                path, size, mtime = _resolved_stat(path, resolved)
                digest.update(f"{path}|{size}|{mtime}".encode())
            digest.update(str(index).encode())
    if labels is not None:
        digest.update(labels.tobytes())
    return digest.hexdigest()
