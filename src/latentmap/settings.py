"""Every setting's rule, defined once: its type, allowed values, what null means, and an example.

The defaults live in one place too, the config files (``conf/``; keys several configs share are in
``conf/common/``). This table says what a value may be. :func:`check` applies it to a composed config
before any work or MLflow run exists (:func:`latentmap.task.tracked_task`), so a bad value is one
line naming the key, the value and the fix; functions that take a setting as an argument check it
against the same rule with :func:`require`. The configuration reference (``docs/reference``) is
generated from this table and the config files.

Keys a group option passes on to a library (``reducer.n_neighbors`` to UMAP, ``dataset.split`` to
``datasets``) have no row here: the library checks them, and :func:`latentmap.config.instantiate_node`
turns its error into one line.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from latentmap.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (an editable install)


@dataclass(frozen=True)
class Setting:
    """What one key may hold. ``kind``: int, number, bool, choice, pattern, text, list or mapping."""

    kind: str
    example: str  # a valid value, for messages and the reference
    minimum: float | None = None
    maximum: float | None = None
    open: str = ""  # which bounds are themselves not allowed: "", "low", "high" or "both"
    choices: tuple[str, ...] = ()
    what: str = ""  # a choice's or pattern's noun ("a precision")
    pattern: str | None = None  # a pattern kind's regular expression
    use: str = ""  # a pattern kind's fix ("use auto, cpu, cuda ...")
    null: str = ""  # what null means; empty: null is not allowed
    blank: bool = False  # a text kind: whether '' is allowed (as null is)
    also: Callable[[str, Any], None] | None = None  # a further rule, raising ConfigError

    def rule(self) -> str:
        """The rule in words, for the reference."""
        if self.kind == "int":
            text = "integer" + _bounds(self)
        elif self.kind == "number":
            text = "number" + _bounds(self)
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = " \\| ".join(self.choices)
        elif self.kind == "pattern":
            text = self.use.removeprefix("use ")
        elif self.kind == "list":
            text = "a list"
        elif self.kind == "mapping":
            text = "a mapping of names to values"
        else:
            text = "text"
        return text + (f"; null: {self.null}" if self.null else "")

    def check(self, key: str, value: Any) -> Any:
        """``value`` if it obeys the rule, else a ConfigError line naming the key, the value and the fix."""
        if value is None and self.null:
            return value
        example = f"e.g. {key}={self.example}" + (f", or null: {self.null}" if self.null else "")
        if self.kind in ("int", "number"):
            is_int = isinstance(value, int) and not isinstance(value, bool)
            is_number = is_int or (isinstance(value, float) and math.isfinite(value))
            if not (is_int if self.kind == "int" else is_number) or not _within(self, value):
                noun = "an integer" if self.kind == "int" else "a number"
                if self.kind == "int" and self.minimum == 1 and self.maximum is None:
                    wanted = "a positive integer"
                else:
                    wanted = noun + _bounds(self)
                raise ConfigError(f"{key}={value!r} must be {wanted} ({example})")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                allowed = "true or false" + (" or null" if self.null else "")
                raise ConfigError(f"{key}={value!r} is not a boolean: use {allowed} ({example})")
        elif self.kind == "choice":
            if value not in self.choices:
                raise ConfigError(f"{key}={value!r} is not {self.what}: choose one of {', '.join(self.choices)}")
        elif self.kind == "pattern":
            if not isinstance(value, str) or not re.fullmatch(self.pattern, value):
                raise ConfigError(f"{key}={value!r} is not {self.what}: {self.use} ({example})")
        elif self.kind == "mapping":
            if not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"{key}={value!r} is not a mapping of names to values ({example})")
        elif value is None and not self.null:
            raise ConfigError(f"{key} is null: set it, {example}")
        elif self.kind == "text" and not self.blank and not str(value).strip():  # a path '' is the current folder
            raise ConfigError(f"{key}={value!r} is empty: set it, {example}")
        if self.also is not None:
            self.also(key, value)
        return value


def _bounds(setting: Setting) -> str:
    low, high = setting.minimum, setting.maximum
    low_open, high_open = setting.open in ("low", "both"), setting.open in ("high", "both")
    if low is not None and high is not None:
        if low == high:
            return f" equal to {_num(low)}"
        return f" in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_num(high)}"
    return ""


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _within(setting: Setting, value: float) -> bool:
    low, high = setting.minimum, setting.maximum
    low_open, high_open = setting.open in ("low", "both"), setting.open in ("high", "both")
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _not_one(key: str, value: int) -> None:
    if value == 1:
        raise ConfigError(f"{key}=1 cannot give an interval: use at least 2 half-samples, e.g. {key}=30, "
                          "or 0: no intervals")


def count(example: int, minimum: int = 1, null: str = "") -> Setting:
    return Setting("int", str(example), minimum=minimum, null=null)


def flag(example: bool = True, null: str = "") -> Setting:
    return Setting("bool", str(example).lower(), null=null)


def text(example: str, null: str = "") -> Setting:
    return Setting("text", example, null=null)


# numpy's and scikit-learn's seeds are 32-bit: a larger seed was refused later, named as the reducer's;
# below 2^31, so that seed + r of a map's r-th repeat stays one
SEED_MAX = 2**31 - 1
_SEED = Setting("int", "42", minimum=0, maximum=SEED_MAX)
_POOLS = ("embed", "cls", "mean")
RUN = {  # conf/common/run.yaml: every command
    "seed": _SEED,
    "device": Setting("pattern", "cuda:0", what="a device", pattern=r"auto|cpu|mps|cuda(:\d+)?",
                      use="use auto, cpu, cuda, cuda:<index> or mps"),
    "num_workers": count(4, 0, null="automatic: from 1,000 images on, where processes start by fork, one a CPU "
                                    "core, at most 4"),
    "output_dir": text("outputs"),
    "reuse_freed_memory": flag(False),
}
EXTRACT = {  # conf/common/extract.yaml: every command that extracts embeddings
    "batch_size": count(64),
    "precision": Setting("choice", "bf16", choices=("fp32", "bf16", "fp16"), what="a precision"),
    "cache_dir": text("/scratch/latentmap-cache"),
}
PANEL = {  # conf/common/panel.yaml: the similarity panel (study.* in run.py, top level in similarity.py)
    "null_images": count(500, 8),
    "permutations": count(200, 0),
    "bootstrap": count(100, 0),
    "k": count(10),
}
MAPPING = {  # conf/config.yaml's own keys
    "task": text("latentmap.runner.run"),
    "data_seed": _SEED, "reducer_seed": _SEED, "cv_seed": _SEED,
    "layer": Setting("int", "-1"),
    "pool": Setting("choice", "mean", choices=_POOLS, what="a pooling"),
    "resume": flag(),
    "optimized_metric": text("probe_acc"),
    "study.max_images": count(1000, 8),
}
# metrics.refit_map=null fits a t-SNE, UMAP or other non-PCA map again on each half-sample up to this
# many scored images: 30 fits of at most 1,000 images (times reducer.repeats), the default run's
# metric stage 35-42 s longer for its UMAP on 2 slow cores (docs/calibration.md). Above, each fit
# costs more and the map is held fixed.
REFIT_MAPS_UP_TO = 2_000
METRICS = {  # conf/metrics/default.yaml
    "distance": Setting("choice", "euclidean", choices=("cosine", "euclidean"), what="a geometry"),
    "k": count(10),
    "folds": count(5, 2),
    "max_points": count(20000, 3, null="score every image"),
    "exact_neighbours": count(20000, 1, null="always exact"),
    "bootstrap": Setting("int", "30", minimum=0, also=_not_one),
    "confidence": Setting("number", "0.95", minimum=0, maximum=1, open="both"),
    "refit_map": flag(null=f"refit PCA maps on each half-sample, and t-SNE, UMAP and other maps up to "
                                   f"{REFIT_MAPS_UP_TO:,} scored images where the reducer can fit half of them; "
                                   "hold them fixed otherwise"),
    "knn_weighted_k": count(20),
    "knn_temperature": Setting("number", "0.07", minimum=0, open="low"),
    "probe": flag(),
}
PLOTS = {  # conf/plots/default.yaml
    "enabled": flag(), "map": flag(),
    "max_thumbnails": count(400, 0), "grid_images": count(40, 0),
    "dpi": count(120, 10),  # below, matplotlib's font engine fails to draw the text
    "neighbours": count(8), "neighbour_queries": count(6, 0), "outliers": count(16, 0),
    "map_max_points": count(1000000, 2), "map_thumbnails": count(20000, 0),
    "map_max_mb": Setting("number", "60", minimum=10),  # Plotly's JavaScript alone is 5 MB
}
AUDIT = {  # conf/audit/default.yaml
    "enabled": flag(), "per_class": flag(), "label_issues": flag(), "duplicates": flag(), "clusters": flag(),
    "label_filter": Setting("choice", "both", choices=("prune_by_noise_rate", "prune_by_class", "both",
                                                       "confident_learning", "predicted_neq_given"),
                            what="a cleanlab filter"),
    "duplicate_ratio": Setting("number", "0.4", minimum=0, maximum=1, open="low"),
    "against": text("/data/holdout_images", null="no leakage check"),
    "cluster_dimensions": count(10, 2),
    "min_cluster_size": count(20, 2, null="1% of the scored images, at least 5"),
    "mixed_purity": Setting("number", "0.6", minimum=0, maximum=1),
    "shown": count(24, 0),
}
def _templates(key: str, value: Any) -> None:
    templates = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ConfigError(f"{key}={value!r} must be a list of prompt templates, each with one {{}} for the class "
                          f"name (e.g. {key}=\"['a photo of a {{}}.']\")")


def _intensity_range(key: str, value: Any) -> None:
    pair = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    numbers = pair is not None and len(pair) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
    if not numbers or not pair[0] < pair[1]:
        raise ConfigError(f"{key}={value!r} must be two numbers [low,high] with low < high, the values read as black "
                          f"and white (e.g. {key}=[0,4095] for a 12-bit camera, {key}=[-1000,1000] for CT), or null")


ZEROSHOT = {  # conf/zeroshot/default.yaml
    "enabled": flag(),
    "templates": Setting("list", "['a photo of a {}.', 'a drawing of a {}.']", also=_templates),
}
DATASET = {  # conf/common/dataset.yaml: every dataset option
    "limit": count(500, null="every image"),
    "holdout": Setting("number", "0.3", minimum=0, maximum=1, open="high"),
    "part": Setting("choice", "holdout", choices=("all", "train", "holdout"), what="a part"),
    "on_error": Setting("choice", "raise", choices=("skip", "raise"), what="a way to handle an unreadable image"),
    "max_image_pixels": count(200000000, null="no limit"),
    "intensity_range": Setting("list", "[0,4095]", also=_intensity_range,
                               null="by the image's mode: 0..65,535 for 16- and 32-bit integers, 0..1 for floats"),
    "shard": Setting("pattern", "0/4", what="a shard", pattern=r"\s*\d+\s*/\s*\d+\s*",
                     use="use i/n, the i-th of n slices (0 <= i < n)", null="extract every image"),
}
SOURCES = {  # one dataset option's own keys (an empty path was the current folder)
    "path": text("/data/my_images"),  # dataset=imagefolder
    "name": text("uoft-cs/cifar10"),  # dataset=hf
}
REDUCER = {  # conf/common/reducer.yaml: every reducer option
    "n_components": Setting("int", "2", minimum=2, maximum=2),  # latentmap draws and scores 2-D maps
    "random_state": Setting("int", "0", minimum=0, maximum=SEED_MAX, null="unseeded (not reproducible)"),
    "pca_dims": count(50, 2, null="no PCA step"),
    "fit_sample": count(20000, 3, null="fit on every image"),
    "repeats": count(5),
}
MODEL = {  # conf/common/{model,transformers,timm}.yaml, and model=pixels
    "preprocess_on_device": flag(null="on CUDA when the preprocessing can run there"),
    "trust_remote_code": flag(False),
    "pretrained": flag(),
    "checkpoint_path": text("weights/model.safetensors", null="the library's own weights"),
    "revision": text("main"),
    "size": count(32),
    "name": text("google/vit-base-patch16-224"),
    "kwargs": Setting("mapping", "{img_size:384}"),  # timm.create_model's own arguments
}
def _a_store(key: str, value: Any) -> None:
    """An MLflow store MLflow 3 writes (:func:`latentmap.tracking.store.refuse_folder_store`)."""
    from latentmap.tracking.store import refuse_folder_store

    if value is not None:
        refuse_folder_store(str(value), key)


TRACKING = {  # conf/tracking/*.yaml
    "enabled": flag(),
    "uri": Setting("text", "http://127.0.0.1:5000", null="no tracking", also=_a_store),
    "artifact_location": text("outputs/mlartifacts", null="no tracking"),
    "experiment": text("latentmap", null="no tracking"),
    "run_name": Setting("text", "baseline", null="named from what the job varies", blank=True),  # '' as null
}
FINETUNE = {  # conf/finetune.yaml's own keys
    "epochs": count(3), "frozen_layers": count(4, 0),  # batch_size: the same rule as extraction's
    "head_lr_multiplier": Setting("number", "10", minimum=0, open="low"),
    "optimizer.lr": Setting("number", "1e-4", minimum=0, open="low"),
    "optimizer.weight_decay": Setting("number", "0.01", minimum=0),
    "name": text("vit-cifar10", null="<model>-<source>-seed<seed>"),
    "overwrite": flag(),
    "checkpoint_dir": text("outputs/checkpoints"),
}
SIMILARITY = {  # conf/similarity.yaml's own keys
    "pool_a": Setting("choice", "cls", choices=("mean", "cls"), what="a block pooling"),
    "pool_b": Setting("choice", "cls", choices=("mean", "cls"), what="a block pooling"),
    "kind": Setting("choice", "debiased", choices=("linear", "debiased"), what="a kind of CKA"),
    "max_images": count(2000, 8),
}
STUDY = {  # conf/experiment/finetune_study.yaml
    "finetuned": text("outputs/checkpoints/vit-cifar10-seed42"),
    "study_pool": Setting("choice", "cls", choices=("mean", "cls"), what="a block pooling"),
}


def _prefixed(prefix: str, table: dict[str, Setting]) -> dict[str, Setting]:
    return {f"{prefix}{key}": setting for key, setting in table.items()}


# Every key path of the three configs (run.py, finetune.py, similarity.py) with a rule.
SETTINGS: dict[str, Setting] = {
    **RUN, **EXTRACT, **MAPPING, **PANEL, **_prefixed("study.", PANEL), **_prefixed("metrics.", METRICS),
    **_prefixed("plots.", PLOTS), **_prefixed("audit.", AUDIT), **_prefixed("dataset.", DATASET),
    **_prefixed("dataset.", SOURCES),
    **_prefixed("zeroshot.", ZEROSHOT),
    **_prefixed("reducer.", REDUCER),
    **_prefixed("model.", MODEL), **_prefixed("model_a.", MODEL), **_prefixed("model_b.", MODEL),
    **_prefixed("tracking.", TRACKING), **FINETUNE, **SIMILARITY, **STUDY,
}


def require(key: str, value: Any) -> Any:
    """``value`` checked against the rule of ``key`` (a path of :data:`SETTINGS`)."""
    return SETTINGS[key].check(key, value)


def _value(cfg: DictConfig, path: str) -> tuple[bool, Any]:
    """(whether ``cfg`` sets ``path`` to a value, the value)."""
    node: Any = cfg
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False, None
        node = node._get_node(part)
    if not isinstance(node, DictConfig) or parts[-1] not in node.keys() or OmegaConf.is_missing(node, parts[-1]):
        return False, None
    return True, node[parts[-1]]


def _required(key: str) -> str:
    """What a required key (``???`` in conf/) holds, for the one line that asks for it."""
    group, _, last = key.rpartition(".")
    if group.startswith("model") and last == "name":  # model.name, model_a.name, model_b.name
        return "a Hugging Face hub id, a timm name, or a local folder of saved weights"
    if group == "dataset" and last == "name":
        return "a Hugging Face dataset id, or a folder written by save_to_disk"
    if last == "path":
        return "a folder of images: <class>/<image> files, or flat"
    if key == "finetuned":
        return "a checkpoint folder written by scripts/finetune.py"
    return "its value"


def check(cfg: DictConfig) -> None:
    """Every setting ``cfg`` defines, against its rule; keys a config does not have are not checked
    (the fine-tuning config has no ``plots``). A model's own keys are checked where the node is
    latentmap's (``model.size`` of the pixels baseline). A key the chosen configs leave required
    (``???``: ``model.name`` of model=hf) and the command does not set is refused first."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        what = _required(key)
        also = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(f"{key} is required and has no default{also}: add {key}=... to the command ({what})")
    for path, setting in SETTINGS.items():
        found, value = _value(cfg, path)
        if found:
            setting.check(path, value)
    enabled, on = _value(cfg, "tracking.enabled")
    for key in ("tracking.uri", "tracking.experiment"):  # null in tracking=none, which turns tracking off
        if enabled and on and _value(cfg, key) == (True, None):
            example = "sqlite:///outputs/mlflow.db" if key == "tracking.uri" else "latentmap"
            raise ConfigError(f"tracking.enabled=true needs {key}, which is null (tracking=none): use "
                              f"tracking=mlflow, or set it, e.g. {key}={example}")
    output_beside_images(cfg)


def output_beside_images(cfg: DictConfig) -> None:
    """``output_dir`` must not be an image folder a run reads (``dataset.path``, ``audit.against``)
    itself: its runs' plots would be read back as images (a class ``mlartifacts``), and the mark
    every command leaves in its ``output_dir`` would refuse the folder afterwards. Refused before
    the mark is made (and, where the command line sets both, before Hydra makes its run folder)."""
    import os

    found, output = _value(cfg, "output_dir")
    if not (found and isinstance(output, str) and output):
        return
    for key in ("dataset.path", "audit.against"):
        there, images = _value(cfg, key)
        if not (there and isinstance(images, str) and images):
            continue
        folder = Path(os.path.expanduser(images)).resolve()  # os.path: ~nosuchuser stays as written
        if Path(os.path.expanduser(output)).resolve() == folder:
            raise ConfigError(f"output_dir={output!r} is the image folder {key} reads: its runs' plots would be "
                              f"read back as images. Set it to a folder outside it, e.g. "
                              f"output_dir={folder.parent / 'outputs'}")


@functools.cache
def defaults(name: str) -> dict[str, Any]:
    """The defaults written in ``conf/common/<name>.yaml``, for Python callers that build an object
    without a config (``ImageFolderSource(path=...)``): the config file stays their one definition."""
    node = OmegaConf.load(CONF_DIR / "common" / f"{name}.yaml")
    return {key: value for key, value in OmegaConf.to_container(node).items() if key != "defaults"}
