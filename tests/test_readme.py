"""Every command README.md gives a user: composed by Hydra (each job of each sweep), and run as
written, on tiny data, when it works offline. A README command can no longer fail as written.

Each command has one entry in ``HOW`` saying how it is tested; a command added to the README without
an entry, or an entry whose command left the README, fails ``test_every_readme_command_is_accounted_for``.

* ``run``: run below, in this process (exactly ``python <script> <args>``, through Hydra for the
  Hydra mains), in a scratch folder as the working directory, with ``TINY`` appended (keys the
  command sets itself are left as written) and ``../shared`` pointing at the real assets.
* ``test::<name>``: run by that test, with the same flags on tiny data.
* ``hub``, ``cluster``, ``server``, ``suite``, ``bench``: need the network, a SLURM cluster, a
  tracking server, are the test suite itself, or are the benchmarks (minutes each, measured by hand,
  figures in the README; ``test_bench_commands`` runs them under ``-m slow``), or ``figure``: the
  command behind a README figure on the real assets (minutes; its smaller twin runs as ``run``).
  Every Hydra command among them is still composed, job by job.
"""

from __future__ import annotations

import ast
import json
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict

from helpers import CONF, ROOT, SHARED, mlflow_runs, requires_shared, sweep_runs, tiny_shared, write_class_images
from readme_commands import commands

HOW = {
    'pip install -e ".[dev]" && python run.py':
        "test::test_readme.py::test_readme_default_runs_a_folder_and_the_audit",
    "python -m pytest": "suite",
    "python run.py --help": "test::test_readme.py::test_help_says_what_latentmap_does",
    "mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db": "server",
    "mkdocs serve": "server",
    "python run.py -m reducer=pca,umap model=efficientnet_lite0,pixels": "run",
    "python run.py -m reducer=tsne,umap model=vit,resnet": "hub",
    "python run.py -m experiment=tutorial": "hub",
    "python run.py model=vit layer=5 pool=cls": "hub",
    "python run.py -m model=mobilenet_v2 pool=mean layer='range(0,16)' reducer=pca": "hub",
    "python run.py -m hydra/launcher=joblib hydra.launcher.n_jobs=4 reducer=tsne,umap layer='range(0,12)' pool=cls "
    "model=vit": "hub",
    "python run.py -m reducer=tsne,umap model=vit,resnet resume=true": "hub",
    "mlflow server --host <server-host> --port 5000 --backend-store-uri sqlite:////shared/mlflow.db "
    "--artifacts-destination /shared/mlartifacts": "server",
    "python run.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 "
    "hydra.launcher.cpus_per_task=8 hydra.launcher.mem_gb=32 hydra.launcher.timeout_min=120 "
    "hydra.launcher.array_parallelism=16 cache_dir=/shared/latentmap-cache tracking.uri=http://<server-host>:5000 "
    "reducer=tsne,umap model=vit,resnet": "cluster",
    "python run.py -m model=vit pool=cls layer='range(0,12)' reducer=pca,umap": "hub",
    "python run.py -m experiment=layers": "hub",
    "python run.py -m experiment=layers model=efficientnet_lite0 pool=mean layer='range(0,5)'": "run",
    "python scripts/report.py <parent run id>": "run",
    "python scripts/report.py latentmap": "run",
    "python scripts/report.py \"params.pool = 'mean' and params.choice.reducer = 'umap'\"": "run",
    "python scripts/compare.py <run A> <run B>": "run",
    "python scripts/compare.py <run A> \"params.choice.model = 'pixels' and params.choice.reducer = 'umap'\" "
    "--confidence 0.99": "run",
    "python scripts/similarity.py model@model_a=vit model@model_b=resnet dataset=cifar10 pool_a=cls": "hub",
    "python scripts/similarity.py model@model_a=efficientnet_lite0 model@model_b=hf "
    "model_b.name=../shared/models/mobilenet_v2_1.0_224 kind=debiased dataset.limit=1000": "run",
    "python scripts/finetune.py model=hf model.name=../shared/models/mobilenet_v2_1.0_224 dataset=imagefolder "
    "dataset.path=../shared/data/cifar10-test dataset.limit=1000 dataset.holdout=0.5 epochs=2 name=mnv2-cifar": "run",
    "python run.py experiment=finetune_study finetuned=outputs/checkpoints/mnv2-cifar": "run",
    "python scripts/neighbors.py <run id> --index 42 --k 8": "run",
    "python scripts/export.py projector <run id> outputs/projector": "run",
    "python scripts/export.py parquet <run id> outputs/run.parquet": "run",
    "python scripts/export.py atlas <run id> outputs/atlas.parquet": "run",
    "embedding-atlas outputs/atlas.parquet --x x --y y --neighbors neighbors":
        "test::test_export.py::test_embedding_atlas_opens_the_export_in_a_browser",
    "python run.py audit.duplicate_ratio=0.3 audit.label_filter=both": "run",
    "python run.py dataset=imagefolder dataset.path=/data/train audit.against=/data/test": "run",
    "python run.py -m experiment=layers model=hf model.name=../shared/models/mobilenet_v2_1.0_224 pool=mean "
    "layer='range(0,16)' reducer=pca dataset=imagefolder dataset.path=../shared/data/cifar10-test "
    "dataset.limit=1000 plots.enabled=false": "figure",
    "python run.py model=hf model.name=facebook/dinov2-small dataset=hf dataset.name=uoft-cs/cifar100 "
    "\"dataset.split='test[:2000]'\" dataset.image_column=img dataset.label_column=fine_label": "hub",
    "python run.py dataset=imagefolder dataset.path=/data/my_images": "run",
    "python run.py tracking.uri=http://127.0.0.1:5000":
        "test::test_server.py::test_sweep_against_a_server_then_a_server_down",
    "mlflow server --host 127.0.0.1 --backend-store-uri sqlite:///outputs/mlflow.db": "server",
    "python scripts/runs.py cleanup": "run",
    "python -m pytest -m slow": "suite",
    "python -m pytest -m gpu": "suite",
    "mlflow server": "server",
    "python scripts/bench.py": "bench",
    "python scripts/bench.py --only scoring --full": "bench",
    "python scripts/bench.py --only per-class --replications 200": "bench",
    "python scripts/bench.py --only scale --full --baseline fa313e6": "bench",
    "python scripts/bench.py --only scale --full --baseline 67227f8": "bench",
    "python scripts/bench.py --only scale --full --baseline 67e71c9": "bench",
    "python scripts/bench.py --only scale --full --baseline 70f14bd": "bench",
    "python scripts/bench.py --only scale --full --baseline 7ea8f7b": "bench",
    "python scripts/bench.py --only scale --full --baseline 816e378": "bench",
    "python scripts/bench.py --only scale --full --baseline 0d16dae": "bench",
    "python scripts/bench.py --only scale --full --baseline 7264391": "bench",
    "python scripts/bench.py --only scale --full --baseline eadb504": "bench",
    "python scripts/bench.py --only scale --full --baseline a765466": "bench",
    "python scripts/bench.py --only scale --baseline a765466": "bench",
    "python scripts/bench.py --only refit": "bench",
    "python scripts/bench.py --only refit-run --full": "bench",
    "python scripts/bench.py --only refit-run": "bench",
    "python scripts/bench.py --only refit-workers": "bench",
    "python scripts/bench.py --only refit-threads": "bench",
    "python scripts/bench.py --only workers": "bench",
    "python scripts/bench.py --only decode": "bench",
    "python scripts/bench.py --only allocator": "bench",
    "python scripts/bench_search.py": "bench",
    "python scripts/bench_search.py --methods faiss-hnsw faiss-hnsw-sq8 faiss-hnsw-fp16 faiss-hnsw-pca128": "bench",
    "python scripts/bench_search.py --methods faiss-hnsw faiss-nndescent": "bench",
    "python scripts/bench_search.py --methods faiss-hnsw-top faiss-hnsw faiss-hnsw-top faiss-hnsw": "bench",
    "python scripts/bench.py --only extract sweep cache tsne metrics --full": "bench",
    "python scripts/bench.py --only trust": "bench",
    "python scripts/bench.py --only scale --full": "bench",
    "python scripts/bench.py --only extract": "bench",
    "python scripts/bench.py --only gpu-preprocess": "bench",
    "python scripts/bench.py --only nulls": "bench",
    "python scripts/bench.py --only jit": "bench",
    "python scripts/bench.py --only neighbours map --full": "bench",
    "python scripts/bench.py --only million": "bench",
    "python scripts/bench.py --only transform --full": "bench",
    "python scripts/bench.py --only transform": "bench",
    "python scripts/bench.py --only umap-fit": "bench",
    "python scripts/bench.py --only calibration": "bench",
    "python scripts/bench.py --only calibration --map fixed --coverage-only": "bench",
    "python scripts/bench.py --only calibration --map fixed --coverage-only --sizes 300 1000 5000 --replications 100 "
    "--mixtures mixture-hard": "bench",
    "python scripts/bench.py --only calibration --map umap --replications 100 --mixtures mixture-hard": "bench",
    "python scripts/bench.py --only calibration --map tsne --replications 40 --mixtures mixture-hard": "bench",
    "python scripts/bench.py --only calibration --map tsne --hold-map --replications 100 "
    "--mixtures mixture-hard": "bench",
    "python scripts/bench.py --only calibration --mixtures mixture-imbalanced features:<arrays of the CIFAR-10 "
    "MobileNetV2 run> mixture-many --replications 100 --run-only --calibration-seed 11": "bench",
    "python scripts/bench.py --only protocols": "bench",
    "python run.py model=hf model.name=../shared/models/mobilenet_v2_1.0_224 dataset=imagefolder "
    "dataset.path=../shared/data/cifar10-test reducer=pca metrics.bootstrap=0 metrics.probe=false "
    "plots.enabled=false audit.enabled=false": "run",
    "python scripts/bench.py --only audit": "bench",
    "python scripts/bench.py --only compare": "bench",
    "python -m latentmap.docs": "test::test_docs.py::test_the_generated_pages_are_up_to_date",
    "python scripts/bench.py --only scale": "bench",
    "python run.py -m hydra/launcher=submitit_slurm hydra.launcher.gpus_per_node=1 hydra.launcher.array_parallelism=16 "
    "cache_dir=/shared/latentmap-cache tracking.uri=http://<server-host>:5000 model=vit dataset=imagefolder "
    "dataset.path=/shared/images precision=bf16 dataset.shard=0/4,1/4,2/4,3/4": "cluster",
    "python run.py model=vit dataset=imagefolder dataset.path=/shared/images precision=bf16 "
    "cache_dir=/shared/latentmap-cache reducer=umap reducer.fit_sample=20000": "hub",
    "python scripts/bench_cache.py": "bench",
    "python run.py -m experiment=layers model=hf model.name=../shared/models/mobilenet_v2_1.0_224 pool=mean "
    "layer='range(0,16)' reducer=pca dataset=imagefolder dataset.path=../shared/data/cifar10-test "
    "dataset.limit=1000 plots.map=false": "figure",
    "python run.py metrics.probe=false metrics.bootstrap=0": "run",
    "python run.py metrics.probe=false": "run",
    "python run.py": "run",
    "/usr/bin/time -v python run.py -m reducer=tsne,umap model=efficientnet_lite0,pixels": "bench",
}
# How many jobs each sweep of the README runs (the commands that start so; any other: one).
JOBS = {
    "python run.py -m reducer=tsne,umap model=vit,resnet": 4,
    "python run.py -m experiment=tutorial": 3,  # the preset sweeps pca, tsne, umap
    "python run.py -m model=mobilenet_v2 pool=mean layer='range(0,16)'": 16,
    "python run.py -m hydra/launcher=joblib": 24,
    "python run.py -m hydra/launcher=submitit_slurm hydra.launcher.partition": 4,
    "python run.py -m hydra/launcher=submitit_slurm hydra.launcher.gpus_per_node=1 hydra.launcher.array": 4,
    "python run.py -m model=vit pool=cls layer='range(0,12)' reducer=pca,umap": 24,
    "python run.py -m experiment=layers model=efficientnet_lite0": 10,
    "python run.py -m experiment=layers model=hf": 16,
    "python run.py -m experiment=layers": 24,  # the preset: layer range(0,12) x reducer pca,umap
    "/usr/bin/time -v python run.py -m reducer=tsne,umap model=efficientnet_lite0,pixels": 4,
    "python run.py -m reducer=pca,umap model=efficientnet_lite0,pixels": 4,
}
HYDRA_MAINS = {"run.py": "config", "scripts/finetune.py": "finetune", "scripts/similarity.py": "similarity"}
# Tiny data and no optional work: 100 digits (t-SNE's perplexity 30 needs more than 90), no plots,
# no intervals, no linear probe, a few permutations and resamples for the studies' nulls. A key the
# command sets itself keeps the command's value, except dataset.limit, which is always the tiny one
# (but for the fine-tuning study, which reads its images from the checkpoint's record).
TINY = ["dataset.limit=100", "plots.enabled=false", "metrics.bootstrap=5", "metrics.probe=false",
        "study.permutations=20", "study.bootstrap=10"]


def _args(command: str) -> list[str]:
    """The argv of a command's python part (after ``&&``, without ``/usr/bin/time -v``), from the script on."""
    words = shlex.split(command.split("&&")[-1])
    return words[words.index("python") + 1:] if "python" in words else []


def _placeholders(word: str, shared: Path = SHARED) -> str:
    return word.replace("<server-host>", "127.0.0.1").replace("../shared", str(shared))


@pytest.fixture(autouse=True)
def _no_hydra_state_left():
    """A Hydra main run in this process leaves its HydraConfig behind: clear it for the next tests."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None


def test_every_readme_command_is_accounted_for():
    """Every command of the README and the documentation pages (a command the README repeats from a
    page is one entry) has a way it is tested, and every entry is still written somewhere."""
    listed = commands()
    assert set(listed) == set(HOW), (sorted(set(listed) - set(HOW)), sorted(set(HOW) - set(listed)))
    for _command, how in HOW.items():
        assert how in ("run", "hub", "cluster", "server", "suite", "bench", "figure") or how.startswith("test::"), how
        if how.startswith("test::"):  # the test named exists
            file, name = how.removeprefix("test::").split("::")
            tree = ast.parse((ROOT / "tests" / file).read_text())
            assert name in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}, how


def hydra_jobs(command: str) -> tuple[list, int]:
    """(job configs, number of jobs) of a Hydra command, composed the way Hydra's basic sweeper
    composes them: the multirun checks, the sweep expansion (command-line sweeps over the preset's
    sweeper params) and one config per job (the first, middle and last job of a larger sweep)."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    script, *rest = _args(command)
    multirun = "-m" in rest
    overrides = [_placeholders(a) for a in rest if a != "-m" and not a.startswith("--")]  # --help: no override
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(HYDRA_MAINS[script], overrides,
                                           run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN)
        if not multirun:
            return [master], 1
        params = master.hydra.sweeper.get("params") or {}
        parsed = OverridesParser.create().parse_overrides(
            [f"{key}={value}" for key, value in params.items()] + list(master.hydra.overrides.task))
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
        picked = jobs if len(jobs) <= 4 else [jobs[0], jobs[len(jobs) // 2], jobs[-1]]  # composing is ~0.1 s a job
        return [loader.load_sweep_config(master, list(job)) for job in picked], len(jobs)


@pytest.mark.parametrize("command", [c for c in HOW if _args(c) and _args(c)[0] in HYDRA_MAINS])
def test_every_hydra_command_composes_job_by_job(command):
    from hydra.utils import get_method

    jobs, count = hydra_jobs(command)
    assert count == next((n for start, n in JOBS.items() if command.startswith(start)), 1), command
    for job in jobs:
        with open_dict(job):
            del job["hydra"]
        OmegaConf.to_container(job, resolve=True)  # every interpolation resolves
        assert callable(get_method(job.task)) if "task" in job else True


def test_help_says_what_latentmap_does(monkeypatch, capsys):
    """``python run.py --help``: what latentmap does, its config groups and example commands."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "run.py"), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None) and out.startswith("latentmap maps what a vision model has learned")
    groups = out.split("== Config groups")[1].split("\n==")[0]
    assert "\ncommon:" not in groups  # conf/common holds included files, not options to pick
    for group in ("dataset", "experiment", "model", "reducer", "tracking"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in groups
    examples = [line for line in out.split("== Examples ==")[1].splitlines() if line.startswith("python run.py")]
    assert len(examples) >= 3
    offline, hub = out.split("== Examples ==")[1].split("Need the Hugging Face hub")  # each command marked
    assert "Offline:" in offline and "model=vit" not in offline and "model=vit" in hub
    for example in examples:  # each example composes
        hydra_jobs(example.split("  ")[0])


def test_the_composition_check_refuses_what_hydra_refuses():
    """The README's old layer-study command, which Hydra refused when run: the check refuses it too."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Sweeping over Hydra's configuration is not supported"):
        hydra_jobs("python run.py -m experiment=layers model=efficientnet_lite0 pool=mean "
                   "hydra.sweeper.params.layer='range(0,5)'")


def _run(script_args: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """``python <script> <args>`` in this process, in ``cwd``; its stderr. A non-zero exit fails."""
    script = ROOT / script_args[0]
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(script), *script_args[1:]])
    capsys.readouterr()
    try:
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, (script_args, err[-3000:])
    return err


def _tiny(command: str, shared: Path = SHARED, **ids: str) -> list[str]:
    for placeholder, run_id in ids.items():
        command = command.replace(f"<{placeholder.replace('_', ' ')}>", run_id)
    args = [_placeholders(a, shared) for a in _args(command)]
    if args[0] not in HYDRA_MAINS:
        return args
    args = [a for a in args if not a.startswith("dataset.limit=")]
    keys = {a.split("=")[0] for a in args}
    tiny = TINY if args[0] == "run.py" else TINY[:1]  # finetune and similarity configs have no plots or metrics
    if any(a.startswith("experiment=finetune_study") for a in args):  # its images are the fine-tuning's held-out
        tiny = [t for t in tiny if not t.startswith("dataset.")]      # ones, from its record: dataset.* is refused
    return args + [t for t in tiny if t.split("=")[0] not in keys]


class Session:
    """Run README commands as written, in one working folder, and read their MLflow runs back."""

    def __init__(self, tmp_path: Path, monkeypatch, capsys, shared: Path = SHARED) -> None:
        """``shared``: the folder ``../shared`` stands for (the real assets, or a tiny stand-in)."""
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.monkeypatch, self.capsys, self.ran, self.shared = monkeypatch, capsys, [], shared

    def run(self, command: str, **ids: str) -> str:
        assert HOW[command] == "run", command
        self.ran.append(command)
        return _run(_tiny(command, self.shared, **ids), self.work, self.monkeypatch, self.capsys)

    def run_filled(self, command: str, filled: dict[str, str]) -> str:
        """A command whose placeholder folders (``/data/...``) are filled with real ones."""
        assert HOW[command] == "run", command
        self.ran.append(command)
        args = _tiny(command)
        for placeholder, folder in filled.items():
            args = [a.replace(placeholder, folder) for a in args]
        return _run(args, self.work, self.monkeypatch, self.capsys)

    def ids(self) -> set:
        outputs = self.work / "outputs"
        return {r.info.run_id for r in mlflow_runs(outputs)[1]} if outputs.exists() else set()

    def finished(self, before: set) -> list:
        _, runs = mlflow_runs(self.work / "outputs")
        new = [r for r in runs if r.info.run_id not in before]
        assert new and all(r.info.status == "FINISHED" for r in new), [(r.info.run_name, r.info.status) for r in new]
        return new


# The README's and the docs' "run" commands, in four tests that xdist can run side by side; each
# test runs its own commands in the pages' order, where one needs another's runs.
LAYERS = ("python run.py -m experiment=layers model=efficientnet_lite0 pool=mean layer='range(0,5)'",
          "python scripts/report.py <parent run id>", "python scripts/report.py latentmap",
          "python scripts/report.py \"params.pool = 'mean' and params.choice.reducer = 'umap'\"")
SWEEP = ("python run.py -m reducer=pca,umap model=efficientnet_lite0,pixels",
         "python scripts/compare.py <run A> <run B>",
         "python scripts/compare.py <run A> \"params.choice.model = 'pixels' and params.choice.reducer = 'umap'\" "
         "--confidence 0.99", "python scripts/export.py projector <run id> outputs/projector",
         "python scripts/export.py parquet <run id> outputs/run.parquet",
         "python scripts/export.py atlas <run id> outputs/atlas.parquet", "python scripts/runs.py cleanup")
DEFAULT = ("python run.py", "python run.py metrics.probe=false",
           "python run.py metrics.probe=false metrics.bootstrap=0",
           "python run.py dataset=imagefolder dataset.path=/data/my_images",
           "python scripts/neighbors.py <run id> --index 42 --k 8",
           "python run.py audit.duplicate_ratio=0.3 audit.label_filter=both",
           "python run.py dataset=imagefolder dataset.path=/data/train audit.against=/data/test")
# The calibration's real population (docs/calibration.md): a run whose arrays the bench draws from.
CIFAR_POPULATION = ("python run.py model=hf model.name=../shared/models/mobilenet_v2_1.0_224 dataset=imagefolder "
                    "dataset.path=../shared/data/cifar10-test reducer=pca metrics.bootstrap=0 metrics.probe=false "
                    "plots.enabled=false audit.enabled=false")
REAL = ("python scripts/similarity.py model@model_a=efficientnet_lite0 model@model_b=hf "
        "model_b.name=../shared/models/mobilenet_v2_1.0_224 kind=debiased dataset.limit=1000",
        "python scripts/finetune.py model=hf model.name=../shared/models/mobilenet_v2_1.0_224 dataset=imagefolder "
        "dataset.path=../shared/data/cifar10-test dataset.limit=1000 dataset.holdout=0.5 epochs=2 name=mnv2-cifar",
        "python run.py experiment=finetune_study finetuned=outputs/checkpoints/mnv2-cifar",
        CIFAR_POPULATION)


def test_the_four_tests_run_every_run_command():
    assert sorted(LAYERS + SWEEP + DEFAULT + REAL) == sorted(c for c, how in HOW.items() if how == "run")


def test_readme_layer_study_and_its_reports(tmp_path, monkeypatch, capsys):
    session = Session(tmp_path, monkeypatch, capsys)
    before = session.ids()
    session.run(LAYERS[0])
    parents, children = sweep_runs(session.finished(before))
    assert len(parents) == 1 and len(children) == 10
    client = mlflow_runs(session.work / "outputs")[0]
    linked = Path(client.download_artifacts(parents[0].info.run_id, "compare.html")).read_text()
    titles = re.findall(r'<div class="lm-title">(.*?)</div>', linked)  # first, middle, last block of one reducer
    assert [re.search(r"layer=(\d+)", t)[1] for t in titles] == ["0", "2", "4"], titles
    assert len({re.search(r"reducer=(\w+)", t)[1] for t in titles}) == 1 and titles[0].startswith("A: ")
    report = Path(client.download_artifacts(parents[0].info.run_id, "report.html")).read_text()
    assert 'id="linked"' in report and "/artifacts/compare.html" in report
    original = pd.read_csv(client.download_artifacts(parents[0].info.run_id, "summary.csv"))
    for command in LAYERS[1:]:  # each report regenerates the parent's summary in a new run
        before = session.ids()
        session.run(command, parent_run_id=parents[0].info.run_id)
        (report_run,) = session.finished(before)
        assert report_run.data.tags["latentmap.role"] == "report"
        assert (session.work / "outputs" / "reports" / report_run.info.run_id / "summary.csv").is_file()
        regenerated = pd.read_csv(client.download_artifacts(report_run.info.run_id, "summary.csv"))
        if "umap" in command:  # the filter picks one reducer's five runs
            assert sorted(regenerated["layer_index"]) == [0, 1, 2, 3, 4], regenerated
        else:  # by id and by experiment: every run of the sweep, the same summary
            pd.testing.assert_frame_equal(original, regenerated)
    assert session.ran == list(LAYERS)
    from latentmap.commands import report

    with pytest.raises(SystemExit, match="neither a run id, an experiment nor a valid filter"):
        report.main(["params.pool = = 'mean'", "--tracking-uri", f"sqlite:///{session.work}/outputs/mlflow.db"])


def test_readme_sweep_compare_and_exports(tmp_path, monkeypatch, capsys):
    session = Session(tmp_path, monkeypatch, capsys)
    work = session.work
    before = session.ids()
    session.run(SWEEP[0])
    parents, children = sweep_runs(session.finished(before))
    assert len(children) == 4
    client = mlflow_runs(work / "outputs")[0]
    summary = {Path(a.path).name for a in client.list_artifacts(parents[0].info.run_id, "plots")}
    assert not any(name.startswith("depth_") for name in summary)  # no depth plot where there is no depth
    assert {"compare_knn_acc_hd.png", "compare_trustworthiness.png"} <= summary  # the runs side by side
    page = Path(client.download_artifacts(parents[0].info.run_id, "report.html")).read_text()
    assert "What varied: <b>model</b> (2: efficientnet_lite0, pixels) &middot; <b>reducer</b> (2: pca, umap)" in page
    assert 'id="differences"' in page and 'class="mapgrid"' in page
    # Every map was fitted again on each half-sample (the default up to 2,000 scored images): no run's
    # map metrics leave a fit out, and the pairwise note has nothing to say about it.
    assert {c.data.tags["map_refit"] for c in children} == {"true"}
    assert "held fixed on the half-samples" not in page and "map held fixed" not in page
    linked = Path(client.download_artifacts(parents[0].info.run_id, "compare.html")).read_text()
    assert linked.count('class="lm-map"') == 4  # the sweep's four runs side by side
    by_name = {c.info.run_name: c.info.run_id for c in children}
    run_a, run_b = by_name["umap · efficientnet_lite0 · embed"], by_name["umap · pixels · embed"]
    session.run(SWEEP[1], run_A=run_a, run_B=run_b)
    session.run(SWEEP[2], run_A=run_a)
    for command in SWEEP[3:6]:
        session.run(command, run_id=run_a)
    assert (work / "outputs" / "projector").is_dir() and (work / "outputs" / "run.parquet").is_file()
    assert (work / "outputs" / "atlas.parquet").is_file()
    session.run(SWEEP[6])
    assert session.ran == list(SWEEP)


def test_readme_default_runs_a_folder_and_the_audit(tmp_path, monkeypatch, capsys):
    """The default run as the README's first command runs it (everything on: plots, map.html, the
    intervals, the probe and the audit), on the 100 digits: it must beat chance (0.1) by far."""
    session = Session(tmp_path, monkeypatch, capsys)
    work = session.work
    before = session.ids()
    session.ran.append("python run.py")
    err = _run(["run.py", "dataset.limit=100"], work, monkeypatch, capsys)
    (default,) = session.finished(before)
    last = [line for line in err.splitlines() if line.strip()][-1]  # the closing line: status, id, metrics, UI
    assert (f"run {default.info.run_name!r} ({default.info.run_id}) FINISHED: knn_acc_hd=" in last
            and "mlflow ui --backend-store-uri" in last)
    scores = default.data.metrics
    assert scores["knn_acc_hd"] > 0.6 and scores["probe_acc"] > 0.6 and scores["knn_acc_weighted"] > 0.6
    assert scores["knn_acc_2d"] > 0.4 and scores["trustworthiness"] > 0.8
    assert scores["knn_acc_hd_lo"] < scores["knn_acc_hd"] < scores["knn_acc_hd_hi"]
    # its UMAP map was fitted again on each half-sample (metrics.refit_map=null, 100 <= 2,000 images)
    assert default.data.tags["map_refit"] == "true"
    assert {"map.html", "plots"} <= {Path(a.path).name for a in mlflow_runs(work / "outputs")[0].list_artifacts(
        default.info.run_id)}
    for command in DEFAULT[1:3]:
        before = session.ids()
        session.run(command)
        assert len(session.finished(before)) == 1
    images = tmp_path / "my_images"
    write_class_images(images, n_per_class=25)
    before = session.ids()
    session.run_filled(DEFAULT[3], {"/data/my_images": str(images)})  # the README's placeholder folder, filled
    (folder_run,) = session.finished(before)
    session.run(DEFAULT[4], run_id=folder_run.info.run_id)  # all 100 indices
    assert len(list((work / "outputs" / "neighbors").glob("*_42.png"))) == 1
    before = session.ids()
    session.run(DEFAULT[5])
    assert len(session.finished(before)) == 1
    test_images = tmp_path / "test_images"
    write_class_images(test_images, n_per_class=5, seed=1)
    shutil.copy(images / "red" / "000.png", test_images / "red" / "leaked.png")  # a copy of a training image
    before = session.ids()
    session.run_filled(DEFAULT[6], {"/data/train": str(images), "/data/test": str(test_images)})
    (against_run,) = session.finished(before)
    assert against_run.data.metrics["n_leaked"] >= 1
    client, _ = mlflow_runs(session.work / "outputs")
    leaked = pd.read_csv(client.download_artifacts(against_run.info.run_id, "tables/leakage.csv", str(tmp_path)))
    copy = leaked[leaked["path_other"].str.endswith("leaked.png")]  # each file named, not only its index
    assert len(copy) == 1 and Path(copy["path"].item()).parts[-2:] == ("red", "000.png")
    assert session.ran == list(DEFAULT)


def _similarity_and_fine_tuning(session: Session) -> None:
    for command in REAL:
        before = session.ids()
        session.run(command)
        (run,) = session.finished(before)
        if "similarity.py" in command:  # kind=debiased: its block x block corners say so (final_cka is linear)
            assert {"cka_debiased_first_blocks", "cka_debiased_last_blocks", "final_cka"} <= set(run.data.metrics)
        if "finetune.py" in command:  # the checkpoint the study's command names
            assert (session.work / "outputs" / "checkpoints" / "mnv2-cifar" / "latentmap.json").is_file()
        if "finetune_study" in command:  # base against fine-tuned, block by block, on the held-out half
            assert run.data.params["finetuned"] == "outputs/checkpoints/mnv2-cifar"
        if command == CIFAR_POPULATION:  # its arrays are a population the calibration draws from
            from latentmap import calibration

            client = mlflow_runs(session.work / "outputs")[0]
            arrays = client.download_artifacts(run.info.run_id, "arrays")
            points, labels = calibration.draw(f"features:{arrays}", 50, seed=0)
            width = np.load(Path(arrays) / "embeddings.npy").shape[1]
            names = json.loads((Path(arrays) / "classes.json").read_text())
            assert points.shape == (50, width) and len(names) >= 2 and set(labels.tolist()) == set(range(len(names)))
    assert session.ran == list(REAL)


def test_readme_similarity_and_fine_tuning(tmp_path, monkeypatch, capsys):
    """The README's similarity and fine-tuning commands as written, ``../shared`` standing for a tiny
    copy of its layout (a random MobileNetV2, the real checkpoint's family and file layout, and 100
    synthetic images in class folders): the real assets' code paths in under half a minute. On the real assets
    (about 45 s alone): ``test_readme_similarity_and_fine_tuning_on_the_real_assets``, -m slow."""
    _similarity_and_fine_tuning(Session(tmp_path, monkeypatch, capsys, shared=tiny_shared(tmp_path / "shared")))


@pytest.mark.slow
@requires_shared("models", "mobilenet_v2_1.0_224")
@requires_shared("data", "cifar10-test")
def test_readme_similarity_and_fine_tuning_on_the_real_assets(tmp_path, monkeypatch, capsys):
    _similarity_and_fine_tuning(Session(tmp_path, monkeypatch, capsys))


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, how in HOW.items() if how == "bench" and "gpu" not in c])
def test_bench_commands(command, tmp_path, monkeypatch, capsys):
    """The README's benchmark commands, as written (minutes each: ``python -m pytest -m slow``); the
    calibration on real features draws from the arrays of the documented CIFAR-10 run, made first on
    the real assets (about an hour in all here)."""
    placeholder = "<arrays of the CIFAR-10 MobileNetV2 run>"
    if placeholder in command:
        if not (SHARED / "data" / "cifar10-test").is_dir():
            pytest.skip(f"real assets not present at {SHARED}")
        _run(_args(CIFAR_POPULATION) + [f"output_dir={tmp_path / 'population'}"], ROOT, monkeypatch, capsys)
        (arrays,) = (tmp_path / "population").glob("mlartifacts/*/artifacts/arrays")
        command = command.replace(placeholder, str(arrays))  # the command's features:<...> names the folder
    _run(_args(command) + ["--out", str(tmp_path / "bench")] if "bench.py" in command else _args(command),
         ROOT, monkeypatch, capsys)


@pytest.mark.parametrize("script, config, required", [("scripts/similarity.py", "similarity", "model@model_a"),
                                                      ("scripts/finetune.py", "finetune", None)])
def test_the_other_commands_help_says_what_they_do(script, config, required, monkeypatch, capsys):
    """``--help`` of finetune.py and similarity.py: their own config's opening comment, usage and groups.
    Hydra's help printed run.py's text for both, and for similarity.py (two groups without a default)
    a ConfigCompositionException traceback."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    first = (CONF / f"{config}.yaml").read_text().splitlines()[0].lstrip("# ")
    assert out.startswith(first) and f"Usage: python {script} [group=option]" in out
    assert "python run.py" not in out and "Traceback" not in out
    models = ", ".join(sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
    assert f": {models}" in out  # the model group's options
    if required:
        assert f"{required}=<option>  (required)" in out


def test_help_is_asked_as_hydra_reads_the_command_line():
    """Abbreviated and combined flags ask for help as Hydra's own parser reads them; a value that
    contains ``--help`` does not, nor does ``--hydra-help`` (Hydra's, which still works)."""
    from latentmap.config import _asks_help

    for argv in (["--help"], ["-h"], ["--hel"], ["-mh"], ["model@model_a=vit", "--help"]):
        assert _asks_help(argv), argv
    for argv in ([], ["x=--help"], ["--hydra-help"], ["dataset.path=/data/-h"], ["-m", "reducer=pca,umap"]):
        assert not _asks_help(argv), argv
