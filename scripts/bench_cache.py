"""Wall time of a run that misses the embedding cache against the same run hitting it.

    python scripts/bench_cache.py [overrides ...]      # default: the default config

Both runs are full `python run.py` processes (imports, MLflow, reduction, metrics, plots),
side by side in one temporary output folder; the first extracts, the second reuses the cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(overrides: list[str], output_dir: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run.py"), f"output_dir={output_dir}", *overrides],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        miss = timed_run(args.overrides, Path(tmp))
        hit = timed_run(args.overrides, Path(tmp))
        tags = _cache_tags(Path(tmp))
    result = {"overrides": args.overrides, "miss_s": round(miss, 1), "hit_s": round(hit, 1),
              "miss_over_hit": round(miss / hit, 2), "cache_tags": tags}
    print(json.dumps(result, indent=2))


def _cache_tags(output_dir: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("latentmap")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [run.data.tags.get("cache", "?") for run in runs]


if __name__ == "__main__":
    main()
