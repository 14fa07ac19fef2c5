"""A study's runs read from MLflow and its summary logged back: the children of a sweep's parent run,
the paired differences of runs on the same half-samples (their ``tables/halves.csv``), and
``report.html`` with each run's map linked (:mod:`latentmap.report` writes the page)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from latentmap import stats
from latentmap.studies import METRICS, Summary, run_label, summarize, write
from latentmap.tracking.run import HEADLINE

log = logging.getLogger(__name__)


def pairwise_differences(client, table: pd.DataFrame, varied: list[str], metrics: list[str] = HEADLINE,
                         confidence: float = 0.95, max_pairs: int = 30) -> tuple[pd.DataFrame, str]:
    """The paired differences of runs on the same images and half-samples that differ in one varied
    setting (model A against model B with everything else equal), for ``metrics``: A - B with its
    interval and p-value (:func:`latentmap.stats.paired_halves`), and Holm's adjustment over the
    whole table (one family). Metrics equal in both runs on every half-sample (the same embedding
    mapped twice) are left out, and a test several pairs share (the same values, interval and
    p-value: an embedding metric of two models, whichever reducer mapped them) is one row. Returns
    the table and a note saying what it holds or why it is empty."""
    from itertools import combinations

    from latentmap import linked, logged
    from latentmap.errors import ConfigError
    from latentmap.resampling import MAP_METRICS, bounds_of

    contrasts = [k for k in varied if k != "layer"]
    if table.empty or not contrasts:
        return pd.DataFrame(), ""
    if table["relative_depth"].nunique() > 1 and "layer" in varied:
        return pd.DataFrame(), ("Not computed where the runs span several depths of a model (a layer study): the "
                                "depth curves and the similarity with the final block compare its blocks "
                                "(compare.py compares any two runs).")
    pairs = []
    for a, b in combinations(range(len(table)), 2):
        row_a, row_b = table.iloc[a], table.iloc[b]
        differ = [k for k in varied if row_a.get(f"varied.{k}") != row_b.get(f"varied.{k}")]
        same_images = (pd.notna(row_a["halves_digest"]) and row_a["halves_digest"] == row_b["halves_digest"]
                       and row_a["dataset_fingerprint"] == row_b["dataset_fingerprint"])
        if len(differ) == 1 and differ[0] != "layer" and same_images:
            pairs.append((row_a, row_b))
    if not pairs:
        return pd.DataFrame(), ("No pair of runs differs in one setting on the same images and half-samples "
                                "(the same dataset, seed, metrics.max_points and metrics.bootstrap).")
    kept = pairs[:max_pairs]
    rows, read, unread, mixed, dropped = [], {}, {}, {}, 0
    for row_a, row_b in kept:
        try:
            for run in (row_a["run_id"], row_b["run_id"]):
                if run in unread:
                    raise ConfigError(unread[run])
                if run not in read:
                    read[run] = logged.halves_table(client, run)
        except ConfigError as error:
            log.warning("no pairwise differences for %s: %s", run, error)
            unread[run] = str(error)
            dropped += 1
            continue
        (values_a, halves_a), (values_b, halves_b) = read[row_a["run_id"]], read[row_b["run_id"]]
        for metric in metrics:
            if metric not in halves_a or metric not in halves_b:
                continue
            found = stats.paired_halves(float(values_a.loc[metric, "value"]), float(values_b.loc[metric, "value"]),
                                        halves_a[metric].to_numpy(), halves_b[metric].to_numpy(),
                                        float(row_a["halves_scale"]), int(values_a.loc[metric, "n"]), confidence,
                                        bounds_of(metric))
            if found.same_input:
                continue  # the same value on every half-sample: the two runs share this metric's input
            key = next(k for k in varied if row_a.get(f"varied.{k}") != row_b.get(f"varied.{k}"))
            contrast = f"{key}: {row_a.get(f'varied.{key}') or ''} vs {row_b.get(f'varied.{key}') or ''}"
            handled = (_tag(row_a.get("map_refit")) or logged.map_refit_in(values_a),
                       _tag(row_b.get("map_refit")) or logged.map_refit_in(values_b))
            fixed = run_label(row_a, varied, skip=(key,)) if len(varied) > 1 else ""
            if (metric in MAP_METRICS and (handled[0] != handled[1] or handled == ("false", "false"))
                    and not key.endswith("refit_map")):
                named = (str(row_a.get(f"varied.{key}") or ""), str(row_b.get(f"varied.{key}") or ""))
                where = f"{contrast} ({fixed})" if fixed and handled[0] == handled[1] else contrast
                shown = mixed.setdefault(where, (handled, named, []))[2]
                if metric not in shown:
                    shown.append(metric)
            same = next((row for row in rows if row["contrast"] == contrast and row["metric"] == metric
                         and (row["a"], row["b"], row["difference"], row["lo"], row["hi"], row["p_value"])
                         == (found.a, found.b, found.difference, found.lo, found.hi, found.p_value)), None)
            if same is not None:  # one test on the same inputs (k-NN of two models, whichever reducer mapped
                same["fixed"] += f"; {fixed}"  # them): one row of the family, not one a pair
                continue
            rows.append({"run_a": row_a["run_id"], "run_b": row_b["run_id"],
                         "contrast": contrast, "fixed": fixed,
                         "metric": metric, "a": found.a, "b": found.b,
                         "difference": found.difference, "lo": found.lo, "hi": found.hi, "p_value": found.p_value})
    differences = pd.DataFrame(rows)
    if not differences.empty:
        differences = differences.sort_values(["contrast", "fixed"], kind="stable").reset_index(drop=True)
    why = next(iter(unread.values()), "")
    if differences.empty:
        if unread:
            return differences, (f"The half-sample tables of {len(unread)} run{'s' if len(unread) > 1 else ''} could "
                                 f"not be read, so no pair could be compared: {why}")
        return differences, "Every pair agrees on every metric on every half-sample."
    differences["p_holm"] = stats.adjust(differences["p_value"].to_numpy(), "holm")
    note = (f"Runs on the same images and half-samples that differ in one setting, A - B per headline metric with its "
            f"{confidence:.0%} interval and p-value (Student's t over the half-samples, B - 1 degrees of freedom), and "
            f"the p-value adjusted by Holm's method over the {len(differences)} rows of this table (one family); grey: "
            "adjusted p >= 0.05. Metrics equal in both runs on every half-sample are left out, and a test that "
            "several pairs share (an embedding metric of two models, whichever reducer mapped them) is one row.")
    if len(pairs) > max_pairs:
        note += f" The first {max_pairs} of {len(pairs)} pairs are shown (scripts/compare.py compares any two runs)."
    if dropped:  # said on the page, not only in the log
        note += (f" {dropped} of the {len(kept)} pairs are left out: the half-sample tables of {len(unread)} "
                 f"run{'s' if len(unread) > 1 else ''} could not be read ({why}).")
    held = {contrast: shown for contrast, (handled, _, shown) in mixed.items() if handled == ("false", "false")}
    for contrast, (handled, named, shown) in mixed.items():  # not where refit_map itself is the contrast
        if contrast not in held:
            said = linked.map_handling(*handled, named, shown)
            note += f" In {contrast}: {said[0].lower()}{said[1:]}"
    if held:  # one sentence for every pair that held both maps fixed
        said = linked.both_held_fixed([m for m in MAP_METRICS if any(m in shown for shown in held.values())])
        note += f" In {'; '.join(held)}: {said[0].lower()}{said[1:]}"
    return differences, note


def _tag(value) -> str | None:
    """A run's tag as the runs table holds it: the text, or None where the run has none (NaN)."""
    return None if value is None or pd.isna(value) else str(value)


def child_runs(client, parent_run_id: str) -> pd.DataFrame:
    """The children of a parent run, as a ``mlflow.search_runs`` DataFrame, and the runs its jobs
    resumed (``resume=true`` skipped them for FINISHED runs of an earlier sweep)."""
    import mlflow

    from latentmap.tracking.sweep import RESUMED_TAG

    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    mlflow.set_tracking_uri(client.tracking_uri)
    children = mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=50000)
    from mlflow.entities import ViewType

    deleted = mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                 max_results=50000, run_view_type=ViewType.DELETED_ONLY)
    if not deleted.empty:  # in MLflow's trash: said on the page beside the jobs that did not finish (a blank grid cell)
        children = pd.concat([children, deleted.assign(status="DELETED")], ignore_index=True)
    resumed = [r for r in parent.data.tags.get(RESUMED_TAG, "").split(",") if r]
    if not resumed:
        return children
    earlier = mlflow.search_runs([experiment_id], filter_string="attributes.run_id IN ({})".format(
        ", ".join(f"'{r}'" for r in resumed)), max_results=50000)
    return pd.concat([children, earlier], ignore_index=True).drop_duplicates("run_id")


def with_group_defaults(client, runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the keys inside a config group that some runs set and others left at their
    option's default filled in from each run's ``config.yaml``. A run logs a group's keys only where
    the command line set them (``tracking.run.logged_params``), so ``reducer.n_neighbors=40`` in one
    UMAP run and the default in another read as 40 against missing, which a report could not tell
    from a run too old to log the key: the summary's "what varied" left them out. A run without a
    ``config.yaml``, or a key its config lacks, stays missing."""
    import tempfile

    from omegaconf import OmegaConf

    from latentmap.tracking.run import flatten

    if runs.empty:
        return runs
    groups = {c.removeprefix("params.choice.") for c in runs.columns if c.startswith("params.choice.")}
    partial = [c for c in runs.columns if c.startswith("params.") and not c.startswith("params.choice.")
               and c.removeprefix("params.").split(".")[0] in groups and runs[c].isna().any() and runs[c].notna().any()]
    if not partial:
        return runs
    runs = runs.copy()
    for index, row in runs.iterrows():
        missing = [c for c in partial if pd.isna(row[c])]
        if not missing:
            continue
        try:
            with tempfile.TemporaryDirectory() as folder:
                config = OmegaConf.load(client.download_artifacts(row["run_id"], "config.yaml", folder))
                flat = flatten(OmegaConf.to_container(config, resolve=False))
        except Exception:  # noqa: BLE001 - a run without its config keeps its keys missing
            log.debug("no config.yaml for run %s", row["run_id"], exc_info=True)
            continue
        for column in missing:
            value = flat.get(column.removeprefix("params."))
            if value is not None:
                runs.at[index, column] = value
    return runs


def log_summary(client, run_id: str, folder: Path, runs: pd.DataFrame | None = None,
                max_cka_images: int = 2000) -> Path:
    """Summarize ``runs`` (default: the children of ``run_id``) into ``folder`` and log it to ``run_id``.

    The multirun parent callback calls this when a sweep ends (``conf/hydra/default.yaml`` names it),
    and ``scripts/report.py`` for any selection of runs.
    """
    if runs is None:
        runs = child_runs(client, run_id)
    finished = with_group_defaults(client, runs[runs["status"] == "FINISHED"] if not runs.empty else runs)
    log.info("summarising %d finished runs into report.html (tables, figures, similarity panels, pairwise "
             "differences)", len(finished))
    summary = summarize(finished, max_cka_images=max_cka_images)
    if summary.table.empty:
        log.info("no finished runs to summarize for %s", run_id)
        return folder
    differences, summary.difference_note = pairwise_differences(client, summary.table, summary.varied)
    if not differences.empty:
        summary.tables["differences"] = differences
    by_depth, figures, note = per_class_by_depth(client, summary.table)
    if not by_depth.empty:
        summary.tables["per_class_by_depth"] = by_depth
        summary.figures.update(figures)
        log.info("per class by depth: %s", note)
    write(summary, folder)
    linked_page(client, summary.table, summary.varied, folder)
    left_out = runs[runs["status"] != "FINISHED"] if not runs.empty else runs
    write_report(client, run_id, summary, folder,
                 [f"{_name_of(row)} ({row['status']})" for _, row in left_out.iterrows()])
    client.log_artifacts(run_id, str(folder))
    log.info("summary of %d runs logged to run %s (report.html)", len(summary.table), run_id)
    return folder


def _name_of(row) -> str:
    """A run's name, or its id's first 8 characters where it has none."""
    name = row.get("tags.mlflow.runName")
    return str(name) if isinstance(name, str) and name else str(row["run_id"])[:8]


def linked_runs(table: pd.DataFrame, varied: list[str]) -> list[int]:
    """Rows of the study's table that compare.html shows: all of them up to six; for a layer study,
    the first, middle and last block of the first setting of everything else that varied (one
    model, one reducer); otherwise the first six."""
    from latentmap.linked import MAX_RUNS

    if len(table) <= MAX_RUNS:
        return list(range(len(table)))
    if "layer" not in varied:
        return list(range(MAX_RUNS))
    rows = table.reset_index(drop=True)
    others = [f"varied.{key}" for key in varied if key != "layer" and f"varied.{key}" in rows]
    same = rows[(rows[others] == rows.loc[0, others]).all(axis=1)] if others else rows
    if len(same) < 2:  # the first run's other settings are missing (None) or unique: all the runs
        same = rows
    same = same.assign(_block=pd.to_numeric(same["varied.layer"], errors="coerce")).sort_values("_block")
    positions = sorted({0, (len(same) - 1) // 2, len(same) - 1})
    return [int(same.index[i]) for i in positions]


def linked_page(client, table: pd.DataFrame, varied: list[str], folder: Path) -> Path | None:
    """``compare.html`` in ``folder`` for the study's runs (:func:`linked_runs`), or None with one log
    line when they did not map the same images (a sweep over datasets) or cannot be read back."""
    from mlflow.exceptions import MlflowException

    from latentmap import linked
    from latentmap.commands.compare import compare
    from latentmap.errors import ConfigError

    chosen = linked_runs(table, varied)
    if len(chosen) < 2:
        return None
    rows = table.reset_index(drop=True).iloc[chosen]
    if "halves_digest" in rows and pd.isna(rows["halves_digest"].iloc[0]) and rows["halves_digest"].notna().any():
        # A is paired with every other run: a run scored without half-samples (metrics.bootstrap=0) pairs with
        # none, so the first run that has them is A (the maps still show every run)
        first = int(rows["halves_digest"].notna().to_numpy().argmax())
        rows = pd.concat([rows.iloc[[first]], rows.drop(rows.index[first])])
    run_ids = rows["run_id"].tolist()
    try:
        import tempfile

        from omegaconf import OmegaConf

        with tempfile.TemporaryDirectory() as tmp:
            logged = OmegaConf.load(client.download_artifacts(run_ids[0], "config.yaml", tmp))
        if "metrics" not in logged:  # a fine-tuning sweep's runs: no maps to put side by side
            log.info("no compare.html for this sweep: its runs are not mapping runs (no maps)")
            return None
        confidence = float(logged.metrics.confidence)
        tables = {}
        for other in run_ids[1:]:
            try:
                tables[other] = compare(client, run_ids[0], other, confidence)
            except ConfigError as error:  # other half-samples: the maps still compare, the table is empty
                log.info("compare.html: no paired table of %s and %s: %s", run_ids[0][:8], other[:8], error)
        page = linked.for_runs(client, run_ids, str(client.tracking_uri), confidence, tables,
                               [run_label(row, varied) for _, row in rows.iterrows()],
                               note=f"{len(run_ids)} of the study's {len(table)} runs.")
    except (ConfigError, OSError, MlflowException) as error:
        log.info("no compare.html for this study: %s", error)
        return None
    target = folder / "compare.html"
    target.write_text(page, encoding="utf-8")
    log.info("compare.html: %d runs side by side, linked (%s)", len(run_ids),
             ", ".join(run_label(row, varied) for _, row in rows.iterrows()))
    return target


MAX_PER_CLASS_LINES = 20  # classes drawn in the per-class depth figures (the table holds them all)


def per_class_by_depth(client, table: pd.DataFrame) -> tuple[pd.DataFrame, dict, str]:
    """In a layer study: each class's k-NN and probe accuracy by depth, from each run's
    ``tables/per_class.csv`` (the first line of runs, when several share the depths: the rates are
    the embedding's, the same for any reducer), a figure per rate with a line per class and its
    interval, and which classes separate early and which late (the depth at which a class first
    reaches 90% of its best k-NN accuracy)."""
    import tempfile

    from latentmap.plots import studies as study_plots

    empty = pd.DataFrame(), {}, ""
    if table.empty or table["relative_depth"].nunique() < 2:
        return empty
    first = table[table["group"] == table["group"].iloc[0]]
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, row in first.iterrows():
            try:
                path = client.download_artifacts(row["run_id"], "tables/per_class.csv", str(Path(tmp) / row["run_id"]))
            except Exception:  # noqa: BLE001 - a run made without the audit has no per-class table
                continue
            # class names as written ("NA" and "None" are names here, not missing values; "007" is not 7)
            found = pd.read_csv(path, dtype={"class": str}, keep_default_na=False, na_values=[""])
            found["relative_depth"], found["layer_index"] = row["relative_depth"], row["layer_index"]
            frames.append(found)
    if len(frames) < 2:
        return empty
    by_depth = pd.concat(frames, ignore_index=True).sort_values(["label", "relative_depth"], kind="stable")
    figures = {}
    classes = list(dict.fromkeys(by_depth["class"]))
    for rate in ("knn_acc", "probe_acc"):
        if rate not in by_depth or by_depth[rate].isna().all() or len(classes) > MAX_PER_CLASS_LINES:
            continue
        lines = [(str(name), rows) for name, rows in by_depth.groupby("class", sort=False)]
        figure = study_plots.depth(lines, rate)
        figure.axes[0].set_title(f"per class: {rate} by depth (bands: confidence intervals)")
        figures[f"per_class_depth_{rate}"] = figure
    reached = {}
    for name, rows in by_depth.groupby("class", sort=False):
        best = rows["knn_acc"].max()
        reached[name] = float(rows.loc[rows["knn_acc"] >= 0.9 * best, "relative_depth"].min())
    order = sorted(reached, key=lambda name: reached[name])
    early = ", ".join(f"{n} ({reached[n]:.2f})" for n in order[:3])
    late = ", ".join(f"{n} ({reached[n]:.2f})" for n in order[-3:])
    note = f"earliest to reach 90% of its best k-NN accuracy (relative depth): {early}; latest: {late}"
    return by_depth.reset_index(drop=True), figures, note


MAX_REPORT_MAPS = 60  # thumbnails of child maps in report.html (each about 60 KB)


def write_report(client, run_id: str, summary: Summary, folder: Path, left_out: list[str] | None = None) -> Path:
    """``report.html`` in ``folder``: the study on one self-contained page (:mod:`latentmap.report`);
    ``left_out`` names the selected runs that did not finish (a sweep's failed jobs), which it says."""
    import tempfile
    import time

    from latentmap import report

    parent = client.get_run(run_id)
    experiment = parent.info.experiment_id
    uri = str(getattr(client, "tracking_uri", ""))
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"  # mlflow ui's default
    varied = summary.varied
    grid = _grid_keys(summary.table, varied)
    items = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (_, row) in enumerate(summary.table.iterrows()):
            thumb = None
            if i < MAX_REPORT_MAPS:
                try:  # each run's file in a folder of its own: every run's scatter is named the same
                    folder_of_run = Path(tmp) / row["run_id"]
                    folder_of_run.mkdir()
                    thumb = _thumbnail(Path(client.download_artifacts(row["run_id"], "plots/scatter.png",
                                                                      str(folder_of_run))))
                except Exception:  # noqa: BLE001 - a run without plots (plots.enabled=false) has no thumbnail
                    thumb = None
            values = {key: report.block_of(row) if key == "layer" else str(row.get(f"varied.{key}") or "")
                      for key in varied}
            items.append({"name": str(row.get("run_name") or row["run_id"][:8]),
                          "label": run_label(row, varied), "values": values,
                          "extra": run_label(row, varied, skip=grid) if len(varied) > 2 else "",
                          "href": f"{ui}/#/experiments/{experiment}/runs/{row['run_id']}/artifacts/map.html"
                                  "?workflowType=machine_learning",
                          "thumb": thumb})
        figures = {name: folder / "plots" / f"{name}.png" for name in summary.figures}
        linked_note = ""
        if (folder / "compare.html").is_file():
            href = f"{ui}/#/experiments/{experiment}/runs/{run_id}/artifacts/compare.html?workflowType=machine_learning"
            linked_note = (f'<p class="note" id="linked">The maps side by side, linked (hover and selection): '
                           f'<a href="{href}" target="_top">compare.html</a> in this run\'s artifacts.</p>')
        comparisons = {name: folder / "plots" / f"{name}.png" for name in summary.comparisons}
        count = len(summary.table)
        name = client.get_experiment(experiment).name
        note = (f"{count} finished run{'s' if count != 1 else ''} of experiment {name!r} ({experiment}), summarised "
                f"into run {parent.info.run_name} ({run_id}) on {time.strftime('%Y-%m-%d %H:%M')}.")
        if left_out:
            deleted = any(n.endswith("(DELETED)") for n in left_out)
            how = ("did not finish" if not deleted else "was deleted" if len(left_out) == 1
                   else "did not finish or were deleted")
            note += (f" Not in this page: {len(left_out)} run{'s' if len(left_out) != 1 else ''} that {how}: "
                     f"{', '.join(left_out[:10])}{', ...' if len(left_out) > 10 else ''}.")
        text = report.study_page(
            f"latentmap · {parent.info.run_name}", note, varied, summary.constant, summary.table, list(HEADLINE),
            list(METRICS), comparisons, summary.tables.get("differences"), summary.difference_note, figures,
            summary.tables, linked_note + (report.map_grid(items, *grid) if items else ""))
    target = folder / "report.html"
    target.write_text(text, encoding="utf-8")
    return target


def _grid_keys(table: pd.DataFrame, varied: list[str]) -> tuple[str | None, str | None]:
    """(rows, columns) of the map grid: the two varied settings, the one with more values as the
    columns (the layer in a layer study); (None, None) when not exactly two vary."""
    if len(varied) != 2:
        return None, None
    counts = {key: table.get(f"varied.{key}", pd.Series(dtype=object)).nunique() for key in varied}
    rows, columns = sorted(varied, key=lambda key: (counts[key], key == "layer"))
    return rows, columns


def _thumbnail(path: Path, width: int | None = None) -> Path:
    """A copy of a PNG beside it, as wide as report.html draws a map at most (``report.MAP_PIXELS``),
    so that no map is drawn larger than its pixels."""
    from latentmap.report import MAP_PIXELS

    width = width or MAP_PIXELS
    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((width, width * 2))
        small = path.with_name(path.stem + "_thumb.png")
        image.save(small)
    return small
