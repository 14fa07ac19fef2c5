"""Every setting has one rule (latentmap.settings) and one default (a file in conf/), and a bad value
is one line naming the key, the value and the fix, whichever command's config holds it."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from latentmap import settings
from latentmap.docs import yaml_keys
from latentmap.errors import ConfigError

from helpers import CONF, ROOT, compose


def _compose(name: str, overrides: list[str], tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(name, overrides=[f"output_dir={tmp_path}", *overrides])


SIMILARITY = ["model@model_a=pixels", "model@model_b=pixels"]


def test_an_empty_run_name_is_still_the_automatic_name(tmp_path):
    settings.check(compose(["tracking.run_name="], tmp_path))  # '' as null: named from what the job varies


@pytest.mark.parametrize("overrides,message", [
    (["batch_size=0"], r"^batch_size=0 must be a positive integer \(e.g. batch_size=64\)$"),
    (["seed=abc"], r"^seed='abc' must be an integer in \[0, 2147483647\] \(e.g. seed=42\)$"),
    (["seed=99999999999999"], r"^seed=99999999999999 must be an integer in \[0, 2147483647\]"),  # not random_state's
    (["num_workers=-1"], "num_workers=-1 must be an integer >= 0"),
    (["device=tpu"], "device='tpu' is not a device: use auto, cpu, cuda, cuda:<index> or mps"),
    (["precision=fp8"], "precision='fp8' is not a precision: choose one of fp32, bf16, fp16"),
    (["pool=max"], "pool='max' is not a pooling: choose one of embed, cls, mean"),
    (["layer=last"], r"layer='last' must be an integer \(e.g. layer=-1\)"),
    (["resume=maybe"], "resume='maybe' is not a boolean: use true or false"),
    (["plots.dpi=0"], r"plots.dpi=0 must be an integer >= 10 \(e.g. plots.dpi=120\)"),
    (["plots.dpi=3"], "plots.dpi=3 must be an integer >= 10"),  # matplotlib's fonts fail below (a traceback)
    (["plots.max_thumbnails=-1"], "plots.max_thumbnails=-1 must be an integer >= 0"),
    (["plots.map_max_points=1"],
     r"plots.map_max_points=1 must be an integer >= 2 \(e.g. plots.map_max_points=1000000\)"),
    (["plots.map_max_mb=5"], r"plots.map_max_mb=5 must be a number >= 10 \(e.g. plots.map_max_mb=60\)"),
    (["plots.map_max_mb=nan"], r"plots.map_max_mb=nan must be a number >= 10"),
    (["plots.map_thumbnails=many"], "plots.map_thumbnails='many' must be an integer >= 0"),
    (["study.permutations=-1"], "study.permutations=-1 must be an integer >= 0"),
    (["study.max_images=4"], "study.max_images=4 must be an integer >= 8"),
    (["metrics.distance=manhattan"], "metrics.distance='manhattan' is not a geometry: choose one of cosine, euclidean"),
    (["metrics.k=0"], "metrics.k=0 must be a positive integer"),
    (["metrics.folds=1"], "metrics.folds=1 must be an integer >= 2"),
    (["metrics.bootstrap=-1"], "metrics.bootstrap=-1 must be an integer >= 0"),
    (["metrics.bootstrap=1"], "metrics.bootstrap=1 cannot give an interval: use at least 2 half-samples"),
    (["metrics.confidence=95"], r"metrics.confidence=95 must be a number in \(0, 1\) \(e.g. metrics.confidence=0.95\)"),
    (["metrics.confidence=true"], "metrics.confidence=True must be a number"),
    (["metrics.knn_weighted_k=0"], "metrics.knn_weighted_k=0 must be a positive integer"),
    (["metrics.knn_temperature=-1"], r"metrics.knn_temperature=-1 must be a number > 0 \(e.g. metrics.knn_temperature"),
    (["metrics.probe=yes"], "metrics.probe='yes' is not a boolean"),
    (["metrics.max_points=2"], r"metrics.max_points=2 must be an integer >= 3 \(e.g. metrics.max_points=20000, or "
                               r"null: score every image\)"),
    (["metrics.exact_neighbours=0"], r"metrics.exact_neighbours=0 must be a positive integer \(e.g. "
                                     r"metrics.exact_neighbours=20000, or null: always exact\)"),
    (["dataset.holdout=1.0"], r"dataset.holdout=1.0 must be a number in \[0, 1\)"),
    (["dataset.part=test"], "dataset.part='test' is not a part: choose one of all, train, holdout"),
    (["dataset.on_error=ignore"], "dataset.on_error='ignore' is not a way to handle an unreadable image"),
    (["dataset.max_image_pixels=-5"], "dataset.max_image_pixels=-5 must be a positive integer"),
    (["dataset.limit=0"], "dataset.limit=0 must be a positive integer"),
    (["dataset.shard=half"], r"dataset.shard='half' is not a shard: use i/n"),
    (["reducer.repeats=0"], "reducer.repeats=0 must be a positive integer"),
    (["reducer.pca_dims=1"], "reducer.pca_dims=1 must be an integer >= 2"),
    (["reducer.n_components=3"], "reducer.n_components=3 must be an integer equal to 2"),
    (["model.preprocess_on_device=yes"], "model.preprocess_on_device='yes' is not a boolean: use true or false or nu"),
    (["model=pixels", "model.size=0"], "model.size=0 must be a positive integer"),
    (["tracking.uri=/data/mlruns"], r"tracking.uri='/data/mlruns' is a folder, and MLflow 3 no longer writes its "
                                    r"folder store: use a database file, e.g. tracking.uri=sqlite:////data/mlruns/mlflow"),
    (["tracking.uri=file:./mlruns"], r"tracking.uri='file:./mlruns' is a folder.*sqlite:///./mlruns/mlflow.db"),
    # a database file's path without sqlite:/// was called a folder, with mlflow.db added to it
    (["tracking.uri=/data/runs/mlflow.db"], r"^tracking.uri='/data/runs/mlflow.db' names a database file without its "
                                            r"scheme: write it as tracking.uri=sqlite:////data/runs/mlflow.db \("),
    (["dataset.intensity_range=[4095,0]"], r"^dataset.intensity_range=\[4095, 0\] must be two numbers \[low,high\] "
                                           r"with low < high"),
    (["tracking.experiment="], r"tracking.experiment='' is empty: set it, e.g. tracking.experiment=latentmap"),
    # an empty path was the current folder: the repository read as images, a cache or artifacts written there
    (["cache_dir="], r"^cache_dir='' is empty: set it, e.g. cache_dir="),
    (["dataset=imagefolder", "dataset.path="],
     r"^dataset.path='' is empty: set it, e.g. dataset.path=/data/my_images$"),
    (["dataset=imagefolder", "dataset.path=null"], r"^dataset.path is null: set it"),
    (["audit.against=' '"], r"^audit.against=' ' is empty: set it.*or null: no leakage check"),
    (["tracking.artifact_location="], r"^tracking.artifact_location='' is empty"),
    (["model=hf", "model.name="], r"^model.name='' is empty"),
    (["seed=2147483648"], r"^seed=2147483648 must be an integer in \[0, 2147483647\]"),  # seed + r of a repeat: 32 bits
    (["tracking=none", "tracking.enabled=true"], r"^tracking.enabled=true needs tracking.uri, which is null "
                                                 r"\(tracking=none\): use tracking=mlflow"),
    # a key the chosen config leaves required (???), not given: one line, not OmegaConf's traceback
    (["model=hf"], r"^model.name is required and has no default: add model.name=\.\.\. to the command "
                   r"\(a Hugging Face hub id, a timm name, or a local folder of saved weights\)$"),
    (["model=timm"], r"^model.name is required and has no default"),
    (["dataset=imagefolder"], r"^dataset.path is required and has no default: add dataset.path=\.\.\. to the "
                              r"command \(a folder of images"),
])
def test_a_bad_value_is_one_line_naming_the_key_the_value_and_the_fix(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as raised:
        settings.check(compose(overrides, tmp_path))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("uri", ["databricks", "databricks-uc", "databricks://profile", "sqlite:///x.db",
                                 "http://127.0.0.1:5000", "postgresql://u@h/db"])
def test_every_store_mlflow_3_writes_passes(uri, tmp_path):
    settings.check(compose([f"tracking.uri={uri}"], tmp_path))


def test_a_folder_store_passes_where_mlflow_is_told_to_allow_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    settings.check(compose(["tracking.uri=/data/mlruns"], tmp_path))


@pytest.mark.parametrize("name,overrides,message", [
    ("finetune", ["seed=-1"], r"seed=-1 must be an integer in \[0, 2147483647\]"),
    ("finetune", ["epochs=0"], "epochs=0 must be a positive integer"),
    ("finetune", ["optimizer.lr=0"], "optimizer.lr=0 must be a number > 0"),
    ("finetune", ["frozen_layers=-2"], "frozen_layers=-2 must be an integer >= 0"),
    ("finetune", ["dataset.part=test"], "dataset.part='test' is not a part"),
    ("similarity", [*SIMILARITY, "k=0"], "k=0 must be a positive integer"),
    ("similarity", [*SIMILARITY, "null_images=3"], "null_images=3 must be an integer >= 8"),
    ("similarity", [*SIMILARITY, "kind=rbf"], "kind='rbf' is not a kind of CKA: choose one of linear, debiased"),
    ("similarity", [*SIMILARITY, "pool_a=embed"], "pool_a='embed' is not a block pooling"),
    ("similarity", [*SIMILARITY, "model_b.size=0"], "model_b.size=0 must be a positive integer"),
    ("similarity", ["model@model_a=pixels", "model@model_b=hf"], r"^model_b.name is required and has no default"),
    ("finetune", ["model=hf"], r"^model.name is required and has no default"),
])
def test_every_command_s_config_is_checked_by_the_same_rules(name, overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        settings.check(_compose(name, overrides, tmp_path))


def test_the_default_configs_every_option_and_every_rule_s_example_pass(tmp_path):
    for name, overrides in (("config", []), ("finetune", []), ("similarity", SIMILARITY),
                            ("config", ["experiment=finetune_study", "finetuned=x"])):
        settings.check(_compose(name, overrides, tmp_path))
    for group in ("model", "dataset", "reducer", "tracking", "metrics", "plots"):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            # an option's required keys (???, model.name of model=hf) given, as its user must
            required = [f"{key}=x" for key in OmegaConf.missing_keys(compose([f"{group}={option}"], tmp_path))]
            settings.check(compose([f"{group}={option}", *required], tmp_path))
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        settings.check(compose([f"device={device}", "precision=bf16", "dataset.shard=0/4"], tmp_path))
    for key, setting in settings.SETTINGS.items():
        example = OmegaConf.create(f"value: {setting.example}").value if setting.kind != "text" else setting.example
        setting.check(key, example)  # the example a message shows is itself valid
        if setting.null:
            setting.check(key, None)


def _own_keys() -> dict[str, str]:
    """Every key path latentmap itself reads from a config file, with the file that sets it:
    the shared files (conf/common), the run-level keys, metrics, plots, and the other commands' own."""
    found = {}
    prefixes = {"dataset": "dataset.", "reducer": "reducer.", "model": "model.", "transformers": "model.",
                "timm": "model.", "panel": "study."}
    for path in sorted((CONF / "common").glob("*.yaml")):
        for key, _, _ in yaml_keys(path.read_text()):
            found[prefixes.get(path.stem, "") + key] = str(path.relative_to(ROOT))
    for path, prefix in ((CONF / "config.yaml", ""), (CONF / "metrics" / "default.yaml", "metrics."),
                         (CONF / "plots" / "default.yaml", "plots."), (CONF / "finetune.yaml", ""),
                         (CONF / "similarity.yaml", ""), (CONF / "experiment" / "finetune_study.yaml", "")):
        for key, _, _ in yaml_keys(path.read_text()):
            found[prefix + key] = str(path.relative_to(ROOT))
    for group in ("tracking",):
        for path in sorted((CONF / group).glob("*.yaml")):
            for key, _, _ in yaml_keys(path.read_text()):
                found[f"{group}.{key}"] = str(path.relative_to(ROOT))
    return {key: where for key, where in found.items() if not key.split(".")[-1].startswith("_")}


def test_every_setting_latentmap_reads_has_a_rule():
    own = _own_keys()
    library = {"dataset.holdout"}  # finetune.yaml's own default of a dataset key (checked as dataset.holdout)
    missing = sorted(f"{key} ({where})" for key, where in own.items() if key not in settings.SETTINGS
                     and key not in library)
    assert not missing, f"keys without a rule in latentmap.settings: {missing}"
    assert len(own) > 60


def test_no_setting_s_default_is_written_twice():
    """A latentmap setting's default is in one config file: the conf/ files are scanned for a key with
    a rule whose value is written in two files (shared keys live in conf/common/), and the code for
    ``.get("<setting>", <value>)`` fallbacks (allowed only to read a run logged before the key existed,
    marked ``# logged before the key``)."""
    prefixes = {"common/dataset": "dataset.", "common/model": "model.", "common/transformers": "model.",
                "common/timm": "model.", "common/reducer": "reducer.", "common/panel": "study.",
                "metrics/default": "metrics.", "plots/default": "plots."}
    written: dict[tuple[str, str], list[str]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        name = str(path.relative_to(CONF).with_suffix(""))
        if name.startswith(("hydra", "tracking/none")):  # Hydra's own; tracking=none's nulls turn tracking off
            continue
        group = name.split("/")[0] if "/" in name else ""
        prefix = prefixes.get(name, f"{group}." if group in ("model", "dataset", "reducer", "tracking") else "")
        for key, value, _ in yaml_keys(path.read_text()):
            written.setdefault((prefix + key, value), []).append(name)
    twice = {key: files for key, files in written.items()  # ??? (a required key) is no default
             if len(files) > 1 and key[0] in settings.SETTINGS and key[1] != "???"}
    assert not twice, f"defaults written in more than one file: {twice}"
    leaves = {key.rsplit(".", 1)[-1] for key in settings.SETTINGS}
    fallbacks = []
    for path in sorted((ROOT / "src" / "latentmap").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for key, value in re.findall(r"\.get\(\s*\"(\w+)\"\s*,\s*([^)\s][^)]*)\)", line):
                if key in leaves and value.strip() != "None" and "# logged before the key" not in line:
                    fallbacks.append(f"{path.name}:{number}: {line.strip()}")
    assert not fallbacks, f"a setting's default written again in code: {fallbacks}"


def test_python_callers_get_the_config_files_defaults(tmp_path):
    from latentmap import data

    composed = compose([], tmp_path).dataset
    source = data.DigitsSource()
    for key in settings.DATASET:
        assert getattr(source, key) == composed[key], key
    # PIL's own default, read in a fresh interpreter (a run in this process sets PIL's global limit)
    import subprocess
    import sys

    fresh = subprocess.run([sys.executable, "-c", "from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"],
                           capture_output=True, text=True, check=True).stdout
    assert data.PIL_MAX_IMAGE_PIXELS == int(fresh)


def test_a_rule_s_words_in_the_reference():
    assert settings.SETTINGS["metrics.confidence"].rule() == "number in (0, 1)"
    assert settings.SETTINGS["dataset.holdout"].rule() == "number in [0, 1)"
    assert settings.SETTINGS["metrics.max_points"].rule() == "integer >= 3; null: score every image"
    assert settings.SETTINGS["precision"].rule() == "fp32 \\| bf16 \\| fp16"


def test_a_required_key_is_asked_for_in_its_own_words(tmp_path):
    """The one line that asks for a required key says what that key holds: a dataset's name is not
    a model (dataset=hf without dataset.name read 'a timm name, or a local folder of saved weights')."""
    with pytest.raises(ConfigError, match=r"^dataset.name is required and has no default: add dataset.name=\.\.\. "
                                          r"to the command \(a Hugging Face dataset id, or a folder written by "
                                          r"save_to_disk\)$"):
        settings.check(compose(["dataset=hf"], tmp_path))


def test_an_output_dir_that_is_an_image_folder_a_run_reads_is_refused(tmp_path):
    """output_dir equal to dataset.path (written with a trailing slash) or to audit.against is refused
    naming the key; a folder beside them, or a path of a user that does not exist, is left to the run."""
    images = tmp_path / "images"
    for key, node in (("dataset.path", {"dataset": {"path": f"{images}/"}}),
                      ("audit.against", {"audit": {"against": str(images)}})):
        with pytest.raises(ConfigError, match=rf"output_dir='{images}' is the image folder {key} reads"):
            settings.output_beside_images(OmegaConf.create({"output_dir": str(images), **node}))
    settings.output_beside_images(OmegaConf.create({"output_dir": str(tmp_path / "outputs"),
                                                    "dataset": {"path": str(images)}}))
    settings.output_beside_images(OmegaConf.create({"output_dir": "~nosuchuser-lm/out",
                                                    "dataset": {"path": "~nosuchuser-lm/images"}}))
