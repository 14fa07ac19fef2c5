"""Is run A better than run B on these images? A paired comparison of every metric with per-image scores.

    python scripts/compare.py <run A> <run B> [--tracking-uri sqlite:///outputs/mlflow.db]
        [--experiment latentmap] [--bootstrap 1000] [--confidence 0.95] [--seed 0]

A run is a run id, or an MLflow filter string that selects exactly one run of --experiment, e.g.
"params.model.name = 'pixels' and params.reducer._target_ = 'sklearn.decomposition.PCA'".
The two runs must have scored the same images (the same dataset fingerprint and the same image
indices); otherwise the script refuses in one line saying how many images they share. For every
metric both runs have per-image scores for, it prints A, B, the mean per-image difference A - B,
its paired bootstrap interval (images resampled in pairs, BCa) and the two-sided p-value of a
paired sign-flip permutation test, and logs the same as a new MLflow run tagged with both run ids
(latentmap.role=compare): compare.csv and plots/compare.png, a forest plot of the differences.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("latentmap.compare")


def resolve_run(client, selector: str, experiment_name: str) -> str:
    """The run id a selector names: a run id, or a filter matching exactly one run."""
    from mlflow.exceptions import MlflowException

    from latentmap.errors import ConfigError

    if re.fullmatch(r"[0-9a-f]{32}", selector):
        try:
            return client.get_run(selector).info.run_id
        except MlflowException as error:
            raise ConfigError(f"run {selector} is not in {client.tracking_uri} (pass --tracking-uri)") from error
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ConfigError(f"no experiment {experiment_name!r} in {client.tracking_uri}: pass --experiment")
    try:
        runs = client.search_runs([experiment.experiment_id], filter_string=selector, max_results=3)
    except MlflowException as error:
        raise ConfigError(f"{selector!r} is neither a run id nor a valid MLflow filter: "
                          f"{str(error).splitlines()[0]}") from error
    runs = [r for r in runs if "latentmap.role" not in r.data.tags]
    if len(runs) != 1:
        raise ConfigError(f"{selector!r} selects {len(runs) if len(runs) < 3 else 'several'} runs of "
                          f"{experiment_name}, not one: narrow the filter or pass a run id")
    return runs[0].info.run_id


def compare(client, run_a: str, run_b: str, resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
    """(table of differences, description) of run A against run B; refuses runs on other images."""
    import pandas as pd

    from latentmap import logged, stats
    from latentmap.errors import ConfigError

    (table_a, tags_a), (table_b, tags_b) = logged.score_table(client, run_a), logged.score_table(client, run_b)
    shared = len(np.intersect1d(table_a["index"], table_b["index"]))
    same_data = tags_a.get("dataset_fingerprint") == tags_b.get("dataset_fingerprint")
    if not same_data or not np.array_equal(table_a["index"], table_b["index"]):
        raise ConfigError(
            f"runs {run_a[:8]} and {run_b[:8]} scored different images ({len(table_a)} and {len(table_b)}, "
            f"{shared} indices shared{'' if same_data else ', from datasets with other fingerprints'}): compare "
            "runs made with the same dataset settings, seed and metrics.max_points")
    metrics = [c for c in table_a.columns if c in table_b.columns and c not in ("index", "label")]
    rows = []
    for i, metric in enumerate(metrics):
        found = stats.paired(table_a[metric].to_numpy(), table_b[metric].to_numpy(), resamples, confidence, seed + i)
        rows.append({"metric": metric, "a": found.a, "b": found.b, "difference": found.difference,
                     "lo": found.lo, "hi": found.hi, "p_value": found.p_value, "n": found.n})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    parser.add_argument("--experiment", default="latentmap")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the interval and the test")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mlflow.tracking import MlflowClient

    from latentmap import plots, stats, tracking
    from latentmap.errors import ConfigError

    try:
        stats.check(args.bootstrap, args.confidence)
        if args.bootstrap < 1:
            raise ConfigError("--bootstrap 0: a comparison needs resamples, e.g. --bootstrap 1000")
        client = MlflowClient(tracking_uri=tracking.tracking_uri(args.tracking_uri))
        run_a, run_b = (resolve_run(client, s, args.experiment) for s in (args.run_a, args.run_b))
        table = compare(client, run_a, run_b, args.bootstrap, args.confidence, args.seed)
    except ConfigError as error:
        log.error("%s", error)
        raise SystemExit(1) from None
    level = f"{args.confidence:.0%}"
    print(f"A = {run_a}\nB = {run_b}\n{len(table) and int(table['n'].iloc[0])} images, {level} intervals, "
          f"difference = A - B\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    experiment_id = client.get_run(run_a).info.experiment_id
    run = client.create_run(experiment_id, run_name=f"compare {run_a[:8]} vs {run_b[:8]}",
                            tags={"latentmap.role": "compare", "latentmap.compare.a": run_a,
                                  "latentmap.compare.b": run_b})
    status = "FAILED"
    try:
        folder = Path("outputs/compare") / run.info.run_id
        (folder / "plots").mkdir(parents=True, exist_ok=True)
        table.to_csv(folder / "compare.csv", index=False)
        plots.forest(table["metric"].tolist(), table["difference"].to_numpy(), table["lo"].to_numpy(),
                     table["hi"].to_numpy(), f"A - B per metric, {level} paired bootstrap intervals",
                     "difference (A - B)").savefig(folder / "plots" / "compare.png", dpi=120)
        client.log_artifacts(run.info.run_id, str(folder))
        for row in table.itertuples():
            for name, value in (("", row.difference), ("_lo", row.lo), ("_hi", row.hi)):
                client.log_metric(run.info.run_id, f"diff_{row.metric}{name}", float(value))
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)
    log.info("comparison logged as run %s", run.info.run_id)
    return run.info.run_id


if __name__ == "__main__":
    main()
    sys.exit(0)
