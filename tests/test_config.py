"""The config tree (every option of every group composes and instantiates, no network) and the
config edge: unknown keys refused, instantiating a node, a job's folders (each setting's rule: test_settings.py)."""

from __future__ import annotations

import re

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from latentmap import config
from latentmap.errors import ConfigError

from helpers import CONF, ROOT, compose

REQUIRED = {
    ("model", "hf"): ["model.name=some/model"],
    ("model", "timm"): ["model.name=resnet18"],
    ("dataset", "hf"): ["dataset.name=some/dataset"],
    ("dataset", "imagefolder"): ["dataset.path=/some/dir"],
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "dataset", "reducer", "tracking", "experiment"])
def test_the_docs_list_every_option_of_every_group(group):
    """The configuration page's table names each YAML file of a group (a new option is documented)."""
    readme = (ROOT / "docs" / "configuration.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{group}` |"))
    listed = set(re.findall(r"`([\w]+)`", row.split("|")[2]))
    missing = set(_options(group)) - listed
    assert _options(group) and not missing, f"docs/configuration.md's {group} row lacks {missing}"


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "dataset", "reducer", "tracking",
                                                           "metrics", "plots") for o in _options(g)])
def test_option_composes_and_instantiates(group, option, tmp_path):
    cfg = compose([f"{group}={option}", *REQUIRED.get((group, option), [])], tmp_path)
    node = cfg[group]
    assert OmegaConf.missing_keys(cfg) == set()
    if group == "reducer":
        from latentmap import reduce

        settings = reduce.build(node)
        assert settings.pca_dims is None and settings.fit_sample is None
        assert settings.estimator.get_params()["n_components"] == 2
    elif "_target_" in node:
        obj = instantiate(node, _convert_="all")  # constructors only store arguments, load nothing
        arguments = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
        assert {k: getattr(obj, k) for k in arguments} == arguments
        assert getattr(obj, "_model", None) is None


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

    from helpers import CONF

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


def test_instantiate_node_names_the_group_and_target_in_one_line(tmp_path):
    node = compose(["model=pixels", "+model.colour=red"], tmp_path).model
    with pytest.raises(ConfigError, match=r"^model \(latentmap.models.PixelsBackbone\): .*colour"):
        config.instantiate_node(node, "model")
    # a target that does not import: Hydra's reason is on the lines after "Error loading '...':", kept
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError) as error:
        config.instantiate_node(OmegaConf.create({"_target_": "torch.optim.SGDX"}), "optimizer")
    assert str(error.value).startswith("optimizer (torch.optim.SGDX): Error loading 'torch.optim.SGDX': ")
    assert "No module named 'torch.optim.SGDX'" in str(error.value) and "\n" not in str(error.value)


def test_outside_hydra_a_job_writes_under_output_dir(tmp_path):
    artifacts, hydra_dir = config.output_dirs(compose([], tmp_path))
    assert hydra_dir is None and artifacts.name == "artifacts" and artifacts.is_relative_to(tmp_path / "runs")


@pytest.mark.parametrize("argv,missing", [([], "model@model_a"), (["model@model_a=vit"], "model@model_b")])
def test_a_model_similarity_needs_and_was_not_given_is_one_line(argv, missing):
    """similarity.py without model@model_b printed Hydra's 20-line option list; one line names the
    choice to add and the options."""
    with pytest.raises(ConfigError) as error:
        config.check_command_line(argv, CONF, "similarity", "python scripts/similarity.py")
    assert str(error.value).startswith(f"python scripts/similarity.py needs {missing}=<option>, one of beit, clip, ")
    assert str(error.value).endswith(f"(e.g. {missing}=vit)") and "\n" not in str(error.value)
    config.check_command_line(["model@model_a=vit", "model@model_b=resnet"], CONF, "similarity", "python x.py")
    with pytest.raises(ConfigError) as error:  # run.py's key: its closest here, no preset (similarity takes none)
        config.check_command_line(["model@model_a=vit", "model@model_b=resnet", "pool=cls"], CONF, "similarity",
                                  "python x.py")
    assert "the closest known key is 'pool_" in str(error.value) and "experiment=" not in str(error.value)
    with pytest.raises(ConfigError, match="use experiment=finetune_study instead of experiment=layers"):
        config.check_command_line(["experiment=layers", "finetuned=/ckpt"], CONF, "config", "python run.py")


def test_a_key_of_another_option_of_its_group_names_that_option():
    """dataset.path with dataset=hf was "the closest known key is 'dataset.part'"; it is a key of
    dataset=imagefolder, and the line says so (and a typo still gets its closest key)."""
    cases = ((["dataset=hf", "dataset.name=x", "dataset.path=/x"],
              "dataset.path is a key of dataset=imagefolder, not of dataset=hf; "),
             (["dataset=imagefolder", "dataset.path=/x", "dataset.label_column=null"],
              "dataset.label_column is a key of dataset=cifar10 and dataset=hf, not of dataset=imagefolder; "),
             (["-m", "reducer=umap,pca", "reducer.n_neighbors=5"],  # the variant that lacks it is named
              "reducer.n_neighbors is a key of reducer=umap, not of reducer=pca; "),
             (["model=pixels", "model.checkpoint_path=/x"],  # a key an option takes from conf/common
              "model.checkpoint_path is a key of model=resnet and model=timm, not of model=pixels; "),
             (["model=pixels", "model.revision=main"], "model.revision is a key of model=beit, model=clip, "
                                                       "model=convnext, model=deit and 8 more, not of model=pixels"),
             (["dataset=imagefolder", "dataset.pathh=/x"], "the closest known key is 'dataset.path"))
    for argv, message in cases:
        with pytest.raises(ConfigError) as error:
            config.check_command_line(argv, CONF, "config", "python run.py")
        assert message in str(error.value) and ("closest" in message or "closest" not in str(error.value)), argv


@pytest.mark.parametrize("name,argv,message", [
    ("finetune", ["optimizer=sgd"], "optimizer=sgd would replace optimizer, a section of settings (_target_, "
                                    "_partial_, lr, weight_decay), with one value: set one of its keys instead, e.g. "
                                    "optimizer._target_=<a class; now torch.optim.AdamW>"),
    ("config", ["study=null"], "study=null would replace study, a section of settings (null_images, permutations, "),
])
def test_one_value_for_a_section_of_settings_is_refused_naming_its_keys(name, argv, message):
    """finetune.py optimizer=sgd ended in AttributeError: 'str' object has no attribute 'lr' and a
    FAILED run: refused on the command line, naming the section's keys."""
    with pytest.raises(ConfigError) as error:
        config.check_command_line(argv, CONF, name, "python x.py")
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize("argv,named,closest", [
    (["+reducr=pca"], "'reducr' in +reducr=pca", "'reducer'"),
    (["reducr=pca"], "'reducr' in reducr=pca", "'reducer'"),
    (["reducer.n_neighbours=5"], "'reducer.n_neighbours'", "'reducer.n_neighbors'"),
    (["+study.kk=3"], "'study.kk'", "'study.k'"),
    (["-m", "reducer=pca,umap", "reducer.n_neighbors=5"], "'reducer.n_neighbors' in reducer.n_neighbors=5 with "
     "reducer=pca", "reducer.n_neighbors is a key of reducer=umap, not of reducer=pca"),
    (["model=vitt"], "model=vitt is not an option of model", "the closest is vit"),
    (["+reducer.a.b=1"], "'reducer.a.b' in +reducer.a.b=1", "'reducer'"),
    (["-m", "model=vit,resnett"], "model=resnett is not an option of model", "the closest is resnet"),
    (["finetuned=/ckpt"], "unknown key 'finetuned' in finetuned=/ckpt",  # a preset's key, without the preset
     "finetuned is a key of a preset: add experiment=finetune_study to the command"),
    (["reducer=pca", "reducer.svd_solver=full"], "'reducer.svd_solver' in reducer.svd_solver=full",
     "svd_solver is an argument of sklearn.decomposition.PCA that the config does not list: add it with a +: "
     "+reducer.svd_solver=full"),
    (["reducer=pca", "reducer.whiten=true"], "'reducer.whiten'", "add it with a +: +reducer.whiten=true"),
    (["reducer=umap", "reducer.n_epochs=200"], "'reducer.n_epochs'", "add it with a +: +reducer.n_epochs=200"),
    (["model=timm", "model.name=vit_small_patch16_224", "model.kwargs.img_size=384"], "'model.kwargs.img_size'",
     "model.kwargs passes arguments on to the library's model: add one with a +: +model.kwargs.img_size=384"),
])
def test_a_key_or_option_latentmap_does_not_define_is_refused_naming_the_closest(argv, named, closest):
    with pytest.raises(ConfigError) as error:
        config.check_command_line(argv, CONF, "config", "python run.py")
    message = str(error.value)
    assert named in message and closest in message and "\n" not in message, message


def test_an_argument_a_model_class_does_not_take_is_refused_before_the_run():
    """+model.img_size=384 was accepted (an argument added to an instantiated node) and failed as a
    TypeError once the run had begun: refused on the command line with the class's own arguments and,
    for a timm model, the key under model.kwargs that timm.create_model takes; +model.kwargs.* and an
    argument the class does take pass."""
    with pytest.raises(ConfigError) as error:
        config.check_command_line(["model=timm", "model.name=vit_small_patch16_224", "+model.img_size=384"], CONF,
                                  "config", "python run.py")
    assert str(error.value) == ("+model.img_size=384: img_size is not an argument of latentmap.models.TimmBackbone "
                                "(its arguments: name, pretrained, checkpoint_path, preprocess_on_device, kwargs); "
                                "arguments of the library's own model go under model.kwargs: "
                                "+model.kwargs.img_size=384")
    with pytest.raises(ConfigError, match=r"^\+model.image_size=160: image_size is not an argument of "
                                          r"latentmap.models.TransformersBackbone \(its arguments: name, revision, "
                                          r"trust_remote_code, preprocess_on_device\)$"):
        config.check_command_line(["model=vit", "+model.image_size=160"], CONF, "config", "python run.py")
    with pytest.raises(ConfigError, match=r"^model.kwargs=5 would replace model.kwargs, a mapping, with one value: "
                                          r"add a key to it instead, e.g. \+model.kwargs.<name>=<value>$"):
        config.check_command_line(["model=timm", "model.name=x", "model.kwargs=5"], CONF, "config", "python run.py")
    with pytest.raises(ConfigError, match=r"^\+optimizer.momentum=0.9: momentum is not an argument of "
                                          r"torch.optim.AdamW \(its arguments: params, lr, "):
        config.check_command_line(["model=pixels", "+optimizer.momentum=0.9"], CONF, "finetune", "python x.py")
    # the target the command line gives the node is the one checked
    config.check_command_line(["model=pixels", "optimizer._target_=torch.optim.SGD", "+optimizer.momentum=0.9"],
                              CONF, "finetune", "python x.py")
    config.check_command_line(["reducer._target_=sklearn.manifold.TSNE", "+reducer.perplexity=5"], CONF, "config",
                              "python run.py")
    for hydra_own in ("+optimizer._convert_=all", "+optimizer._recursive_=false"):  # instantiate's own keys
        config.check_command_line(["model=pixels", hydra_own], CONF, "finetune", "python x.py")
    for argv in (["model=timm", "model.name=vit_small_patch16_224", "+model.kwargs.img_size=384"],
                 ["model=resnet", "+model.kwargs.drop_rate=0.1"],
                 ["reducer=umap", "+reducer.spread=1.5"]):
        config.check_command_line(argv, CONF, "config", "python run.py")


@pytest.mark.parametrize("argv,override,quoted", [
    (["dataset=imagefolder", "dataset.path=~/x"], "dataset.path=~/x", "\"dataset.path='~/x'\""),
    (["dataset=imagefolder", "dataset.path=/data/set[1]"], "dataset.path=/data/set[1]",
     "\"dataset.path='/data/set[1]'\""),
    (["-m", "dataset=imagefolder", "dataset.path=~/a,~/b"], "dataset.path=~/a,~/b",
     "\"dataset.path='~/a','~/b'\""),  # a sweep's two values, each quoted: still two jobs
    (["dataset=imagefolder", "dataset.path=/data/sp dir, v2=x"], "dataset.path=/data/sp dir, v2=x",
     "\"dataset.path='/data/sp dir, v2=x'\""),  # not a sweep: the comma is the folder's (it was quoted in two)
])
def test_a_value_hydra_cannot_read_is_one_line_with_its_quoted_form(argv, override, quoted):
    """Hydra's own message was a lexer exception with a caret and a link; the quoted form reads."""
    with pytest.raises(ConfigError) as error:
        config.check_command_line(argv, CONF, "config", "python run.py")
    message = str(error.value)
    assert message.startswith(f"{override} is not a value Hydra's override grammar can read: quote it, as {quoted}")
    assert "\n" not in message
    config.check_command_line([*argv[:-1], quoted.strip('"')], CONF, "config", "python run.py")  # reads


@pytest.mark.parametrize("argv", [["reducer.n_neighbor=5"], ["~reducer.foo"], ["dataset.trust_remote_code=true"],
                                  ["model.foo=1"]])
def test_the_plus_hint_is_only_for_an_argument_the_built_class_takes(argv):
    """A typo of a key the node has, a key to delete, or a name the class does not take (latentmap's
    own dataset and model classes) gets no + (which would add the typo, or fail when the class is built)."""
    with pytest.raises(ConfigError) as error:
        config.check_command_line(argv, CONF, "config", "python run.py")
    assert "add it with a +" not in str(error.value)


@pytest.mark.parametrize("argv", [
    ["reducer=umap", "reducer.n_neighbors=30"], ["-m", "model=vit,resnet", "reducer=tsne,umap"],
    ["model=hf", "model.name=some/model", "dataset.limit=5", "+metrics.k=3"], ["experiment=layers", "layer=3"],
    ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"], ["~reducer.min_dist"], ["~experiment"],
    ["--help"],
    ["+reducer.spread=1.5"], ["++reducer.spread=1.5"], ['reducer="pca"'], ["-m", "reducer=glob(*)"],
    ["-m", "seed=interval(0,1)"], ["--config-name", "finetune", "epochs=1"],
])
def test_keys_latentmap_defines_pass_the_check(argv):
    config.check_command_line(argv, CONF, "config", "python run.py")


@pytest.mark.parametrize("argv, message", [
    (["~seed"], "~seed deletes the setting seed, which latentmap reads: set it instead (e.g. seed=42, its value now)"),
    (["~metrics.k"], "~metrics.k deletes the setting metrics.k, which latentmap reads: set it instead (e.g. "
                     "metrics.k=10"),
    (["~audit.enabled"], "set it instead (e.g. audit.enabled=true, its value now)"),
    (["~audit"], "~audit deletes the config group audit, which latentmap reads: choose one of its options instead "
                 "(audit=<option>: default)"),
    (["audit=null"], "audit=null is not an option of audit: choose one (default), or leave audit out of the command"),
    (["-m", "reducer=pca,null"], "reducer=null is not an option of reducer: choose one (opentsne, pca, tsne, umap)"),
    (["~reducer.repeats"], "set it instead (e.g. reducer.repeats=1, its value now)"),  # latentmap's, in a _target_
    (["dataset=imagefolder", "dataset.path=x", "~dataset.on_error"], "(e.g. dataset.on_error=skip, its value now)"),
    (["~data_seed"], "set it instead (e.g. data_seed='${seed}', its value now)"),  # as the config writes it
    (["~audit.against"], "(e.g. audit.against=null, its value now)"),
    (["~study"], "~study deletes the settings under study, which latentmap reads: leave it out, or set one of them"),
    (["dataset=imagefolder", "dataset.path=/tmp/lm-images", "output_dir=/tmp/lm-images/"],
     "output_dir='/tmp/lm-images/' is the image folder dataset.path reads: its runs' plots would be read back"),
])
def test_deleting_a_setting_or_emptying_a_group_is_one_line(argv, message):
    """``~metrics.k`` (a setting every run reads) ran into a KeyError traceback after its MLflow run
    had started, ``~reducer.repeats`` and ``~dataset.on_error`` (latentmap's own keys inside a node
    with a ``_target_``) too, ``~audit`` and ``audit=null`` into Hydra's tracebacks. Deleting an
    estimator's own argument (``~reducer.min_dist``: the library's default) and the optional
    ``experiment`` still pass. An output_dir that is the image folder is refused here too, before
    Hydra makes its run folder in it."""
    with pytest.raises(ConfigError) as error:
        config.check_command_line(argv, CONF, "config", "python run.py")
    assert message in str(error.value)


def test_deleting_a_group_another_config_does_not_have_is_one_line():
    """The fine-tuning config has no audit group: ``~audit`` says so rather than that it is read."""
    with pytest.raises(ConfigError, match=r"~audit: python scripts/finetune.py's config has no group audit"):
        config.check_command_line(["~audit"], CONF, "finetune", "python scripts/finetune.py")


def test_run_py_refuses_an_unknown_key_in_one_line_before_any_run_exists(tmp_path):
    """Hydra's own hint for a mistyped key is ``+reducr=pca``, which used to run a FINISHED UMAP run
    with ``reducr`` logged as a param; a sweep left an empty parent. Now: exit 1, one line, nothing."""
    from helpers import run_script

    for argv in (["run.py", f"output_dir={tmp_path}", "+reducr=pca"],
                 ["run.py", "-m", f"output_dir={tmp_path}", "reducer=pca,umap", "+reducr=pca"]):
        code, out = run_script(argv, tmp_path)
        assert code == 1 and out.strip().splitlines() == [
            "error: unknown key 'reducr' in +reducr=pca: the closest known key is 'reducer'; "
            "`python run.py --cfg job` prints every key"], out
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store, no parent run


@pytest.mark.parametrize("value,message", [
    ("''", r"^output_dir='' is empty: set it, e.g. output_dir=outputs$"),  # Hydra wrote /runs, /mlflow.db ...
    ("null", r"^output_dir is null: set it"),  # a folder named None was made
    ("{file}", r"^output_dir='.*/a-file' is a file, not a folder: choose a folder"),
    ("{file}/below", r"^output_dir='.*/a-file/below' cannot be made \(.*/a-file is not a folder\): choose a "
                     r"writable"),
])
def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_hydra_makes_one(value, message, tmp_path):
    """output_dir is where Hydra makes its run folder, before any check of the run: refused on the
    command line, in a sweep too, and nothing is made; a folder that is not there yet, one spelled
    with '..' and one Hydra fills in pass, and a folder already there is left as it was."""
    (tmp_path / "a-file").write_text("x")
    value = value.format(file=tmp_path / "a-file")
    for argv in ([f"output_dir={value}"], ["-m", f"output_dir={tmp_path / 'good'},{value}"]):
        with pytest.raises(ConfigError, match=message):
            config.check_command_line(argv, CONF, "config", "python run.py")
    for swept in (f"output_dir={tmp_path / 'a'},{tmp_path / 'b'}", "tracking.uri=sqlite:///a.db,sqlite:///b.db"):
        key = swept.split("=")[0]  # the parent run went to ./outputs, and 0 of 0 jobs finished
        with pytest.raises(ConfigError, match=rf"^{key} cannot vary within a sweep \(.*\): a sweep's jobs and "
                                              rf"its parent run share one MLflow store; run one sweep for each {key}$"):
            config.check_command_line(["-m", swept], CONF, "config", "python run.py")
    (tmp_path / "kept").mkdir()
    for good in (tmp_path / "new" / "deeper", f"{tmp_path}/ghost/../kept/x", "'/scratch/${oc.env:USER}/runs'"):
        config.check_command_line([f"output_dir={good}"], CONF, "config", "python run.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "kept"] and not list((tmp_path / "kept").iterdir())
