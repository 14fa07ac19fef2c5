"""The commands installed with the package (``[project.scripts]``): each names a callable of
``latentmap.commands``, each script in ``scripts/`` and ``run.py`` is a shim over one, and the
installed ``latentmap`` refuses a mistyped key in one line, as ``python run.py`` does."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sysconfig

import pytest
import tomllib

from helpers import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_installed_command_names_a_callable_of_the_package(name):
    module, function = SCRIPTS[name].split(":")
    assert module.startswith("latentmap.commands.")
    assert callable(getattr(importlib.import_module(module), function))


SHIMS = ["run.py", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "scripts").glob("*.py")
                           if not p.stem.startswith("bench"))]  # the benchmarks are scripts of their own


@pytest.mark.parametrize("path", SHIMS)
def test_run_py_and_the_scripts_are_thin_shims(path):
    """No logic of their own: imports of one command module and the call of its entry point."""
    tree = ast.parse((ROOT / path).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert len(imported) == 1 and next(iter(imported)).startswith("latentmap.commands.")
    assert not any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in tree.body)


def test_the_installed_command_refuses_a_mistyped_key_in_one_line(tmp_path):
    found = shutil.which("latentmap", path=sysconfig.get_path("scripts")) or shutil.which("latentmap")
    if found is None:
        pytest.fail("the latentmap command is not installed: pip install -e '.[dev]' installs it")
    result = subprocess.run([found, f"output_dir={tmp_path}", "+reducr=pca"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: unknown key 'reducr' in +reducr=pca: the closest known key is 'reducer'; "
        "`latentmap --cfg job` prints every key"], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_scripts_refuse_a_missing_store_and_bad_options_in_one_line(tmp_path, capsys):
    """A store path that holds no store (it was created empty, and the command then found nothing),
    a negative --max-cka-images (a traceback, and a FAILED report run) and --confidence out of
    range (named as run.py's key): one line each, exit 1, and no store made."""
    from latentmap.commands import compare, report, runs

    missing = f"sqlite:///{tmp_path}/none/mlflow.db"
    for main, argv in ((runs.main, ["cleanup"]), (report.main, ["latentmap"])):
        with pytest.raises(SystemExit, match=r"^error: --tracking-uri='sqlite:///.*/none/mlflow.db': there is no "
                                             r"MLflow store at .*: pass the store your runs were logged to"):
            main([*argv, "--tracking-uri", missing])
    with pytest.raises(SystemExit, match=r"^error: --tracking-uri='sqlite:///.*/none/mlflow.db': there is no "
                                         r"MLflow store at"):
        compare.main(["a", "b", "--tracking-uri", missing])
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit, match=r"^error: --max-cka-images -5 must be at least 8"):
        report.main(["latentmap", "--max-cka-images", "-5", "--tracking-uri", missing])
    with pytest.raises(SystemExit, match=r"^error: --confidence 1\.5 must be a number in \(0, 1\) "
                                         r"\(e\.g\. --confidence 0\.95\)$"):
        compare.main(["a", "b", "--confidence", "1.5", "--tracking-uri", missing])
