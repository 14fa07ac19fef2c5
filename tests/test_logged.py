"""latentmap.logged: a finished run read back from MLflow (its arrays, its images, its score
tables), checked against the dataset it came from, and a one-line error for each way it can fail."""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentmap import data, logged
from latentmap.errors import ConfigError
from latentmap.runner import run

from helpers import compose, mlflow_runs


@pytest.fixture(scope="module")
def finished_run(class_folder, tmp_path_factory):
    """(run id, tracking URI, the run's image folder): a PCA run of raw pixels over a copy of the
    four-class folder, scored on 5 half-samples."""
    root = tmp_path_factory.mktemp("logged")
    folder = Path(shutil.copytree(class_folder, root / "images"))
    out = root / "out"
    run(compose(["model=pixels", "reducer=pca", "dataset=imagefolder", f"dataset.path={folder}", "metrics.k=5",
                 "metrics.bootstrap=5", "metrics.probe=false", "plots.enabled=false"], out))
    _, (finished,) = mlflow_runs(out)
    return finished.info.run_id, f"sqlite:///{out}/mlflow.db", folder


def test_a_run_reads_back_with_the_dataset_s_indices_labels_and_images(finished_run):
    run_id, uri, folder = finished_run
    found = logged.load(run_id, uri)
    classes = sorted(p.name for p in folder.iterdir())
    assert found.class_names == classes and found.labelled
    assert found.coords.shape == (32, 2) and found.embeddings.shape[0] == 32
    records = data.undecoded(found.dataset())["image"]  # loaded again from the logged config, checked
    for row in (0, 13, 31):
        path = Path(records[row]["path"])
        assert classes[found.labels[row]] == path.parent.name  # each row's label is its folder's
        assert found.row_of(int(found.indices[row])) == row
        assert found.caption(row) == f"{path.parent.name} #{found.indices[row]}"
        (thumbnail,) = found.thumbnails([row])
        np.testing.assert_array_equal(thumbnail, np.asarray(Image.open(path).convert("RGB")))  # 32 px: as is
    assert "outlier_score" in found.extra and len(found.extra["outlier_score"]) == 32


def test_the_score_tables_hold_each_image_and_each_half_sample(finished_run):
    from mlflow.tracking import MlflowClient

    run_id, uri, _ = finished_run
    client = MlflowClient(tracking_uri=uri)
    per_image, tags = logged.score_table(client, run_id)
    found = logged.load(run_id, uri)
    assert len(per_image) == 32 and sorted(per_image["index"]) == sorted(found.indices.tolist())
    assert tags["cache"] in ("hit", "miss")
    values, halves = logged.halves_table(client, run_id)
    metrics = client.get_run(run_id).data.metrics
    assert values.loc["knn_acc_hd", "value"] == pytest.approx(metrics["knn_acc_hd"])
    assert len(halves) == 5 and "knn_acc_hd" in halves.columns


def _one_line(call, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as raised:
        call()
    assert "\n" not in str(raised.value)


def test_images_changed_in_place_since_the_run_are_named(finished_run, caplog):
    """Same names, same labels, other pixels (an image rewritten in place): the pictures would show
    today's files beside the run's numbers, so reading the dataset back warns; unchanged, it does not."""
    import os

    run_id, uri, folder = finished_run
    found = logged.load(run_id, uri)
    assert found.fingerprint
    with caplog.at_level("WARNING", logger="latentmap.logged"):
        found.dataset()
        # A run with dataset.max_image_pixels set tags the fingerprint with the limit after a |.
        dataclasses.replace(found, fingerprint=f"{found.fingerprint}|max_image_pixels=5000").dataset()
    assert "changed or moved" not in caplog.text
    image = next((folder / "red").iterdir())
    before, stat = image.read_bytes(), image.stat()
    try:
        Image.new("RGB", (8, 8), (1, 2, 3)).save(image, format="PNG")
        with caplog.at_level("WARNING", logger="latentmap.logged"):
            logged.load(run_id, uri).dataset()
        assert f"the images of run {run_id} have changed or moved since it ran" in caplog.text
    finally:
        image.write_bytes(before)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_renamed_class_folder_is_refused_not_shown_under_the_old_name(finished_run):
    """red/ renamed rose/ keeps every label number (classes are numbered in sorted order), so the
    indices and labels matched and neighbors.py captioned red images with the run's class names
    beside today's files: the changed classes are one line."""
    run_id, uri, folder = finished_run
    (folder / "red").rename(folder / "rose")
    try:
        found = logged.load(run_id, uri)
        _one_line(found.dataset, rf"^the classes of run {run_id}'s dataset changed since it ran \(red no longer "
                                 r"there\): a class folder was renamed, added or removed")
    finally:
        (folder / "rose").rename(folder / "red")
    assert len(logged.load(run_id, uri).dataset()) == 32


def test_each_way_to_fail_is_one_line(finished_run, tmp_path):
    from mlflow.tracking import MlflowClient

    run_id, uri, folder = finished_run
    _one_line(lambda: logged.load("no-such-run", uri), r"run 'no-such-run' is not in .* \(pass --tracking-uri\)")
    found = logged.load(run_id, uri)
    _one_line(lambda: found.row_of(999), r"--index 999 is not an image of run .*: its dataset indices run 0\.\.31")
    gappy = dataclasses.replace(found, indices=np.array([16, 25, 31, 40, 52, 77, 1796]))  # a sample of the dataset
    _one_line(lambda: gappy.row_of(17), r"its dataset indices are 7 of 16\.\.1796, e.g. 16, 25, 31, 40, 52 "
                                        r"\(7 images\)")  # "run 16..1796" read as every index between
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("latentmap").experiment_id
    bare = client.create_run(experiment).info.run_id
    client.set_terminated(bare, "FINISHED")  # finished, but without what a mapping run logs (an older latentmap)
    # no artifact at all: its folder moved or removed (it said "runs of an older latentmap lack" them)
    for read in (lambda: logged.load(bare, uri), lambda: logged.score_table(client, bare),
                 lambda: logged.halves_table(client, bare)):
        _one_line(read, rf"^run {bare} has no artifacts where its store says they are \(.*\): the folder was moved "
                        "or removed; put it back there, or run it again$")
    client.log_text(bare, "x", "notes.txt")  # artifacts, not a mapping run's
    _one_line(lambda: logged.load(bare, uri), "has no arrays/ or config.yaml artifacts")
    _one_line(lambda: logged.score_table(client, bare), "has no tables/per_image.csv")
    _one_line(lambda: logged.halves_table(client, bare), "has no tables/halves.csv: compare needs runs scored on "
                                                         "half-samples; runs made before half-sample intervals")
    client.log_param(bare, "metrics.bootstrap", "0")
    _one_line(lambda: logged.halves_table(client, bare), "it was made with metrics.bootstrap=0, which scores no "
                                                         "half-sample: run it again with metrics.bootstrap=30")
    client.delete_run(run_id)  # compare.py and export.py read a deleted run without a word
    try:
        for read in (lambda: logged.load(run_id, uri), lambda: logged.score_table(client, run_id)):
            _one_line(read, rf"^run {run_id} was deleted \(it is in MLflow's trash\): restore it")
    finally:
        client.restore_run(run_id)
    # A failed run, a run still going and a comparison run say what they are (compare.py called a
    # failed run one of "an older latentmap").
    failed = client.create_run(experiment, tags={"error": "ValueError: boom"}).info.run_id
    client.set_terminated(failed, "FAILED")
    going = client.create_run(experiment).info.run_id
    comparison = client.create_run(experiment, tags={"latentmap.role": "compare"}).info.run_id
    client.set_terminated(comparison, "FINISHED")
    # A study run with arrays/ and config.yaml of its own (export.py and neighbors.py failed on its
    # missing embeddings.npy in a traceback)
    study = client.create_run(experiment, tags={"latentmap.role": "finetune_study"}).info.run_id
    client.log_text(study, "model: {}\n", "config.yaml")
    client.log_text(study, "[]", "arrays/cka.json")
    client.set_terminated(study, "FINISHED")
    for read in (lambda r: logged.load(r, uri), lambda r: logged.score_table(client, r),
                 lambda r: logged.halves_table(client, r)):
        _one_line(functools.partial(read, failed), rf"^run {failed} is FAILED \(ValueError: boom\): pass a finished")
        _one_line(functools.partial(read, going), rf"^run {going} is RUNNING: pass a finished run$")
        _one_line(functools.partial(read, comparison), rf"^run {comparison} is a comparison run, not a mapping run")
    _one_line(lambda: logged.load(study, uri), rf"^run {study} is a fine-tuning study run, not a mapping run")
    for run_id_ in (bare, failed, going, comparison, study):
        client.delete_run(run_id_)
    moved = next((folder / "red").iterdir())  # the dataset changed since the run: refused, not mislabelled
    shutil.move(moved, tmp_path / moved.name)
    try:
        _one_line(lambda: logged.load(run_id, uri).dataset(), "no longer matches the run's logged indices and labels")
    finally:
        shutil.move(tmp_path / moved.name, moved)
