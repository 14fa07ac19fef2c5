"""The base-vs-fine-tuned study's own parts: the Procrustes alignment of its maps and a bad checkpoint
refused before any run (the whole study on a real fine-tuning: test_finetune.py)."""

from __future__ import annotations

import numpy as np

from latentmap.linked import procrustes_align

from helpers import mlflow_runs, run_script


def test_procrustes_recovers_a_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 2))
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (base @ rotation) * 2.5 + [3.0, -1.0]
    np.testing.assert_allclose(procrustes_align(moved, base), base, atol=1e-10)
    mirrored = base * [-1, 1]
    np.testing.assert_allclose(procrustes_align(mirrored, base), base, atol=1e-10)


def test_a_bad_finetuned_path_is_one_line_and_no_run(tmp_path):
    """The study's own checks run before its MLflow run exists (it used to leave a FAILED run)."""
    code, out = run_script(["run.py", f"output_dir={tmp_path}", "experiment=finetune_study",
                            f"finetuned={tmp_path / 'no-such-checkpoint'}"], tmp_path)
    errors = [line for line in out.splitlines() if "][ERROR] - " in line]
    assert code == 1 and "Traceback" not in out and len(errors) == 1, out[-2000:]
    assert "no-such-checkpoint" in errors[0]
    assert not (tmp_path / "mlflow.db").exists() or mlflow_runs(tmp_path)[1] == []
