"""Is run A better than run B on these images? A paired comparison of every metric with per-image scores,
and compare.html: the runs' maps side by side, linked.

    python scripts/compare.py <run A> <run B> [<run C> ... up to 6] [--tracking-uri sqlite:///outputs/mlflow.db]
        [--experiment latentmap] [--confidence 0.95]

A run is a run id, or an MLflow filter string that selects exactly one run of --experiment, e.g.
"params.choice.model = 'pixels' and params.choice.reducer = 'pca'".
The two runs must have scored the same images (the same dataset fingerprint and the same image
indices) on the same half-samples (the same metrics.bootstrap and cv_seed); otherwise the script
refuses in one line. For every metric both runs have, it prints A, B, the difference A - B, its
interval and two-sided p-value (Student's t from the difference recomputed on each half-sample,
B - 1 degrees of freedom: between exchangeable runs it rejects 0-6% of the time at 0.05, 11% for
the map's silhouette, measured by `python scripts/bench.py --only calibration`), and the p-value
adjusted by Holm's method over the metrics of the table (one family; a metric equal in both runs
on every half-sample shares its input and is not tested). It logs the same as a new
MLflow run tagged with both run ids (latentmap.role=compare): compare.csv and plots/compare.png, a
forest plot of the differences (dark where Holm's adjusted p is below 0.05).
With more runs, A is compared with each (compare_A_C.csv, plots/compare_A_C.png, ...). The run also holds compare.html
(:mod:`latentmap.linked`): every run's map, aligned to A's, hover and selection linked across them,
coloured by class or by each run's per-image differences from A, beside the tables and the
similarity panel of each pair.
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
    """The run id a selector names: a run id, the first 6 or more of its characters (one run's), or a
    filter matching exactly one run."""
    from mlflow.exceptions import MlflowException

    from latentmap.errors import ConfigError
    from latentmap.logged import run_id_of

    if re.fullmatch(r"[0-9a-fA-F]{32}", selector.strip()):
        selector = selector.strip().lower()
        try:
            return client.get_run(selector).info.run_id
        except MlflowException as error:
            raise ConfigError(f"run {selector} is not in {client.tracking_uri} (pass --tracking-uri)") from error
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ConfigError(f"no experiment {experiment_name!r} in {client.tracking_uri}: pass --experiment")
    found = run_id_of(client, selector, [experiment.experiment_id],  # a short id, as a page or a run's name shows
                      f"of experiment {experiment_name!r}")
    if found is not None:
        return found
    try:
        runs = client.search_runs([experiment.experiment_id], filter_string=selector, max_results=3)
    except MlflowException as error:
        raise ConfigError(f"{selector!r} is neither a run id nor a valid MLflow filter: "
                          f"{str(error).splitlines()[0]}") from error
    runs = [r for r in runs if "latentmap.role" not in r.data.tags]
    if len(runs) != 1:
        fix = "widen the filter" if not runs else "narrow the filter"
        raise ConfigError(f"{selector!r} selects {len(runs) if len(runs) < 3 else 'several'} runs of "
                          f"{experiment_name}, not one: {fix} or pass a run id")
    return runs[0].info.run_id


def compare(client, run_a: str, run_b: str, confidence: float = 0.95):
    """The table of differences of run A against run B; refuses runs on other images or other
    half-samples."""
    import pandas as pd

    from latentmap import logged, stats
    from latentmap.errors import ConfigError
    from latentmap.resampling import bounds_of

    (table_a, tags_a), (table_b, tags_b) = logged.score_table(client, run_a), logged.score_table(client, run_b)
    shared = len(np.intersect1d(table_a["index"], table_b["index"]))
    same_data = tags_a.get("dataset_fingerprint") == tags_b.get("dataset_fingerprint")
    if not same_data or not np.array_equal(table_a["index"], table_b["index"]):
        raise ConfigError(
            f"runs {run_a[:8]} and {run_b[:8]} scored different images ({len(table_a)} and {len(table_b)}, "
            f"{shared} indices shared{'' if same_data else ', from datasets with other fingerprints'}): compare "
            "runs made with the same dataset settings, seed and metrics.max_points")
    (values_a, halves_a), (values_b, halves_b) = logged.halves_table(client, run_a), logged.halves_table(client, run_b)
    if tags_a.get("halves_digest") != tags_b.get("halves_digest"):
        raise ConfigError(
            f"runs {run_a[:8]} and {run_b[:8]} were scored on different half-samples ({tags_a.get('halves')} and "
            f"{tags_b.get('halves')}, digests {tags_a.get('halves_digest')} and {tags_b.get('halves_digest')}): "
            "compare runs made with the same metrics.bootstrap and cv_seed")
    scale = float(tags_a["halves_scale"])  # sqrt(m / (N - m)) of these half-samples
    metrics = [c for c in halves_a.columns if c in halves_b.columns and c != "half"]
    rows = []
    for metric in metrics:
        found = stats.paired_halves(float(values_a.loc[metric, "value"]), float(values_b.loc[metric, "value"]),
                                    halves_a[metric].to_numpy(), halves_b[metric].to_numpy(), scale, len(table_a),
                                    confidence, bounds_of(metric))
        # A metric equal in both runs on every half-sample (the k-NN accuracy of one embedding under two
        # maps) is no test: its p-value is left empty and out of Holm's family, as report.html leaves it out.
        rows.append({"metric": metric, "a": found.a, "b": found.b, "difference": found.difference,
                     "lo": found.lo, "hi": found.hi, "p_value": np.nan if found.same_input else found.p_value,
                     "n": found.n, "same_input": found.same_input})
    table = pd.DataFrame(rows)
    table["p_holm"] = stats.adjust(table["p_value"].to_numpy(), "holm")
    return table



def _forest(table, title: str, xlabel: str):
    """The forest plot of one pair's table: dark where Holm's adjusted p is below 0.05, the
    intrinsic dimension on an axis of its own."""
    from latentmap import plots
    from latentmap.stats import GEOMETRY_METRICS

    untested = table["p_holm"].isna()
    same = bool(table.get("same_input", untested)[untested].all())
    return plots.forest(table["metric"].tolist(), table["difference"].to_numpy(), table["lo"].to_numpy(),
                        table["hi"].to_numpy(), title, xlabel, adjusted=table["p_holm"].to_numpy(),
                        own_scale=GEOMETRY_METRICS,
                        untested="not tested (the same in both runs)" if same else "not tested (see compare.csv)")


def _printable(table) -> str:
    """The table as the terminal shows it: values to 4 decimals, p-values as the pages print them
    (``<1e-4``; ``-`` for a metric not tested), where ``.4f`` printed a small p-value as 0.0000."""
    from latentmap.stats import p_text

    shown = table.copy()
    for column in ("p_value", "p_holm"):
        shown[column] = shown[column].map(p_text)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def describe_run(client, run_id: str) -> str:
    """``<name> (<id>)``: what a reader recognises, and what identifies it."""
    return f"{client.get_run(run_id).info.run_name} ({run_id})"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="run", help="2 to 6 runs: a run id or an MLflow filter each")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    parser.add_argument("--experiment", default="latentmap")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--output-dir", default="outputs/compare",
                        help="where a copy of the comparison's files goes, in a folder named by its run id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mlflow.tracking import MlflowClient

    from latentmap import linked, logged, settings, tracking
    from latentmap.errors import ConfigError
    from latentmap.targets import cannot_make

    try:
        try:
            settings.require("metrics.confidence", args.confidence)
        except ConfigError as error:  # the same rule as run.py's key, named as this command spells it
            raise ConfigError(str(error).replace("metrics.confidence=", "--confidence ")) from None
        if not 2 <= len(args.runs) <= linked.MAX_RUNS:
            raise ConfigError(f"compare takes 2 to {linked.MAX_RUNS} runs, got {len(args.runs)}: "
                              "pass run A, run B and up to four more")
        if (why := cannot_make(Path(args.output_dir))) is not None:  # it was a traceback, and a FAILED run
            raise ConfigError(f"--output-dir {args.output_dir} cannot be written ({why}): choose a writable folder")
        client = MlflowClient(tracking_uri=tracking.existing_store(args.tracking_uri))
        run_ids = [resolve_run(client, s, args.experiment) for s in args.runs]
        if twice := next((run for i, run in enumerate(run_ids) if run in run_ids[:i]), None):
            given = ", ".join(s for s, r in zip(args.runs, run_ids) if r == twice)
            log.warning("run %s is given twice (%s): its differences with itself are 0", twice, given)
        run_a, run_b = run_ids[:2]
        tables = {other: compare(client, run_a, other, args.confidence) for other in run_ids[1:]}
        table = tables[run_b]
        page = linked.for_runs(client, run_ids, tracking.tracking_uri(args.tracking_uri), args.confidence, tables)
    except ConfigError as error:  # one line, as the other scripts write it
        raise SystemExit(f"error: {error}") from None
    level = f"{args.confidence:.0%}"
    print("".join(f"{linked.LETTERS[i]} = {describe_run(client, run)}\n" for i, run in enumerate(run_ids)) +
          f"{len(table) and int(table['n'].iloc[0])} images, {level} intervals, difference = A - B; p_holm: "
          f"{linked.family_note(table)}\n")
    print(_printable(table))
    handled = [logged.map_refit(client, run) for run in run_ids]
    for i, other in enumerate(run_ids[2:], start=2):
        print(f"\nA - {linked.LETTERS[i]}:\n" + _printable(tables[other]))
    for i, other in enumerate(run_ids[1:], start=1):
        if note := linked.map_handling(handled[0], handled[i], ("A", linked.LETTERS[i]), linked.tested(tables[other])):
            print(f"\n{note}")

    experiment_id = client.get_run(run_a).info.experiment_id
    run = client.create_run(experiment_id, run_name=f"compare {run_a[:8]} vs " + ", ".join(r[:8] for r in run_ids[1:]),
                            tags={"latentmap.role": "compare", "latentmap.compare.a": run_a,
                                  "latentmap.compare.b": run_b,
                                  **{f"latentmap.compare.{linked.LETTERS[i].lower()}": r
                                     for i, r in enumerate(run_ids) if i >= 2}})
    status = "FAILED"
    try:
        folder = Path(args.output_dir) / run.info.run_id
        (folder / "plots").mkdir(parents=True, exist_ok=True)
        table.to_csv(folder / "compare.csv", index=False)
        for i, other in enumerate(run_ids[2:], start=2):
            tables[other].to_csv(folder / f"compare_A_{linked.LETTERS[i]}.csv", index=False)
        (folder / "compare.html").write_text(page)
        for i, other in enumerate(run_ids[1:], start=1):
            letter = linked.LETTERS[i]
            _forest(tables[other], f"A - {letter} per metric, {level} paired half-sample intervals\n"
                    f"A = {describe_run(client, run_a)}\n{letter} = {describe_run(client, other)}",
                    f"difference (A - {letter})").savefig(
                folder / "plots" / ("compare.png" if i == 1 else f"compare_A_{letter}.png"), dpi=120)
        client.log_artifacts(run.info.run_id, str(folder))
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []  # A - B as diff_<metric>, A - C as diff_C_<metric>, ...: every pair in MLflow, not A - B alone
        for i, other in enumerate(run_ids[1:], start=1):
            prefix = "diff_" if i == 1 else f"diff_{linked.LETTERS[i]}_"
            metrics += [Metric(f"{prefix}{row.metric}{name}", float(value), now, 0)
                        for row in tables[other].itertuples()
                        for name, value in (("", row.difference), ("_lo", row.lo), ("_hi", row.hi))]
        for start in range(0, len(metrics), 1000):  # MLflow takes 1,000 metrics a batch
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (latentmap.stopping)
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run.info.run_id, status=status)
    log.info("comparison logged as run %s (%s); its files (compare.html, the tables, the plots) are also in %s",
             run.info.run_name, run.info.run_id, folder.resolve())
    return run.info.run_id


def cli() -> None:
    """The installed ``latentmap-compare`` command (and ``python scripts/compare.py``)."""
    from latentmap import stopping

    stopping.command(main, "compare.py")
    sys.exit(0)


if __name__ == "__main__":
    cli()
