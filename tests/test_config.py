"""Every option of every config group composes, and every `_target_` instantiates (no network)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, compose

REQUIRED = {
    ("model", "hf"): ["model.name=some/model"],
    ("model", "timm"): ["model.name=resnet18"],
    ("dataset", "hf"): ["dataset.name=some/dataset"],
    ("dataset", "imagefolder"): ["dataset.path=/some/dir"],
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_its_documented_options():
    assert _options("model") == ["clip", "efficientnet_lite0", "hf", "mobilenet_v2", "pixels", "resnet", "timm", "vit"]
    assert _options("dataset") == ["cifar10", "digits", "hf", "imagefolder"]
    assert _options("reducer") == ["opentsne", "pca", "tsne", "umap"]
    assert _options("tracking") == ["mlflow", "none"]


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "dataset", "reducer", "tracking",
                                                           "metrics", "plots") for o in _options(g)])
def test_option_composes_and_instantiates(group, option, tmp_path):
    cfg = compose([f"{group}={option}", *REQUIRED.get((group, option), [])], tmp_path)
    node = cfg[group]
    assert OmegaConf.missing_keys(cfg) == set()
    if group == "reducer":
        from latentmap.runner import reducer_settings

        settings = reducer_settings(node)
        assert settings.pca_dims is None and settings.fit_sample is None
        assert settings.estimator.get_params()["n_components"] == 2
    elif "_target_" in node:
        obj = instantiate(node, _convert_="all")  # constructors only store arguments
        assert type(obj).__name__ == node._target_.rsplit(".", 1)[-1]


def test_defaults(tmp_path):
    cfg = compose([], tmp_path)
    assert cfg.model._target_.endswith("EfficientNetLite0")
    assert cfg.dataset._target_.endswith("DigitsSource") and cfg.dataset.limit is None
    assert cfg.reducer._target_ == "umap.UMAP"
    assert (cfg.pool, cfg.layer, cfg.metrics.k, cfg.device) == ("embed", -1, 10, "auto")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_tutorial_preset_matches_the_notebook(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"output_dir={tmp_path}", "experiment=tutorial"],
                            return_hydra_config=True)
    assert cfg.model.name == "google/vit-base-patch16-224"
    assert cfg.dataset.name == "uoft-cs/cifar10" and cfg.dataset.split == "train[:100]"
    assert (cfg.pool, cfg.layer, cfg.seed) == ("embed", -1, 42)
    assert cfg.hydra.sweeper.params.reducer == "pca,tsne,umap"
    for reducer, expected in (("tsne", {"perplexity": 30.0}), ("umap", {"n_neighbors": 15, "min_dist": 0.1})):
        sub = compose(["experiment=tutorial", f"reducer={reducer}"], tmp_path)
        for key, value in expected.items():
            assert sub.reducer[key] == value
        assert sub.reducer.random_state == 42


def test_reducer_parameters_are_overridable(tmp_path):
    from latentmap.runner import reducer_settings

    cfg = compose(["reducer=tsne", "reducer.perplexity=5", "reducer.pca_dims=50"], tmp_path)
    settings = reducer_settings(cfg.reducer)
    assert settings.estimator.perplexity == 5 and settings.pca_dims == 50


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment, tmp_path):
    extra = {"finetune_study": ["finetuned=/some/checkpoint"]}.get(experiment, [])
    cfg = compose([f"experiment={experiment}", *extra], tmp_path)
    assert OmegaConf.missing_keys(cfg) == set()
    from hydra.utils import get_method

    assert callable(get_method(cfg.task))


def test_finetune_and_similarity_configs_compose(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        finetune = hydra_compose("finetune", overrides=[f"output_dir={tmp_path}"])
        similarity = hydra_compose("similarity", overrides=[f"output_dir={tmp_path}", "model@model_a=pixels",
                                                            "model@model_b=efficientnet_lite0"])
    optimizer = instantiate(finetune.optimizer)
    import torch

    assert isinstance(optimizer([torch.nn.Parameter(torch.zeros(1))]), torch.optim.AdamW)
    assert finetune.dataset.holdout == 0.3
    assert similarity.model_a.name == "pixels" and similarity.kind == "linear"


def test_slurm_launcher_config_takes_every_override():
    """hydra/launcher=submitit_slurm composes into the plugin's SlurmLauncher with our defaults, and
    partition, GPUs, CPUs, memory, timeout and array parallelism are all overridable."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.utils import get_class

    from conftest import CONF

    overrides = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                 "hydra.launcher.cpus_per_task=16", "hydra.launcher.mem_gb=64", "hydra.launcher.timeout_min=30",
                 "hydra.launcher.array_parallelism=8"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb,
            launcher.timeout_min, launcher.array_parallelism) == ("gpu", 4, 16, 64, 30, 8)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = hydra_compose("config", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True)
    assert default.hydra.launcher.gpus_per_node == 1 and default.hydra.launcher.array_parallelism == 16
