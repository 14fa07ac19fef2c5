"""numba's disk cache (latentmap.jit): compiled once, loaded by the next process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOY = '''
import numba

@numba.njit
def total(values):
    out = 0.0
    for v in values:
        out += v * v
    return out
'''

JOB = '''
import json, sys
import numpy as np
from latentmap import jit
jit.cache_in(sys.argv[1])
import lmjittoy
turned_on = jit.enable(packages=("lmjittoy",))
value = lmjittoy.total(np.arange(5.0))
print(json.dumps({"on": turned_on, "value": value, "hits": sum(lmjittoy.total.stats.cache_hits.values()),
                  "misses": sum(lmjittoy.total.stats.cache_misses.values())}))
'''


def _job(tmp_path: Path, cache_dir: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}  # as a user's shell
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", JOB, str(cache_dir)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_function_compiled_in_one_process_is_loaded_from_cache_dir_by_the_next(tmp_path):
    """A jitted function without cache=True: caching turned on by jit.enable, the first process
    compiles and saves it under <cache_dir>/numba, the second loads it (numba's cache hit)."""
    (tmp_path / "lmjittoy.py").write_text(TOY)
    cache_dir = tmp_path / "cache" / "numba"
    first = _job(tmp_path, cache_dir)
    assert first == {"on": 1, "value": 30.0, "hits": 0, "misses": 1}
    assert any(p.suffix == ".nbi" for p in cache_dir.rglob("*"))  # numba's index, in our folder
    second = _job(tmp_path, cache_dir)
    assert second == {"on": 1, "value": 30.0, "hits": 1, "misses": 0}


def test_umap_and_pynndescent_functions_get_numbas_disk_cache():
    """Every compiled UMAP / pynndescent function that does not cache itself is turned on (the
    suite's NUMBA_CACHE_DIR is set in conftest, as cache_in sets it for a run)."""
    import umap  # noqa: F401  (imports pynndescent)
    from numba.core.registry import CPUDispatcher

    from latentmap import jit

    jit.enable()
    dispatchers = [value for name, module in list(sys.modules.items()) if name.split(".")[0] in jit.PACKAGES
                   for value in vars(module).values() if isinstance(value, CPUDispatcher)]
    assert len(dispatchers) > 100
    import umap.layouts as layouts

    parallel = layouts._nb_optimize_layout_euclidean_single_epoch_parallel  # its serial twin's entries: not cached
    assert type(parallel._cache).__name__ == "NullCache"
    assert type(layouts._nb_optimize_layout_euclidean_single_epoch._cache).__name__ == "FunctionCache"
    assert all(type(d._cache).__name__ == "FunctionCache" for d in dispatchers if d is not parallel)


def test_a_function_added_to_a_module_after_enable_read_it_is_turned_on_next_time(monkeypatch):
    """enable skips a module it read before unless names were added since (every half-sample refit
    calls it): a dispatcher defined later in a read module is still turned on."""
    import types

    import numba

    from latentmap import jit

    module = types.ModuleType("lmjitlater")
    module.first = numba.njit(lambda x: x + 1)
    monkeypatch.setitem(sys.modules, "lmjitlater", module)
    assert jit.enable(packages=("lmjitlater",)) == 1
    assert jit.enable(packages=("lmjitlater",)) == 0  # nothing new
    module.second = numba.njit(lambda x: x * 2)
    assert jit.enable(packages=("lmjitlater",)) == 1
    assert type(module.second._cache).__name__ == "FunctionCache"


TWINS = '''
import numba

def _scaled(values, factor):
    out = values.copy()
    for i in numba.prange(values.shape[0]):
        out[i] = values[i] * factor
    return out

serial = numba.njit(_scaled, fastmath=True, parallel=False)
parallel = numba.njit(_scaled, fastmath=True, parallel=True)
'''

TWINS_JOB = '''
import json, sys
import numpy as np
from latentmap import jit
jit.cache_in(sys.argv[1])
import lmjittwins
jit.enable(packages=("lmjittwins",))
chosen = getattr(lmjittwins, sys.argv[2])
chosen(np.arange(4.0), 2.0)
print(json.dumps({"hits": sum(chosen.stats.cache_hits.values()), "misses": sum(chosen.stats.cache_misses.values()),
                  "parallel_cached": type(lmjittwins.parallel._cache).__name__ != "NullCache"}))
'''


def test_a_parallel_twin_of_a_cached_function_is_not_cached_beside_it(tmp_path):
    """One Python function compiled serially and in parallel (umap-learn's layout epoch): numba keys
    cache entries by the function, not its options, so the twins would load each other's machine
    code. Only the serial one is cached: a process that ran the parallel one leaves nothing the
    next process's serial one loads, and the serial one's entry is loaded by the next serial call."""
    (tmp_path / "lmjittwins.py").write_text(TWINS)
    cache_dir = tmp_path / "numba"
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])

    def job(name: str) -> dict:
        result = subprocess.run([sys.executable, "-c", TWINS_JOB, str(cache_dir), name], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    assert job("parallel") == {"hits": 0, "misses": 1, "parallel_cached": False}  # compiled in memory
    assert not list(cache_dir.rglob("*.nbi"))  # and nothing saved
    assert job("serial") == {"hits": 0, "misses": 1, "parallel_cached": False}  # compiled, saved
    assert job("serial") == {"hits": 1, "misses": 0, "parallel_cached": False}  # loaded
    assert job("parallel")["hits"] == 0  # the parallel one never runs the serial one's code


RUNTIME_TOY = '''
import numba

def _square_sum(values):
    out = 0.0
    for i in numba.prange(values.shape[0]):
        out += values[i] * values[i]
    return out

def total(values):  # compiles at every call, as umap.layouts' aligned layout does
    return numba.njit(_square_sum, fastmath=True)(values)
'''

RUNTIME_JOB = '''
import json, sys
import numba
import numpy as np
from latentmap import jit
jit.cache_in(sys.argv[1])
import lmjitruntime
with jit.cached_runtime_jit(modules=("lmjitruntime",)):
    first, second = lmjitruntime.total(np.arange(5.0)), lmjitruntime.total(np.arange(3.0))
(dispatcher,) = jit._RUNTIME.values()
print(json.dumps({"values": [first, second], "hits": sum(dispatcher.stats.cache_hits.values()),
                  "misses": sum(dispatcher.stats.cache_misses.values()), "restored": numba.njit is jit._NJIT}))
'''


def test_a_function_jitted_at_run_time_is_compiled_once_and_loaded_from_cache_by_the_next_process(tmp_path):
    """numba.njit(function) inside a call (AlignedUMAP's layout): under cached_runtime_jit, one
    dispatcher for both calls, saved by the first process, loaded by the second; numba.njit is
    numba's own again afterwards; the values are the function's."""
    (tmp_path / "lmjitruntime.py").write_text(RUNTIME_TOY)
    cache_dir = tmp_path / "cache" / "numba"
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", RUNTIME_JOB, str(cache_dir)], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"values": [30.0, 5.0], "hits": 0, "misses": 1, "restored": True}
    assert runs[1] == {"values": [30.0, 5.0], "hits": 1, "misses": 0, "restored": True}
