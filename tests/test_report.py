"""report.html's pieces, on hand-made tables: the runs table says each varied setting in its own
column (empty, never ``nan``, where a run lacks one; ``embed`` for the model's own embedding), each
metric cell carries its exact value; the map grid is laid out by the two swept settings; the
pairwise table greys what the adjusted p-value does not support; the page opens with what varied."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from latentmap import report


def _table() -> pd.DataFrame:
    return pd.DataFrame({
        "run_id": ["a" * 32, "b" * 32, "c" * 32], "run_name": ["run a", "run b", "run c"],
        "pool": ["embed", "mean", "mean"], "layer_index": [5.0, 0.0, 2.0],
        "varied.model": ["vit", "resnet", None], "varied.layer": ["-1", "0", "2"],
        "knn_acc_hd": [0.9, 0.8, np.nan], "knn_acc_hd_lo": [0.85, np.nan, np.nan],
        "knn_acc_hd_hi": [0.95, np.nan, np.nan],
    })


def test_the_runs_table_says_each_setting_once_and_each_value_exactly():
    html = report.summary_table(_table(), ["knn_acc_hd", "probe_acc"], ["model", "layer"])
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", html)
    assert heads == ["model", "layer", "knn_acc_hd"]  # a metric no run has is left out
    rows = re.findall(r"<tr data-run=.*?</tr>", html)
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in rows]
    assert cells[0] == ["vit", "embed", "0.900 [0.850, 0.950]"]  # embed, not the unused layer setting
    assert cells[1] == ["resnet", "0", "0.800"]  # no interval: no brackets
    assert cells[2] == ["", "2", "-"]  # a setting the run lacks is empty; a missing value is a dash
    assert "nan" not in html
    assert 'data-metric="knn_acc_hd" data-value="0.9"' in html


def test_the_map_grid_has_a_row_and_a_column_per_swept_value():
    items = [{"name": f"{m}-{r}", "label": f"model={m} · reducer={r}", "values": {"model": m, "reducer": r},
              "extra": "", "href": f"http://x/{m}/{r}", "thumb": None}
             for m in ("vit", "resnet") for r in ("pca", "umap")]
    grid = report.map_grid(items, "model", "reducer")
    assert re.findall(r'class="colhead">([^<]*)<', grid) == ["reducer=pca", "reducer=umap"]
    assert re.findall(r'class="rowhead">([^<]*)<', grid) == ["model=vit", "model=resnet"]
    assert re.findall(r'href="([^"]*)"', grid) == ["http://x/vit/pca", "http://x/vit/umap", "http://x/resnet/pca",
                                                  "http://x/resnet/umap"]  # row by row
    single = report.map_grid(items[:2], None, None)
    assert 'class="maps"' in single and "model=vit · reducer=pca" in single


def test_the_pairwise_table_greys_what_the_adjusted_p_value_does_not_support():
    table = pd.DataFrame({"run_a": ["a", "a"], "run_b": ["b", "c"], "contrast": ["model: vit vs resnet"] * 2,
                          "fixed": ["reducer=pca", "reducer=umap"], "metric": ["knn_acc_hd", "trustworthiness"],
                          "a": [0.9, 0.9], "b": [0.8, 0.89], "difference": [0.1, 0.01], "lo": [0.05, -0.02],
                          "hi": [0.15, 0.04], "p_value": [0.001, 0.04], "p_holm": [0.002, 0.08]})
    html = report.differences_table(table)
    rows = re.findall(r"<tr data-a=.*?</tr>", html)
    assert 'class="weak"' not in rows[0] and rows[1].count('class="weak"') == 2  # p and p (Holm) greyed
    assert "+0.100 [+0.050, +0.150]" in rows[0]


def test_every_page_prints_numbers_and_p_values_alike():
    """report.html and compare.html print values, differences and p-values through one set of
    formatters: three decimals, a sign on differences, no -0.000, <1e-4 for tiny p-values, - for
    none."""
    assert report.number(-0.0004) == "0.000" and report.number(-0.0004, signed=True) == "0.000"
    assert report.number(0.1234) == "0.123" and report.number(-0.1236, signed=True) == "-0.124"
    assert report.number(0.05, signed=True) == "+0.050" and report.number(float("nan")) == "-"
    assert report.interval(0.01, -0.0002, 0.02, signed=True) == "+0.010 [0.000, +0.020]"
    assert report.interval(0.5, float("nan"), float("nan")) == "0.500"
    assert [report.p_text(p) for p in (0.0123456, 3e-5, 1.0, float("nan"))] == ["0.0123", "<1e-4", "1", "-"]
    from latentmap import linked

    table = pd.DataFrame({"metric": ["knn_acc_hd", "silhouette_2d"], "a": [0.9, 0.1], "b": [0.9, 0.12],
                          "difference": [0.0, -0.02], "lo": [0.0, -0.04], "hi": [0.0, -0.00001],
                          "p_value": [np.nan, 2e-6], "p_holm": [np.nan, 2e-6]})
    page = linked.numbers_html(("A", "B"), ("run a", "run b"), table, None, 0.95)
    assert "-0.020 [-0.040, 0.000]" in page and "<td>&lt;1e-4</td>" in page
    assert "over the 1 metric tested in this table" in page and "1 equal in both runs" in page
    assert "-0.000" not in page
    # a NaN p-value that is not two equal runs (too few half-samples gave a value) is not called equal
    fewer = table.assign(same_input=[False, False])
    page = linked.numbers_html(("A", "B"), ("run a", "run b"), fewer, None, 0.95)
    assert "equal in both runs" not in page and "1 without a test (too few half-samples gave a value)" in page


def test_every_study_figure_is_captioned_in_words_and_by_its_file():
    """A figure's caption says what it shows (each metric a study draws has its words) and names its
    file among the run's artifacts; it was the file's name alone."""
    from latentmap.metrics import MEANING
    from latentmap.studies import METRICS

    assert set(METRICS) <= set(MEANING)
    assert report.caption("compare_knn_acc_hd") == (
        f"knn_acc_hd of each run, its value and interval: {MEANING['knn_acc_hd']}. plots/compare_knn_acc_hd.png")
    assert report.caption("depth_probe_balanced_acc").startswith("probe_balanced_acc against relative depth: ")
    assert report.caption("per_class_depth_knn_acc").startswith("knn_acc of each class against relative depth: ")
    assert report.caption("cka_vit_cls").startswith("linear CKA between every two blocks, vit_cls (model_pool)")
    page = report.study_page("t", "", [], {}, pd.DataFrame(), [], [], {}, None, "",
                             {"depth_twonn_id": _tiny_figure()}, {}, "")
    import html

    said = f"twonn_id against relative depth: {MEANING['twonn_id']}. plots/depth_twonn_id.png"
    assert f"<figcaption>{html.escape(said)}</figcaption>" in page


def _tiny_figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1))
    figure.add_subplot().plot([0, 1])
    return figure


def test_the_page_opens_with_what_varied_and_what_every_run_shares():
    page = report.study_page("latentmap · a sweep", "3 runs.", ["model", "layer"], {"dataset": "digits", "seed": "42"},
                             _table(), ["knn_acc_hd"], ["knn_acc_hd"], {}, None, "", {}, {}, "")
    assert "What varied: <b>model</b> (2: resnet, vit) &middot; <b>layer</b> (3: -1, 0, 2)" in page
    assert "Shared by every run: dataset=digits · seed=42" in page
    assert "<h2>Figures</h2>" not in page  # no empty heading when a sweep has no figures
    assert page.index("What varied") < page.index('id="summary"')


def test_a_test_two_pairs_share_is_one_row_of_the_holm_family(monkeypatch):
    """A 2 x 2 sweep (model x reducer): the k-NN accuracy of two models is the same test whichever
    reducer mapped them (it reads the embeddings only), so it is one row, naming both reducers,
    and Holm's family counts it once; a map metric, which differs by reducer, keeps a row a pair."""
    from latentmap import linked, logged, stats, study_report

    rng = np.random.default_rng(0)
    halves = {model: rng.normal(0.8 if model == "vit" else 0.7, 0.02, 10) for model in ("vit", "pixels")}
    maps = {(model, reducer): rng.normal(0.9, 0.02, 10) for model in ("vit", "pixels") for reducer in ("pca", "umap")}
    runs = [(model, reducer) for model in ("vit", "pixels") for reducer in ("pca", "umap")]
    table = pd.DataFrame({"run_id": [f"{m}-{r}" for m, r in runs], "varied.model": [m for m, _ in runs],
                          "varied.reducer": [r for _, r in runs], "halves_digest": "h", "dataset_fingerprint": "f",
                          "relative_depth": 1.0, "halves_scale": 0.5,
                          "map_refit": [{"pca": "true", "umap": "false"}[r] for _, r in runs]})

    def halves_table(client, run_id):
        model, reducer = run_id.split("-")
        by_metric = {"knn_acc_hd": halves[model], "trustworthiness": maps[(model, reducer)]}
        values = pd.DataFrame({"metric": list(by_metric), "value": [v.mean() for v in by_metric.values()],
                               "n": 500}).set_index("metric")
        return values, pd.DataFrame(by_metric)

    monkeypatch.setattr(logged, "halves_table", halves_table)
    found, note = study_report.pairwise_differences(None, table, ["model", "reducer"],
                                                    ["knn_acc_hd", "trustworthiness"])
    knn = found[(found["metric"] == "knn_acc_hd") & found["contrast"].str.startswith("model")]
    assert len(knn) == 1 and knn["fixed"].iloc[0] == "reducer=pca; reducer=umap"
    trust = found[(found["metric"] == "trustworthiness") & found["contrast"].str.startswith("model")]
    assert len(trust) == 2  # a map metric: one test a reducer
    # knn_acc_hd between reducers is the same embedding twice: left out. The family: 1 + 2 + 2 rows.
    assert len(found) == 5 and "is one row" in note
    # The reducer contrast pairs PCA's refitted map with UMAP's held-fixed one, and the note says so
    # once, for the map metrics the table holds; the model contrast pairs like with like.
    said = ("In reducer: pca vs umap: the map metrics (trustworthiness) pair pca's map refitted on each "
            "half-sample with umap's map held fixed")
    assert note.count(said) == 1
    # The model contrast pairs like with like: PCA's maps both refitted (no note), UMAP's both held
    # fixed, which the note says once, with what the calibration measured.
    both = "In model: vit vs pixels (reducer=umap): both maps were held fixed on the half-samples"
    assert note.count(both) == 1 and "(reducer=pca)" not in note and linked.HELD_FIXED_RATE in note
    # Every map held fixed: one sentence names every pair, once.
    fixed_note = study_report.pairwise_differences(None, table.assign(map_refit="false"), ["model", "reducer"],
                                                   ["knn_acc_hd", "trustworthiness"])[1]
    assert fixed_note.count("both maps were held fixed") == 1 and fixed_note.count(linked.HELD_FIXED_RATE) == 1
    assert "model: vit vs pixels (reducer=pca); model: vit vs pixels (reducer=umap)" in fixed_note
    # Runs made before the tag: what their tables/metrics.csv method says instead.
    untagged = table.assign(map_refit=[None if r == "umap" else "true" for _, r in runs])

    def with_methods(client, run_id):
        values, by_half = halves_table(client, run_id)
        return values.assign(method="t over 10 half-samples; the 2-D map held fixed"), by_half

    monkeypatch.setattr(logged, "halves_table", with_methods)
    assert said in study_report.pairwise_differences(None, untagged, ["model", "reducer"], ["trustworthiness"])[1]
    # A study of metrics.refit_map itself: that contrast is the point, not a caveat.
    refits = table.assign(**{"varied.metrics.refit_map": table["map_refit"]}).drop(columns="varied.reducer")
    refits = refits[refits["varied.model"] == "vit"]
    found, note = study_report.pairwise_differences(None, refits, ["metrics.refit_map"], ["trustworthiness"])
    assert len(found) == 1 and "map metrics" not in note
    assert found["p_holm"].tolist() == pytest.approx(list(stats.adjust(found["p_value"].to_numpy(), "holm")))
    # A run whose tables cannot be read: its pairs are left out, and the page's note says so and why
    # (it was said in the log alone)
    from latentmap.errors import ConfigError

    def one_gone(client, run_id):
        if run_id == "pixels-umap":
            raise ConfigError("run pixels-umap has no artifacts where its store says they are (/x): moved")
        return halves_table(client, run_id)

    monkeypatch.setattr(logged, "halves_table", one_gone)
    found, note = study_report.pairwise_differences(None, table, ["model", "reducer"], ["knn_acc_hd",
                                                                                         "trustworthiness"])
    assert set(found["run_a"]) | set(found["run_b"]) == {"vit-pca", "vit-umap", "pixels-pca"}
    assert (" 2 of the 4 pairs are left out: the half-sample tables of 1 run could not be read (run pixels-umap has "
            "no artifacts where its store says they are (/x): moved).") in note, note


def test_the_maps_of_a_2_x_2_sweep_are_drawn_at_their_pixels_at_1000_and_1400_px(tmp_path):
    """report.html's grid of maps: each run's scatter.png, thumbnailed as a report does, is drawn
    at most as wide as its pixels (a 240-pixel thumbnail was stretched to 300 px, too small to read)
    and at least 400 px wide at 1,400 px. Screenshots kept."""
    from matplotlib.figure import Figure

    from latentmap.study_report import _thumbnail

    from test_look import SCREENSHOT, _pages

    items = []
    for model in ("efficientnet_lite0", "pixels"):
        for reducer in ("pca", "umap"):
            figure = Figure(figsize=(8, 6.5))  # the size of a run's scatter.png (plots.scatter)
            figure.add_subplot().scatter(*np.random.default_rng(0).normal(size=(2, 500)), s=2)
            png = tmp_path / f"{model}-{reducer}" / "scatter.png"
            png.parent.mkdir()
            figure.savefig(png, dpi=150)
            items.append({"name": f"{reducer} · {model}", "label": "", "values": {"model": model, "reducer": reducer},
                          "extra": "", "href": "http://127.0.0.1:5000/", "thumb": _thumbnail(png)})
    page_file = tmp_path / "report.html"
    page_file.write_text(report.study_page("sweep", "", [], {}, pd.DataFrame(), [], [], {}, None, "", {}, {},
                                           report.map_grid(items, "model", "reducer")))
    with _pages() as open_page:
        for width in (1000, 1400):
            with open_page(page_file, width) as page:
                maps = page.evaluate("() => Array.from(document.querySelectorAll('.mapgrid img'), "
                                     "(img) => [img.naturalWidth, img.getBoundingClientRect().width])")
                assert len(maps) == 4 and all(natural >= shown - 1 for natural, shown in maps), maps
                if width == 1400:
                    assert min(shown for _, shown in maps) >= 400, maps
                assert page.evaluate("document.documentElement.scrollWidth") <= width
                page.screenshot(path=str(SCREENSHOT.with_name(f"report-maps-{width}.png")))


def test_a_test_shared_by_many_pairs_wraps_its_settings_and_the_table_fits_at_1000_px(tmp_path):
    """The 'with' cell of a test four pairs share names four settings: it wraps, and the pairwise
    table fits a 1,000-px window (it was 1,377 px wide, its p-values off screen)."""
    from test_look import _pages

    fixed = "; ".join(f"metrics.k={k} · model.size={s}" for k in (5, 10) for s in (8, 16))
    table = pd.DataFrame({"run_a": ["a"], "run_b": ["b"], "contrast": ["reducer: pca vs umap"], "fixed": [fixed],
                          "metric": ["probe_balanced_acc"], "a": [0.9], "b": [0.8], "difference": [0.1],
                          "lo": [0.05], "hi": [0.15], "p_value": [0.001], "p_holm": [0.002]})
    page_file = tmp_path / "report.html"
    page_file.write_text(report.study_page("sweep", "", [], {}, pd.DataFrame(), [], [], {}, table, "note", {}, {}, ""))
    with _pages() as open_page:
        for width in (1000, 1400):
            with open_page(page_file, width) as page:
                fits = page.evaluate("(() => { const t = document.querySelector('#differences'); "
                                     "return [t.scrollWidth, t.clientWidth]; })()")
                assert fits[0] <= fits[1], (width, fits)


def test_per_class_depth_keeps_class_names_a_csv_reader_would_guess(tmp_path):
    """A layer study's per-class lines are read back from each run's tables/per_class.csv: a class
    named "NA" or "None" (missing values to a CSV reader, so their lines were dropped) or "007"
    (read as 7) keeps its name, and a rate the run left empty stays missing."""
    from pathlib import Path

    from latentmap import study_report

    names = ["NA", "None", "007", "cat"]
    runs = pd.DataFrame({"run_id": ["r0", "r1"], "relative_depth": [0.0, 1.0], "layer_index": [0, 1],
                         "group": ["g", "g"]})

    class Client:  # the one call per_class_by_depth makes of MLflow's client
        def download_artifacts(self, run_id, path, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            depth = 0.5 if run_id == "r0" else 0.9
            table = pd.DataFrame({"label": range(4), "class": names, "knn_acc": [depth] * 4,
                                  "knn_acc_lo": [depth - 0.1] * 4, "knn_acc_hi": [depth + 0.1] * 4,
                                  "probe_acc": [np.nan] * 4})
            target = Path(folder) / "per_class.csv"
            table.to_csv(target, index=False)
            return str(target)

    by_depth, figures, note = study_report.per_class_by_depth(Client(), runs)
    assert sorted(by_depth["class"].unique()) == sorted(names) and len(by_depth) == 8
    assert by_depth["probe_acc"].isna().all() and by_depth["knn_acc"].dtype == float
    assert set(figures) == {"per_class_depth_knn_acc"} and "NA (" in note
