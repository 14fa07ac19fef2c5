"""Data sources: one datasets.Dataset shape for all, the balanced limit, the content fingerprint."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from latentmap import data
from latentmap.errors import ConfigError

from helpers import write_class_images


def test_digits_are_all_1797_with_classlabels():
    from sklearn.datasets import load_digits

    dataset = data.DigitsSource().load(seed=0)
    assert len(dataset) == 1797
    assert data.class_names(dataset) == [str(d) for d in range(10)]
    np.testing.assert_array_equal(data.labels_of(dataset), load_digits().target)
    first = data.decode_rgb(data.undecoded(dataset)[0]["image"], 0, data.PIL_MAX_IMAGE_PIXELS)
    expected = np.round(load_digits().images[0] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(first)[..., 0], expected)


def test_limit_is_seeded_and_keeps_the_class_balance():
    dataset = data.DigitsSource(limit=100).load(seed=3)
    assert len(dataset) == 100
    np.testing.assert_array_equal(np.bincount(data.labels_of(dataset)), [10] * 10)
    again = data.DigitsSource(limit=100).load(seed=3)
    other = data.DigitsSource(limit=100).load(seed=4)
    assert dataset["index"] == again["index"] and dataset["index"] != other["index"]
    assert dataset["index"] == sorted(dataset["index"])  # rows keep source order
    # The order's every prefix is balanced, even with unequal classes.
    labels = np.array([0] * 50 + [1] * 10 + [2] * 5)
    prefix = labels[data.balanced_order(labels, len(labels), seed=0)[:15]]
    np.testing.assert_array_equal(np.bincount(prefix), [5, 5, 5])


def test_imagefolder_labels_from_sorted_subfolders(class_folder):
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    assert data.class_names(dataset) == ["blue", "green", "red", "yellow"]
    records = data.undecoded(dataset)["image"]
    assert records[0]["path"].endswith("blue/000.png") and records[-1]["path"].endswith("yellow/007.png")
    assert data.labels_of(dataset).tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8


def test_fingerprint_follows_content(class_folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(class_folder, copy)
    before = data.fingerprint(data.ImageFolderSource(path=str(copy)).load(seed=0))
    assert before == data.fingerprint(data.ImageFolderSource(path=str(copy)).load(seed=0))
    (copy / "red" / "000.png").write_bytes((copy / "blue" / "000.png").read_bytes())
    assert before != data.fingerprint(data.ImageFolderSource(path=str(copy)).load(seed=0))
    limited = data.ImageFolderSource(path=str(copy), limit=8).load(seed=0)
    assert data.fingerprint(limited) != before


def test_hub_dataset_offline_is_one_clear_error():
    """The hub is unreachable here (HF_DATASETS_OFFLINE=1, as on a machine without network): the
    message blames the network, not the name."""
    with pytest.raises(ConfigError, match=r"^dataset.name='uoft-cs/cifar10' could not be downloaded: the "
                                          "Hugging Face hub is unreachable"):
        data.HubSource(name="uoft-cs/cifar10", split="train[:100]", image_column="img").load(seed=0)


@pytest.mark.parametrize("make", [lambda folder, **kw: data.DigitsSource(**kw),
                                  lambda folder, **kw: data.ImageFolderSource(path=str(folder), **kw)],
                         ids=["digits", "imagefolder"])
def test_every_source_shares_limit_holdout_and_part(make, class_folder):
    """limit, then a stratified holdout split: the same rows as apply_limit on the source's full read."""
    full = make(class_folder).read()
    for kwargs in ({"limit": 12}, {"holdout": 0.25, "part": "holdout"}, {"limit": 20, "holdout": 0.5, "part": "train"}):
        got = make(class_folder, **kwargs).load(seed=7)
        expected = data.apply_limit(full, kwargs.get("limit"), 7, kwargs.get("holdout", 0.0), kwargs.get("part", "all"))
        assert got["index"] == expected["index"], kwargs
    train = make(class_folder, holdout=0.25, part="train").load(seed=7)
    held = make(class_folder, holdout=0.25, part="holdout").load(seed=7)
    assert not set(train["index"]) & set(held["index"]) and len(train) + len(held) == len(full)
    with pytest.raises(ConfigError, match="dataset.part='test' is not a part"):
        make(class_folder, part="test").load(seed=0)
    with pytest.raises(TypeError):  # the shared settings are keyword-only: no positional mix-ups
        data.ImageFolderSource(str(class_folder), 10)


def test_hub_source_loads_renames_and_encodes_labels(class_folder, tmp_path):
    """The hub path (``datasets.load_dataset``) on a local parquet folder, with other column names."""
    source = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    names = data.class_names(source)
    table = source.map(lambda row: {"fine_label": names[row["label"]]}).rename_column("image", "img")
    (tmp_path / "hub").mkdir()
    table.remove_columns(["label", "index"]).to_parquet(str(tmp_path / "hub" / "train.parquet"))
    dataset = data.HubSource(name=str(tmp_path / "hub"), split="train[:20]", image_column="img",
                             label_column="fine_label").load(seed=0)
    assert len(dataset) == 20 and set(dataset.column_names) == {"image", "label", "index"}
    assert data.class_names(dataset) == ["blue", "green", "red"]  # the first 20 rows hold three classes
    with pytest.raises(ConfigError, match="dataset.label_column='nope' is not a column"):
        data.HubSource(name=str(tmp_path / "hub"), image_column="img", label_column="nope").load(seed=0)


def test_hub_source_takes_columns_already_named_image_and_label_and_save_to_disk_folders(class_folder, tmp_path):
    """Columns already called ``image`` and ``label`` (the defaults; CIFAR-10's ``img`` and ``label``)
    are not renamed to themselves, which datasets refuses (a traceback before); a folder written by
    ``save_to_disk`` (which ``load_dataset`` refuses) loads with its split and slice."""
    from datasets import DatasetDict

    source = data.ImageFolderSource(path=str(class_folder)).load(seed=0).remove_columns(["index"])
    names = data.class_names(source)
    (tmp_path / "plain").mkdir()
    source.to_parquet(str(tmp_path / "plain" / "train.parquet"))
    (tmp_path / "cifar").mkdir()
    source.rename_column("image", "img").to_parquet(str(tmp_path / "cifar" / "train.parquet"))
    for folder, image_column in (("plain", "image"), ("cifar", "img")):
        dataset = data.HubSource(name=str(tmp_path / folder), image_column=image_column).load(seed=0)
        assert dataset.column_names == ["image", "label", "index"] and len(dataset) == len(source), folder
        assert data.class_names(dataset) == names and dataset["label"] == source["label"], folder
    source.save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": source, "test": source.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    assert len(data.HubSource(name=str(tmp_path / "one"), split="train[:7]").load(seed=0)) == 7
    assert len(data.HubSource(name=str(tmp_path / "dict"), split="test").load(seed=0)) == 5
    both = data.HubSource(name=str(tmp_path / "dict"), split="train[:3]+test").load(seed=0)
    assert both["label"] == source["label"][:3] + source["label"][:5]
    with pytest.raises(ConfigError, match="dataset.split='validation' does not name a split.*use one of train, test"):
        data.HubSource(name=str(tmp_path / "dict"), split="validation").load(seed=0)
    with pytest.raises(ConfigError, match="dataset.image_column and dataset.label_column are both 'image'"):
        data.HubSource(name=str(tmp_path / "plain"), label_column="image").load(seed=0)
    # a set without its label column: the image column is no label to choose; null is the way out
    source.remove_columns(["label"]).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(ConfigError, match=r"dataset.label_column='label' is not a column of .*nolabel: "
                                          r"set dataset.label_column=null for unlabelled images$"):
        data.HubSource(name=str(tmp_path / "nolabel")).load(seed=0)
    with pytest.raises(ConfigError, match=r"dataset.label_column='class' is not a column of .*one: choose one of "
                                          r"label or set dataset.label_column=null for unlabelled images$"):
        data.HubSource(name=str(tmp_path / "one"), label_column="class").load(seed=0)
    assert data.class_names(data.HubSource(name=str(tmp_path / "nolabel"), label_column=None).load(seed=0)) is None


def test_hub_labels_of_any_column_type_become_classes_or_one_line(class_folder, tmp_path, monkeypatch, caplog):
    """Numbers are classes in numeric order, named by their number (``2`` before ``10``: datasets'
    encoding sorted them as text, and row 2's label 2 became class 4); a label column with an empty,
    NaN or missing label, or a list of labels, and an image column of numbers or of text, are one
    line naming the key; a split of no rows, one data file, ``~``, look-alike labels, and a folder
    holding an output_dir are handled as the image-folder source handles them."""
    source = data.ImageFolderSource(path=str(class_folder)).load(seed=0).remove_columns(["index", "label"])
    n = len(source)

    def saved(name: str, **columns):
        table = source
        for column, values in columns.items():
            table = table.add_column(column, values)
        table.save_to_disk(str(tmp_path / name))
        return str(tmp_path / name)

    twelve = saved("twelve", label=[i % 12 for i in range(n)])
    loaded = data.HubSource(name=twelve).load(seed=0)
    assert data.class_names(loaded) == [str(i) for i in range(12)]
    assert data.labels_of(loaded).tolist() == [i % 12 for i in range(n)]  # each label is its own class id
    apart = data.HubSource(name=saved("apart", label=[[0, 7, 14][i % 3] for i in range(n)])).load(seed=0)
    assert data.class_names(apart) == ["0", "7", "14"] and data.labels_of(apart).tolist() == [i % 3 for i in range(n)]
    floats = data.HubSource(name=saved("floats", label=[[2.0, 10.0, 0.5][i % 3] for i in range(n)])).load(seed=0)
    assert data.class_names(floats) == ["0.5", "2", "10"] and data.labels_of(floats)[:3].tolist() == [1, 2, 0]

    for name, labels in (("nan", [float("nan")] + [1.0] * (n - 1)), ("empty", [""] + ["a"] * (n - 1)),
                         ("none", [None] + ["a"] * (n - 1))):
        folder = saved(name, fine=labels)
        with pytest.raises(ConfigError, match=rf"^dataset.label_column='fine' of .*{name} has no label \(empty, NaN or "
                                              rf"None\) on 1 of {n} rows: .* set dataset.label_column=null"):
            data.HubSource(name=folder, label_column="fine").load(seed=0)
    with pytest.raises(ConfigError, match=r"^dataset.label_column='label' of .* holds lists of int64 values: .*no "
                                          r"multi-label"):
        data.HubSource(name=saved("multi", label=[[i % 3, (i + 1) % 3] for i in range(n)])).load(seed=0)

    numbers = saved("numbers", number=list(range(n)), label=[i % 3 for i in range(n)])
    with pytest.raises(ConfigError, match=r"^dataset.image_column='number' of .* holds int64 values, which datasets "
                                          r"cannot read as images .*: it takes PIL images"):
        data.HubSource(name=numbers, image_column="number").load(seed=0)
    captions = saved("captions", caption=[f"a photo of {i}" for i in range(n)], label=[i % 3 for i in range(n)])
    with pytest.raises(ConfigError, match=r"^dataset.image_column='caption' of .* holds text that names no image file "
                                          r"\(e.g. 'a photo of 0'; relative paths are read from"):
        data.HubSource(name=captions, image_column="caption").load(seed=0)
    long = saved("long", text=["iVBORw0KGgo" + "A" * 400] * n, label=[i % 3 for i in range(n)])  # base64, no path
    with pytest.raises(ConfigError, match=r"^dataset.image_column='text' of .* holds text that names no image file"):
        data.HubSource(name=long, image_column="text").load(seed=0)
    with pytest.raises(ConfigError, match=r"^dataset.split='train\[:0\]' selects no rows of .*: choose a split"):
        data.HubSource(name=twelve, split="train[:0]").load(seed=0)

    (tmp_path / "home" / "pq").mkdir(parents=True)
    labelled = source.add_column("label", [["cat", "Cat", "dog"][i % 3] for i in range(n)])
    labelled.to_parquet(str(tmp_path / "home" / "pq" / "part-0.parquet"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    files = sorted(class_folder.glob("*/*.png"))
    (tmp_path / "home" / "table.tsv").write_text("image\tlabel\n" + "".join(f"{f}\t{f.parent.name}\n" for f in files))
    from_tsv = data.HubSource(name="~/table.tsv").load(seed=0)  # a tab-separated file, read by its tabs
    assert len(from_tsv) == len(files) and data.class_names(from_tsv) == sorted({f.parent.name for f in files})
    with caplog.at_level("WARNING", logger="latentmap.data"):
        for name in ("~/pq", "~/pq/part-0.parquet"):  # a folder of data files, or one file
            loaded = data.HubSource(name=name).load(seed=0)
            assert data.class_names(loaded) == ["Cat", "cat", "dog"] and len(loaded) == n, name
    assert "class labels in dataset.label_column='label' of ~/pq whose names differ only in case" in caplog.text
    with pytest.raises(ConfigError, match=r"dataset.name='~/notes.txt' is a file datasets does not read as a table"):
        (tmp_path / "home" / "notes.txt").write_text("x")
        data.HubSource(name="~/notes.txt").load(seed=0)
    data.mark_output_folder(str(tmp_path / "home" / "pq" / "out"))
    with pytest.raises(ConfigError, match=r"dataset.name='~/pq' holds latentmap's output folder .*pq/out \(an "
                                          r"output_dir\), whose plots datasets would read as images"):
        data.HubSource(name="~/pq").load(seed=0)


def test_hub_labels_of_minus_one_are_no_label(class_folder, tmp_path):
    """-1, the hub's "no label" (test splits): on every row the set is unlabelled; on some rows it is
    one line (an integer column made "-1" a class of its own; a ClassLabel column broke the counts);
    on none, nothing changes."""
    from datasets import ClassLabel

    source = data.ImageFolderSource(path=str(class_folder)).load(seed=0).remove_columns(["index"])
    n = len(source)
    cases = {"all": [-1] * n, "some": [-1] + source["label"][1:], "none": source["label"]}
    for case, labels in cases.items():
        for kind in ("classlabel", "int"):
            table = source.remove_columns(["label"]).add_column("label", labels)
            if kind == "classlabel":
                table = table.cast_column("label", ClassLabel(names=data.class_names(source)))
            folder = tmp_path / f"{case}-{kind}"
            table.save_to_disk(str(folder))
            hub = data.HubSource(name=str(folder))
            if case == "some":
                with pytest.raises(ConfigError, match=rf"dataset.label_column='label' of .* has no label \(-1\) on 1 "
                                                      rf"of {n} rows: .* or set dataset.label_column=null"):
                    hub.load(seed=0)
                continue
            loaded = hub.load(seed=0)
            if case == "all":
                assert data.labels_of(loaded) is None, kind
            else:
                assert data.labels_of(loaded).tolist() == labels, kind


def test_a_folder_macos_zipped_has_no_extra_class_and_no_unreadable_images(tmp_path):
    """A folder extracted from a zip made on macOS: its __MACOSX folder was a class (with no image
    left once its ._ files failed to decode), and the ._ files were counted as unreadable."""
    from PIL import Image

    for name in ("blue/a.png", "red/b.png", "red/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (0, 0, 200) if "blue" in name else (200, 0, 0)).save(tmp_path / name)
    for name in ("__MACOSX/red/._b.png", "red/._c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\x00\x05\x16\x07 resource fork")
    dataset = data.ImageFolderSource(path=str(tmp_path)).load(seed=0)
    assert data.class_names(dataset) == ["blue", "red"] and len(dataset) == 3


def _folders(root: Path, names: list[str]) -> Path:
    from PIL import Image

    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(name) * 9 % 256, 0, 0)).save(root / name)
    return root


def test_a_folder_one_level_above_its_classes_is_said_so(tmp_path, caplog):
    """The class folders are the path's sub-folders. A root of splits (train/cat, test/cat) gives the
    classes test and train, which may be meant: a warning names the inner folders and the path of a
    split (train's). One folder holding the classes is refused in one line naming the path one level
    down. A wrapper each class has once (cat/images) and a usual folder say nothing."""
    import logging

    images = [f"{c}/{i}.png" for c in ("cat", "dog", "owl") for i in range(2)]
    splits = _folders(tmp_path / "splits", [f"{s}/{i}" for s in ("test", "train") for i in images])
    with caplog.at_level(logging.WARNING, logger="latentmap.data"):
        dataset = data.ImageFolderSource(path=str(splits)).load(seed=0)
    assert data.class_names(dataset) == ["test", "train"] and len(dataset) == 12  # as asked, with a warning
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "the classes are its folders test, train" in warning and "(cat, dog, owl)" in warning
    assert warning.endswith(f"dataset.path={str(splits / 'train')!r}")

    wrapped = _folders(tmp_path / "wrapped", [f"animals/{i}" for i in images])
    with pytest.raises(ConfigError, match=r"holds one folder, 'animals', whose images lie in its sub-folders "
                                          r"\(cat, dog, owl\).*dataset.path='.*wrapped/animals'$"):
        data.ImageFolderSource(path=str(wrapped)).load(seed=0)
    assert data.class_names(data.ImageFolderSource(path=str(wrapped / "animals")).load(seed=0)) == ["cat", "dog", "owl"]

    caplog.clear()
    for quiet in (_folders(tmp_path / "inner", [f"{c}/images/{i}.png" for c in ("cat", "dog") for i in range(2)]),
                  _folders(tmp_path / "usual", images),
                  _folders(tmp_path / "mixed", ["cat/a.png", "cat/x/b.png", "cat/y/c.png", "dog/x/d.png",
                                                "dog/y/e.png", "dog/f.png"])):
        with caplog.at_level(logging.WARNING, logger="latentmap.data"):
            assert len(data.class_names(data.ImageFolderSource(path=str(quiet)).load(seed=0))) >= 2
    assert caplog.records == []


def test_class_folders_whose_names_only_look_different_are_said(tmp_path, caplog):
    """'café' in two Unicode forms (one typed on macOS), 'dog' and 'dog ' and 'Cat' and 'cat' are
    separate classes shown with the same name in every table and plot: a warning names them; they
    stay classes of their own (the folders are what they are)."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = _folders(tmp_path / "alike", [f"{nfc}/a.png", f"{nfd}/b.png", "dog/c.png", "dog /d.png", "Cat/e.png",
                                         "cat/f.png", "emu/g.png"])
    with caplog.at_level(logging.WARNING, logger="latentmap.data"):
        dataset = data.ImageFolderSource(path=str(root)).load(seed=0)
    assert len(data.class_names(dataset)) == 7
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"class folders in {root} whose names differ only in case, spaces or Unicode form are "
                           "read as separate classes: ")
    for pair in (("dog", "dog "), ("Cat", "cat")):
        assert " and ".join(repr(name) for name in sorted(pair)) in said, (pair, said)
    assert f"{nfd!r} (decomposed Unicode)" in said and f"{nfc!r} (" not in said, said  # the forms print alike


def test_an_empty_class_folder_and_a_limit_above_the_images_are_said(tmp_path, caplog):
    """A class folder with no images is no class (a warning names it); dataset.limit above the
    images there are uses them all, and says so."""
    import logging

    root = _folders(tmp_path / "zoo", ["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png"])
    (root / "zebra").mkdir()
    (root / "yak" / "notes").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="latentmap.data"):
        dataset = data.ImageFolderSource(path=str(root), limit=1000).load(seed=0)
    assert data.class_names(dataset) == ["cat", "dog"] and len(dataset) == 4
    said = [r.getMessage() for r in caplog.records]
    assert f"2 folders in {root} hold no images and are no class: yak, zebra" in said
    assert "dataset.limit=1000 is more than the 4 images there are: all 4 are used" in said


def test_wide_greyscale_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit PNG (PIL's I;16) becomes 8-bit grey by 255/65,535 (PIL's own conversion clipped every
    value above 255: a 0..4,095 image came out 94% white); a 32-bit integer TIFF and a 16-bit PGM
    likewise; a float TIFF by 255, its 0..1 read as black to white."""
    from PIL import Image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65,520
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "ramp32.tif")
    Image.fromarray(ramp).save(tmp_path / "ramp16.pgm")
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16" and Image.open(tmp_path / "ramp16.pgm").mode == "I"
    expected = np.rint(ramp / 257).astype(np.uint8)
    unit = np.rint(np.asarray(Image.open(tmp_path / "unit.tif"), dtype=np.float64) * 255).astype(np.uint8)
    for name, want in (("ramp16.png", expected), ("ramp32.tif", expected), ("ramp16.pgm", expected),
                       ("unit.tif", unit)):
        got = np.asarray(data.decode_rgb({"path": str(tmp_path / name)}, 0, None))
        assert got.shape == (64, 64, 3) and (got == want[..., None]).all(), name


@pytest.mark.parametrize("dtype", ["uint16", "int32", "float32"])
def test_every_wide_image_of_a_set_is_read_by_one_range_so_brighter_stays_brighter(dtype, tmp_path, caplog):
    """A rule by each image's own largest value (a 32-bit image under 256 kept as it was, one above
    divided by 257; a float image above 1 clipped, at most 1 multiplied by 255) read an image 100
    counts brighter than another as 100 times darker. Every image is now read by one range: 16- and
    32-bit integers 0..65,535, floats 0..1, or dataset.intensity_range [low, high] for every image
    (a CT scan's -1,000..1,000), low to black and high to white, as the formula says; the first image's
    values and the setting are said in a line; the range is part of the cache key."""
    from PIL import Image

    from latentmap import store
    from latentmap.models import PixelsBackbone

    rng = np.random.default_rng(0)
    dim = rng.integers(0, 200, (16, 16)).astype(dtype)
    bright = (dim + 100).astype(dtype)  # every pixel 100 counts brighter, across 255 for the integers
    for name, values in (("dim", dim), ("bright", bright)):
        Image.fromarray(values).save(tmp_path / f"{name}.tif")
    mode = Image.open(tmp_path / "dim.tif").mode
    assert mode == {"uint16": "I;16", "int32": "I", "float32": "F"}[dtype]

    def read(name, intensity=None):
        return np.asarray(data.decode_rgb({"path": str(tmp_path / f"{name}.tif")}, 0, None, intensity))[..., 0]

    assert (read("bright") >= read("dim")).all()  # never darker
    for name, values in (("dim", dim), ("bright", bright)):  # the default ranges, by formula
        want = (np.clip(np.rint(values.astype(np.float64) * 255), 0, 255) if dtype == "float32"
                else np.rint(values.astype(np.float64) * 255 / 65535)).astype(np.uint8)
        np.testing.assert_array_equal(read(name), want)
    low, high = (-50.0, 450.0)
    for name, values in (("dim", dim), ("bright", bright)):
        want = np.clip(np.rint((values.astype(np.float64) - low) * 255 / (high - low)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(read(name, (low, high)), want)
    assert read("bright", (low, high)).mean() > read("dim", (low, high)).mean() + 40

    dataset = data.ImageFolderSource(path=str(tmp_path)).load(seed=0)
    with caplog.at_level(logging.INFO, logger="latentmap.data"):
        data.check_readable(dataset, None, (low, high))
    said = [r.getMessage() for r in caplog.records if "intensity_range" in r.getMessage()]
    assert len(said) == 1 and f"PIL mode {mode}" in said[0], said
    assert "values -50 to 450 are read as black to white" in said[0]
    backbone = PixelsBackbone(size=8)
    keys = {store.entry_key(backbone, dataset, "fp32", data.PIL_MAX_IMAGE_PIXELS, r)[0] for r in (None, (low, high))}
    assert len(keys) == 2


def test_an_image_so_thin_that_a_models_resize_would_blow_it_up_is_refused_in_one_line(tmp_path):
    """16,000 x 1 pixels (under PIL's limit) became 256 x 4,096,000 in a shortest-edge resize: it is
    refused naming the file, its size and the fix, under PIL's limit and under a lower one (a run's
    32x32 images under 2,000 pixels still read); a 1:100 strip and a panorama read; with no limit
    (null) the thin one reads too."""
    from PIL import Image

    from latentmap.errors import ConfigError

    sizes = {"thin.png": (16000, 1), "tall.png": (2, 1000), "strip.png": (3000, 30), "panorama.png": (4000, 400),
             "small.png": (32, 32)}
    for name, size in sizes.items():
        Image.new("RGB", size, (90, 90, 90)).save(tmp_path / name)

    def decode(name: str, limit: int | None):
        return data.decode_rgb({"path": str(tmp_path / name), "bytes": None}, 0, limit)

    for name, limit in (("thin.png", data.PIL_MAX_IMAGE_PIXELS), ("tall.png", data.PIL_MAX_IMAGE_PIXELS),
                        ("tall.png", 2000)):  # 2 x 1,000: not above 2,000 pixels itself
        width, height = sizes[name]
        with pytest.raises(ConfigError, match=rf"image .*{name} is {width}x{height} pixels: a model's resize "
                                              r"of its shortest side to 512 would make it .* pixels.*"
                                              r"set dataset.max_image_pixels=null for no limit"):
            decode(name, limit)
        assert decode(name, None).size == sizes[name]
    for name in ("strip.png", "panorama.png"):
        assert decode(name, data.PIL_MAX_IMAGE_PIXELS).size == sizes[name]
    assert decode("small.png", 2000).size == (32, 32)
    # A thin JPEG above the limit is read at 1/8 scale, just as thin: refused there too.
    Image.new("RGB", (8000, 8), (90, 90, 90)).save(tmp_path / "thin.jpg")
    with pytest.raises(ConfigError, match=r"thin.jpg \(read in JPEG draft mode\) is 1000x1 pixels: a model's resize"):
        decode("thin.jpg", 60_000)


def test_a_run_s_pixel_limit_does_not_stay_behind_in_pil(tmp_path):
    """Decoding under dataset.max_image_pixels (small or none) sets PIL's process-wide limit only
    while the image is opened: afterwards PIL's own limit is back, for whatever the process opens
    next (before, a run's 2,000-pixel limit made a later report thumbnail fail in the same process)."""
    from PIL import Image

    from latentmap import data

    path = tmp_path / "small.png"
    Image.new("RGB", (40, 40), (10, 20, 30)).save(path)
    big = tmp_path / "big.png"
    Image.new("RGB", (80, 80), (10, 20, 30)).save(big)
    before = Image.MAX_IMAGE_PIXELS
    assert data.decode_rgb({"path": str(path)}, 0, 2000).size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(ConfigError, match="max_image_pixels"):  # 6,400 pixels, above 2,000: refused
        data.decode_rgb({"path": str(big)}, 1, 2000)
    assert Image.MAX_IMAGE_PIXELS == before
    assert data.decode_rgb({"path": str(big)}, 1, None).size == (80, 80)
    assert Image.MAX_IMAGE_PIXELS == before


def test_one_decoder_for_a_batch_decodes_as_pil_and_holds_the_run_s_limit(tmp_path):
    """data.rgb_decoder (extraction's batches, the thumbnails) sets PIL's limit and warning filter
    once for many images. Each image equals PIL's own RGB conversion (RGB, greyscale, palette and
    RGBA PNGs and a JPEG, from a path or bytes); PIL's limit is the run's all through the batch, also
    after a refused image and a large JPEG read at 1/8 scale; an image between 1x and 2x the limit
    is refused in one line even where warnings are errors (the filter); a refused and an unreadable
    image name their file, and the decoder goes on after them; PIL's own limit is back when it
    closes, also after an error."""
    import io
    import warnings

    from PIL import Image

    from latentmap import data
    from latentmap.errors import UnreadableImage

    rng = np.random.default_rng(0)
    records, expected = [], []
    for i, mode in enumerate(("RGB", "L", "P", "RGBA")):
        image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert(mode)
        image.save(tmp_path / f"{i}.png")
        records.append({"path": str(tmp_path / f"{i}.png"), "bytes": None})
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "j.jpg", quality=80)
    records.append({"path": str(tmp_path / "j.jpg"), "bytes": None})
    records.append({"path": None, "bytes": (tmp_path / "0.png").read_bytes()})
    for record in records:
        with Image.open(record["path"] or io.BytesIO(record["bytes"])) as image:
            expected.append(np.asarray(image.convert("RGB")))
    Image.new("RGB", (80, 80)).save(tmp_path / "big.png")  # 6,400 pixels: above 2x a 2,000 limit
    Image.new("RGB", (50, 50)).save(tmp_path / "between.png")  # 2,500: between 1x and 2x
    Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(tmp_path / "large.jpg")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    before = Image.MAX_IMAGE_PIXELS
    assert before != 2000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning let through would raise
        with data.rgb_decoder(2000) as decode:
            assert Image.MAX_IMAGE_PIXELS == 2000
            for index, (record, want) in enumerate(zip(records, expected)):
                got = decode(record, index)
                assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)
            for name, pixels in (("big.png", "80x80 = 6,400"), ("between.png", "50x50 = 2,500")):
                with pytest.raises(ConfigError, match=f"^image {tmp_path / name} is {pixels} pixels, above "
                                                      "dataset.max_image_pixels=2000"):
                    decode({"path": str(tmp_path / name)}, 9)
                assert Image.MAX_IMAGE_PIXELS == 2000
            assert decode({"path": str(tmp_path / "large.jpg")}, 9).size == (20, 20)  # JPEG draft mode, 1/8
            assert Image.MAX_IMAGE_PIXELS == 2000
            with pytest.raises(UnreadableImage, match="bad.png.*UnidentifiedImageError"):
                decode({"path": str(tmp_path / "bad.png")}, 9)
            assert np.array_equal(np.asarray(decode(records[0], 0)), expected[0])  # still decoding
        assert Image.MAX_IMAGE_PIXELS == before
        with data.rgb_decoder(None) as decode:
            assert Image.MAX_IMAGE_PIXELS is None
            assert decode({"path": str(tmp_path / "big.png")}, 0).size == (80, 80)
        assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(ConfigError), data.rgb_decoder(2000) as decode:
        decode({"path": str(tmp_path / "big.png")}, 0)
    assert Image.MAX_IMAGE_PIXELS == before


def test_column_reads_a_selection_in_its_row_order_as_the_rows_say():
    """data.column (Arrow) equals the values read row by row, on a dataset whose rows are a shuffled
    selection of the table underneath (what dataset.limit and a holdout make)."""
    import datasets

    table = datasets.Dataset.from_dict({"index": np.arange(50) * 3, "label": np.arange(50) % 4})
    picked = table.select(np.random.default_rng(0).permutation(50)[:30])
    for name in ("index", "label"):
        by_row = np.array([row[name] for row in picked], dtype=np.int64)
        np.testing.assert_array_equal(data.column(picked, name), by_row)
        assert data.column(picked, name).dtype == np.int64
    np.testing.assert_array_equal(data.labels_of(picked), [row["label"] for row in picked])


def test_fingerprint_names_each_file_by_its_resolved_path(tmp_path, monkeypatch):
    """The fingerprint's path part equals pathlib's resolve() for plain files, a file that is a link,
    a link to nothing, a folder reached through a link and '..', a relative path and a file gone
    missing (what it hashed before its two-system-call form, so cache keys stay)."""
    import os

    real = tmp_path / "real" / "cat"
    real.mkdir(parents=True)
    (real / "a.png").write_bytes(b"a")
    (real / "b.png").write_bytes(b"bb")
    (tmp_path / "via").symlink_to(tmp_path / "real")
    (real / "c.png").symlink_to(real / "b.png")
    (real / "d.png").symlink_to(real / "gone.png")
    monkeypatch.chdir(tmp_path / "real")
    resolved = functools.lru_cache(os.path.realpath)
    for raw in (str(real / "a.png"), str(tmp_path / "via" / "cat" / "b.png"), str(real / "c.png"), str(real / "d.png"),
                "../via/cat/../cat/a.png", "cat/a.png", str(real / "missing.png"), "cat/a.png/", "./cat/./a.png",
                "cat/..", str(tmp_path / "via") + "/", ".", "cat//a.png", str(real) + "//c.png", ".hidden/../cat/a.png",
                "cat/.", str(tmp_path / "via" / "cat" / "c.png")):
        path = Path(raw)  # the fingerprint's former code
        stat = path.stat() if path.exists() else None
        assert data._resolved_stat(raw, resolved) == (
            str(path.resolve()), stat and stat.st_size, stat and stat.st_mtime_ns), raw


def test_fingerprint_is_what_its_row_by_row_form_hashed(tmp_path):
    """The fingerprint read through Arrow's columns against its former form (a dict a row through
    datasets' formatting), so that cache keys stay: files, in-memory bytes, rows of both, a
    shuffled selection across batches, and an empty file."""
    import hashlib
    import os

    from datasets import Dataset, Value
    from datasets import Image as ImageFeature

    def former(dataset) -> str:
        digest = hashlib.sha256()
        raw = data.undecoded(dataset)
        labels = data.labels_of(dataset)
        digest.update(repr(data.class_names(dataset)).encode())
        resolved = functools.lru_cache(maxsize=4096)(os.path.realpath)
        for start in range(0, len(raw), 1024):
            batch = raw[start : start + 1024]
            for record, index in zip(batch["image"], batch["index"]):
                if record.get("bytes"):
                    digest.update(hashlib.sha256(record["bytes"]).digest())
                else:
                    path, size, mtime = data._resolved_stat(record["path"], resolved)
                    digest.update(f"{path}|{size}|{mtime}".encode())
                digest.update(str(index).encode())
        if labels is not None:
            digest.update(labels.tobytes())
        return digest.hexdigest()

    write_class_images(tmp_path / "images", n_per_class=5)
    (tmp_path / "images" / "red" / "zz_empty.png").write_bytes(b"")
    folder = data.ImageFolderSource(path=str(tmp_path / "images")).load(seed=0)
    files = sorted(str(p) for p in (tmp_path / "images").rglob("*.png"))
    records = [{"bytes": Path(f).read_bytes() if i % 3 else None, "path": f} for i, f in enumerate(files)] * 1500
    features = Dataset.from_dict({"image": files}).cast_column("image", ImageFeature()).features
    features["index"] = Value("int64")
    mixed = Dataset.from_dict({"image": records, "index": list(range(len(records)))}, features=features)
    in_memory = mixed.select([i for i, r in enumerate(records) if r["bytes"]])
    shuffled = mixed.select(np.random.default_rng(0).permutation(len(mixed))[:20_000])
    for dataset in (folder, folder.select([3, 1, 2]), mixed, in_memory, shuffled):
        assert data.fingerprint(dataset) == former(dataset)
    assert len({data.fingerprint(d) for d in (folder, mixed, in_memory, shuffled)}) == 4


def test_an_image_folder_is_the_table_its_lists_made(tmp_path):
    """ImageFolderSource's table (Arrow columns cast by datasets) against datasets' own from_dict of
    Python lists, its former form: a folder of class folders and a flat (unlabelled) one."""
    from datasets import Dataset

    write_class_images(tmp_path / "classes", n_per_class=4)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, image in enumerate(sorted((tmp_path / "classes").rglob("*.png"))[:5]):
        (flat / f"{i}.png").write_bytes(image.read_bytes())
    for folder, names in ((tmp_path / "classes", ["blue", "green", "red", "yellow"]), (flat, None)):
        table = data.ImageFolderSource(path=str(folder)).read()
        paths = sorted(map(str, folder.rglob("*.png")))
        columns = {"image": paths, "index": list(range(len(paths)))}
        if names:
            columns["label"] = [names.index(Path(p).parent.name) for p in paths]
        former = Dataset.from_dict(columns, features=data._image_features(names))
        assert table.features == former.features and table.data.table.equals(former.data.table)


def test_files_pil_cannot_read_are_not_listed_as_images(tmp_path):
    """A PDF (PIL writes PDFs, never reads them) and an HDF5 file (a stub format with no reader)
    beside the images are not listed, so a run does not refuse them as unreadable images; a camera's
    .mpo (multi-picture JPEG) is, and PIL opens it; AVIF is not where Pillow lacks its library; a
    folder of only such files is refused saying what it holds."""
    from PIL import Image

    extensions = data._image_extensions()
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif", ".bmp", ".mpo"} <= extensions
    assert not {".pdf", ".palm", ".h5", ".hdf", ".grib", ".bufr", ".mpg", ".mpeg"} & extensions
    for name in ("cat/a.png", "cat/b.mpo", "dog/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name, format="JPEG" if name.endswith(".mpo") else None)
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "notes.pdf")
    (tmp_path / "dog" / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    listed = data.image_files(str(tmp_path), extensions, True)
    assert [Path(p).name for p in listed] == ["a.png", "b.mpo", "c.png"]
    with Image.open(listed[1]) as image:
        assert image.size == (8, 8)
    # A Pillow built without libavif still registers AVIF's opener: not listed there.
    from PIL import features

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "check", lambda name: name != "avif")
        assert ".avif" not in data._image_extensions() and ".png" in data._image_extensions()
    # A folder of only such files: the refusal says what it holds instead.
    only = tmp_path / "documents"
    only.mkdir()
    for name in ("a.pdf", "b.pdf", "notes.h5"):
        (only / name).write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"holds no images .*; it holds 2 \.pdf, 1 \.h5 files, which PIL cannot read"):
        data.ImageFolderSource(path=str(only)).read()


def test_image_files_are_what_pathlib_listed(tmp_path, monkeypatch):
    """The image folder's listing (os.scandir) against pathlib's rglob / iterdir kept by is_file and
    suffix, the form it replaced: nested folders, hidden ones (not read), hidden files, upper-case and odd
    suffixes, links to files (kept), to folders (not entered), to nothing (dropped), a folder named
    like an image, and the folder given as '.' or relative."""
    import os

    root = tmp_path / "set"
    for folder in ("cat/deep/er", "cat/.hidden", "dog", "x.png", "elsewhere", "cat/__MACOSX", "cat/@eaDir"):
        (root / folder).mkdir(parents=True)
    for name in ("cat/a.png", "cat/B.JPG", "cat/deep/c.jpeg", "cat/deep/er/d.png", "cat/.hidden/e.png",
                 "cat/._a.png", "cat/__MACOSX/._B.JPG", "cat/__MACOSX/l.png",  # macOS's zip: passed over
                 "cat/@eaDir/a.png",  # a NAS's thumbnails: passed over, as hidden folders are
                 "cat/.f.png", "cat/..g.png", "cat/h.", "cat/.png", "cat/notes.txt", "cat/i.tar.png", "dog/j.webp",
                 "loose.png", "elsewhere/k.png"):
        (root / name).write_bytes(b"x")
    (root / "cat" / "link.png").symlink_to(root / "dog" / "j.webp")
    (root / "cat" / "broken.png").symlink_to(root / "nothing.png")
    (root / "cat" / "through").symlink_to(root / "elsewhere", target_is_directory=True)
    extensions = data._image_extensions()

    def pathlib_listing(folder: Path, recursive: bool) -> list[str]:  # the former code, less macOS's zip files,
        found = folder.rglob("*") if recursive else folder.iterdir()  # hidden folders and a NAS's thumbnails
        return sorted(str(p) for p in found if p.is_file() and p.suffix.lower() in extensions
                      and not p.name.startswith("._") and "__MACOSX" not in p.parts and "@eaDir" not in p.parts
                      and not any(part.startswith(".") and part not in (".", "..")
                                  for part in p.relative_to(folder).parts[:-1]))

    monkeypatch.chdir(tmp_path)
    for folder in (root / "cat", root, Path("set"), Path("set/cat")):
        for recursive in (True, False):
            assert data.image_files(str(folder), extensions, recursive) == pathlib_listing(folder, recursive)
    listed = data.image_files(str(root / "cat"), extensions, True)
    assert str(root / "cat" / ".hidden" / "e.png") not in listed and str(root / "cat" / "link.png") in listed
    assert not any("through" in p or "broken" in p or p.endswith(".txt") or "MACOSX" in p or "._" in p for p in listed)
    monkeypatch.chdir(root / "cat")
    assert data.image_files(".", extensions, False) == pathlib_listing(Path("."), False) == [
        "..g.png", ".f.png", "B.JPG", "a.png", "i.tar.png", "link.png"]
    assert os.path.isdir(root / "x.png") and str(root / "x.png") not in data.image_files(str(root), extensions, False)


def test_a_column_with_missing_values_is_refused_in_one_line():
    """A hub dataset's label column can hold nulls: one ConfigError naming the column, not a
    wrong number (int64's minimum) flowing into the classes."""
    import datasets

    table = datasets.Dataset.from_dict({"index": [0, 1, 2], "label": [0, None, 1]})
    with pytest.raises(ConfigError, match=r"dataset column 'label' has 1 missing values of 3: drop those rows"):
        data.column(table, "label")
    values = data.column(table, "index")
    values[0] = 7  # writable, like np.asarray of the rows was
    assert data.column(table, "index").tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind", ["png", "jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_image_is_turned_as_its_exif_orientation_says_as_datasets_does(orientation, kind, tmp_path):
    """A phone photo held sideways is stored sideways with EXIF Orientation 6: it was embedded, drawn
    and shown in map.html sideways. It decodes as Hugging Face datasets' own Image feature decodes it
    (the reference), for each of the 8 orientations, from a path and from bytes."""
    from datasets.features import Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # 50 wide, 30 high: a turn is visible
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{orientation}.{kind}"  # the same file through the same decoder: bit for bit
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    expected = np.asarray(ImageFeature().decode_example({"path": str(path), "bytes": None}).convert("RGB"))
    for record in ({"path": str(path), "bytes": None}, {"path": None, "bytes": path.read_bytes()}):
        decoded = np.asarray(data.decode_rgb(record, 0, data.PIL_MAX_IMAGE_PIXELS))
        np.testing.assert_array_equal(decoded, expected)
    assert decoded.shape == ((30, 50, 3) if orientation <= 4 else (50, 30, 3))


def test_a_photo_with_a_mistyped_exif_tag_or_its_exif_after_the_pixels_is_turned_all_the_same(tmp_path):
    """A JPEG whose EXIF holds Orientation 6 and one tag of the wrong type (SMinSampleValue, a number
    in the standard, written as text) stopped the run with a struct.error traceback, with
    dataset.on_error=skip too (PIL's exif_transpose rewrites the EXIF block); a PNG whose eXIf chunk
    follows its pixels (the PNG standard allows it) was read sideways. Both are turned as the
    Orientation says: as the same pixels saved with a well-formed EXIF block are."""
    import io
    import struct
    import zlib

    from PIL import Image

    pixels = np.random.default_rng(3).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112], exif[0x0110] = 6, "Model X"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif, quality=95)
    jpeg = buffer.getvalue()
    little, big = b"\x10\x01\x02\x00", b"\x01\x10\x00\x02"  # tag 0x0110 (Model), type 2 (text)
    assert (little in jpeg) != (big in jpeg)
    mistyped = (jpeg.replace(little, b"\x54\x01\x02\x00", 1) if little in jpeg
                else jpeg.replace(big, b"\x01\x54\x00\x02", 1))  # now tag 0x0154, text where a number goes
    decoded = np.asarray(data.decode_rgb({"path": None, "bytes": mistyped}, 0, data.PIL_MAX_IMAGE_PIXELS))
    plain = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # the same JPEG data, as stored
    np.testing.assert_array_equal(decoded, np.rot90(plain, -1))  # Orientation 6: turned a quarter clockwise

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    png = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    block = exif.tobytes()
    chunk = struct.pack(">I", len(block)) + b"eXIf" + block + struct.pack(">I", zlib.crc32(b"eXIf" + block))
    end = png.rindex(b"IEND") - 4
    late = png[:end] + chunk + png[end:]
    assert "exif" not in Image.open(io.BytesIO(late)).info  # not read with the header
    decoded = np.asarray(data.decode_rgb({"path": None, "bytes": late}, 0, data.PIL_MAX_IMAGE_PIXELS))
    np.testing.assert_array_equal(decoded, np.rot90(pixels, -1))


def test_a_large_jpeg_read_at_reduced_size_is_turned_upright_too(tmp_path):
    """The decompression-bomb path (a JPEG above dataset.max_image_pixels, read at 1/8 scale) turns
    the image as its EXIF orientation says, as the ordinary path does."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400 wide, 200 high; seen turned: 200 wide, 400 high
    path = tmp_path / "sideways.jpg"
    Image.new("RGB", (400, 200), (200, 30, 30)).save(path, exif=exif.tobytes())
    decoded = data.decode_rgb({"path": str(path), "bytes": None}, 0, 5_000)
    assert decoded.size == (25, 50)  # 1/8 of (200, 400)


def test_a_file_or_folder_whose_name_is_not_utf8_is_left_out_and_named(class_folder, tmp_path, caplog):
    """A name in another system's encoding (latin-1 bytes from an old zip) stopped the whole run with
    Arrow's UnicodeEncodeError; it is left out with a warning naming it, and the rest is read."""
    import logging
    import shutil

    from latentmap.data import ImageFolderSource

    root = tmp_path / "set"
    shutil.copytree(class_folder, root)
    first = sorted(class_folder.rglob("*.png"))[0]
    shutil.copy(first, os.path.join(os.fsencode(root / first.parent.name), b"caf\xe9.png"))
    os.makedirs(os.path.join(os.fsencode(root), b"r\xe9sum\xe9"))
    shutil.copy(first, os.path.join(os.fsencode(root), b"r\xe9sum\xe9", b"x.png"))
    with caplog.at_level(logging.WARNING, logger="latentmap.data"):
        dataset = ImageFolderSource(path=str(root)).load(seed=0)
    assert len(dataset) == len(list(class_folder.rglob("*.png")))
    assert dataset.features["label"].names == sorted(p.name for p in class_folder.iterdir())
    assert "caf\\udce9.png" in caplog.text and "r\\udce9sum\\udce9" in caplog.text
    assert caplog.text.count("not valid UTF-8") == 2  # the class folder once, the file once


def test_class_folders_linked_to_the_image_folder_or_to_another_class_are_one_line(tmp_path):
    """A class folder that is a link to the image folder itself (``cat -> ..``) read every other
    class's images again as cats, and one linked to another class (``dog_alias -> dog``) read each
    dog twice, with no word; both are one line. A class linked to a folder elsewhere is read."""
    root = tmp_path / "set"
    write_class_images(root, n_per_class=3)
    elsewhere = tmp_path / "elsewhere"
    write_class_images(elsewhere, n_per_class=3)
    (root / "zz").symlink_to(elsewhere / "red", target_is_directory=True)
    loaded = data.ImageFolderSource(path=str(root)).load(seed=0)
    assert "zz" in data.class_names(loaded) and len(loaded) == 3 * len(data.class_names(loaded))
    classes = sorted(p.name for p in root.iterdir() if p.name != "zz")
    (root / "alias").symlink_to(root / classes[0], target_is_directory=True)
    with pytest.raises(ConfigError, match=rf"^class folder .*alias is a link to .*{classes[0]}, which holds images "
                                          rf"of class {classes[0]} too: they would be read in two classes"):
        data.ImageFolderSource(path=str(root)).load(seed=0)
    (root / "alias").unlink()
    (root / "loop").symlink_to(root, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"^class folder .*loop is a link to .*set, which holds the image folder .* "
                                          r"itself: every image would be read again as this class"):
        data.ImageFolderSource(path=str(root)).load(seed=0)
