"""Property: whatever values a user types for the public keys, run.py ends in a FINISHED run or in
one clear error line with a non-zero exit; never a traceback, a RUNNING run or a partial cache file."""

from __future__ import annotations

import runpy
import string
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ROOT, cache_entries, mlflow_runs

token = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=6)
number = st.integers(min_value=-40, max_value=5000)
value = st.one_of(number, token, st.sampled_from(["null", "0", "-1", "1.5", "true"]))
KEYS = {
    "layer": st.one_of(st.integers(-6, 6), value),
    "pool": st.one_of(st.sampled_from(["embed", "cls", "mean"]), value),
    "batch_size": st.one_of(st.integers(1, 70), value),
    "dataset.limit": st.one_of(st.integers(1, 40), value),
    "metrics.k": st.one_of(st.integers(1, 20), value),
    "reducer.perplexity": st.one_of(st.integers(1, 40), value),
    "dataset.path": st.one_of(st.just("{images}"), token.map(lambda t: f"{{tmp}}/{t}")),
}
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(reducer=st.sampled_from(["pca", "tsne", "opentsne"]),
       chosen=st.dictionaries(st.sampled_from(sorted(KEYS)), st.none(), min_size=1, max_size=4).flatmap(
           lambda keys: st.fixed_dictionaries({k: KEYS[k] for k in keys})))
def test_run_py_ends_finished_or_in_one_clear_line(reducer, chosen, tiny_vit, class_folder, tmp_path, capsys):
    out = tmp_path / "out"  # one store and cache for all examples: each adds at most one run
    if reducer == "pca":
        chosen.pop("reducer.perplexity", None)  # PCA has no perplexity: Hydra would refuse the key
    overrides = [f"{key}={str(v).format(images=class_folder, tmp=tmp_path)}" for key, v in chosen.items()]
    argv = ["run.py", f"output_dir={out}", "model=hf", f"model.name={tiny_vit}", "dataset=imagefolder",
            f"dataset.path={class_folder}", f"reducer={reducer}", "plots.enabled=false", "metrics.probe=false",
            *overrides]
    before = {r.info.run_id for r in mlflow_runs(out)[1]} if (out / "mlflow.db").exists() else set()
    capsys.readouterr()
    old_argv, sys.argv = sys.argv, argv
    try:
        try:
            runpy.run_path(str(ROOT / "run.py"), run_name="__main__")  # exactly `python run.py ...`
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
    finally:
        sys.argv = old_argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    runs = mlflow_runs(out)[1] if (out / "mlflow.db").exists() else []
    new = [r for r in runs if r.info.run_id not in before]
    assert len(new) <= 1 and all(r.info.status != "RUNNING" for r in runs), overrides
    if code == 0:
        assert [r.info.status for r in new] == ["FINISHED"], overrides
    else:
        assert [r.info.status for r in new] in ([], ["FAILED"]), overrides
        ours = [line for line in err.splitlines() if "][ERROR] - " in line]
        if ours:  # latentmap's own check: one line that names the key or the value
            assert len(ours) == 1, ours
            assert any(key.split(".")[-1] in ours[0] or str(v) in ours[0] for key, v in chosen.items()) \
                or "images" in ours[0] or "class" in ours[0], (overrides, ours[0])
        else:  # Hydra's own refusal of an override (type or syntax), also without a traceback
            assert "Error" in err and len(err.strip().splitlines()) <= 3, (overrides, err[-2000:])
    cache = out / "cache"
    if cache.exists():
        assert not list(cache.glob(".tmp-*")), overrides
        assert all((entry / "meta.json").is_file() for entry in cache_entries(cache)), overrides
