"""Layer studies: the sweep summary, its report page and cross-model similarity (the report command
itself: test_readme.test_readme_layer_study_and_its_reports)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from latentmap import cache, measures, stats, studies
from latentmap.measures import linear_cka

from helpers import CONF, ROOT, cache_entries, extraction, mlflow_runs

sys.path.insert(0, str(ROOT / "scripts"))


def _parent_and_children(out: Path):
    client, runs = mlflow_runs(out)
    parent = next(r for r in runs if r.data.tags.get("latentmap.role") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def test_parent_summary_has_one_row_per_layer_matching_the_children(layer_sweep, tiny_vit, tiny_vit_b):
    """The shared sweep (two tiny ViTs of 3 and 2 blocks, blocks 0 and 1): one summary row per child,
    relative depth from each model's own block count, one line per model, one CKA table per model."""
    client, parent, children = _parent_and_children(layer_sweep)
    assert len(children) == 4 and [c.data.tags["cache"] for c in children].count("miss") == 2
    root = Path(client.download_artifacts(parent.info.run_id, ""))
    summary = pd.read_csv(root / "summary.csv")
    for model, depths in ((tiny_vit, [0.0, 0.5]), (tiny_vit_b, [0.0, 1.0])):
        rows = summary[summary["model"] == str(model)].sort_values("layer_index")
        assert rows["layer_index"].tolist() == [0, 1]
        np.testing.assert_allclose(rows["relative_depth"], depths)
    by_run = {c.info.run_id: c.data.metrics for c in children}
    logged = [m for m in studies.METRICS if m in children[0].data.metrics]  # the sweep ran without the probe
    assert "knn_acc_weighted" in logged and "probe_acc" not in logged
    for _, row in summary.iterrows():
        for metric in logged:
            for suffix in ("", "_lo", "_hi"):  # an interval a run did not log (RankMe's, here) is NaN
                expected = by_run[row["run_id"]].get(metric + suffix, np.nan)
                assert row[metric + suffix] == pytest.approx(expected, abs=1e-12, nan_ok=True)
    for metric in logged:
        assert (root / "plots" / f"depth_{metric}.png").is_file()
    assert not (root / "plots" / "depth_probe_acc.png").exists()  # no curve for a metric no run has
    # the audit's per-class table of each child, by depth: a row per class and layer of one model's line
    by_depth = pd.read_csv(root / "tables" / "per_class_by_depth.csv")
    assert len(by_depth) == 4 * 2 and set(by_depth["layer_index"]) == {0, 1}
    assert by_depth["knn_acc"].between(0, 1).all() and list(by_depth["class"].unique()) == [
        "blue", "green", "red", "yellow"]
    assert (root / "plots" / "per_class_depth_knn_acc.png").is_file()
    # One line per model (the only setting besides the layer that differs), holding its children's values.
    lines = studies.depth_figure(summary, "knn_acc_hd").axes[0].get_lines()
    assert len(lines) == 2
    for line in lines:
        rows = summary[summary["group"] == line.get_label()].sort_values("relative_depth")
        np.testing.assert_allclose(line.get_xdata(), rows["relative_depth"])
        np.testing.assert_allclose(line.get_ydata(), [by_run[r]["knn_acc_hd"] for r in rows["run_id"]])
    # Each CKA table equals pairwise CKA of that model's cached block features (all its blocks).
    for model, blocks_count in ((tiny_vit, 3), (tiny_vit_b, 2)):
        child = next(c for c in children if c.data.params["model.name"] == str(model))
        name = f"cka_{studies._slug(str(model))}_cls"
        cka = pd.read_csv(root / "tables" / f"{name}.csv", index_col=0).to_numpy()
        blocks = cache.block_features(layer_sweep / "cache", child.data.tags["cache_key"], "cls")
        assert len(blocks) == blocks_count
        np.testing.assert_allclose(cka, [[linear_cka(a, b) for b in blocks] for a in blocks], atol=1e-10)
        # The similarity panel: each measure's block x block table is the measure of those blocks, and
        # every block is held against the final block with its null and interval (32 images, k=8).
        slug = f"{studies._slug(str(model))}_cls"
        for measure in measures.PANEL:
            table = pd.read_csv(root / "tables" / f"panel_{slug}_{measure}.csv", index_col=0).to_numpy()
            expected = [[measures.panel_values(a, b, k=8)[measure] for b in blocks] for a in blocks]
            np.testing.assert_allclose(table, expected, atol=1e-9)
        to_last = pd.read_csv(root / "tables" / f"to_last_{slug}.csv")
        assert sorted(set(to_last["block"])) == list(range(blocks_count))
        assert set(to_last["measure"]) == set(measures.PANEL)
        # The blocks x measures are one family, Benjamini-Hochberg adjusted.
        np.testing.assert_allclose(to_last["p_adjusted"], stats.adjust(to_last["p_value"].to_numpy(), "bh"))
        final = to_last[(to_last["block"] == blocks_count - 1) & (to_last["measure"] == "cka_debiased")].iloc[0]
        assert final["value"] == pytest.approx(1.0) == final["lo"] == final["hi"]  # itself: the same input,
        assert np.isnan(final["p_value"]) and np.isnan(final["p_adjusted"])  # not tested, outside the family
        assert to_last[to_last["block"] < blocks_count - 1]["p_value"].notna().all()
        assert (root / "plots" / f"panel_{slug}.png").is_file()


def test_a_report_by_filter_spans_both_models_and_writes_where_asked(layer_sweep, tmp_path):
    """report.main on the two-model sweep, a filter on the block that both models have, an
    ``--output-dir`` of its own: a FINISHED report run (its id returned) whose summary holds block 1
    of each model, its files under that folder (the README's three report commands, with the default
    folder: test_readme.test_readme_layer_study_and_its_reports)."""
    import report

    client, _, _ = _parent_and_children(layer_sweep)
    run_id = report.main(["params.pool = 'cls' and params.layer = '1'", "--tracking-uri",
                          f"sqlite:///{layer_sweep}/mlflow.db", "--output-dir", str(tmp_path / "elsewhere")])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["latentmap.role"] == "report"
    summary = pd.read_csv(Path(client.download_artifacts(run_id, "summary.csv")))
    assert summary["layer_index"].tolist() == [1, 1] and summary["model"].nunique() == 2, summary
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "elsewhere" / run_id / "summary.csv"), summary)
    # a run that is not a sweep's parent: said so (it read "no finished runs for children of ...")
    child = next(r for r in client.search_runs([run.info.experiment_id]) if r.data.tags.get("mlflow.parentRunId"))
    with pytest.raises(SystemExit, match=rf"error: {child.info.run_id} has no child runs: report.py summarises a "
                                         r"sweep's parent run, an experiment or a filter"):
        report.main([child.info.run_id, "--tracking-uri", f"sqlite:///{layer_sweep}/mlflow.db"])
    (tmp_path / "a-file").write_text("x")  # an --output-dir that cannot be made: one line, no report run
    before = len(client.search_runs([run.info.experiment_id]))
    with pytest.raises(SystemExit, match=r"^error: --output-dir .*a-file/x cannot be written \(.*a-file is not a "
                                         r"folder\): choose a writable folder$"):
        report.main(["params.pool = 'cls' and params.layer = '1'", "--tracking-uri",
                     f"sqlite:///{layer_sweep}/mlflow.db", "--output-dir", str(tmp_path / "a-file" / "x")])
    assert len(client.search_runs([run.info.experiment_id])) == before
    short = child.info.run_id[:8]  # as pages and logs show it: it read as a filter ("Invalid clause(s)")
    with pytest.raises(SystemExit, match=rf"error: {short} has no child runs: report.py summarises"):
        report.main([short, "--tracking-uri", f"sqlite:///{layer_sweep}/mlflow.db"])


def test_similarity_script_matches_pairwise_cka(tiny_vit, tiny_resnet, class_folder, tmp_path):
    from hydra import compose, initialize_config_dir

    import similarity

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("similarity", overrides=[
            f"output_dir={tmp_path}", "model@model_a=hf", f"model_a.name={tiny_vit}", "pool_a=cls",
            "model@model_b=hf", f"model_b.name={tiny_resnet}", "dataset=imagefolder",
            f"dataset.path={class_folder}", "tracking=none"])
    scores = similarity.similarity(cfg)
    artifacts = next(tmp_path.glob("runs/*/*/artifacts"))
    matrix = np.load(artifacts / "arrays/cka.npy")
    assert matrix.shape == (3, 3)
    assert {k: scores[k] for k in ("cka_first_blocks", "cka_last_blocks")} == {
        "cka_first_blocks": matrix[0, 0], "cka_last_blocks": matrix[-1, -1]}
    from latentmap import data
    from latentmap.models import TransformersBackbone

    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    vit = cache.all_blocks(TransformersBackbone(name=str(tiny_vit)), dataset, "cls", tmp_path / "cache", extraction())
    resnet = cache.all_blocks(TransformersBackbone(name=str(tiny_resnet)), dataset, "mean", tmp_path / "cache",
                              extraction())
    np.testing.assert_allclose(matrix, [[linear_cka(a, b) for b in resnet] for a in vit], atol=1e-10)
    assert len(cache_entries(tmp_path / "cache")) == 2  # one entry per model, nothing re-extracted
    # The panel block x block (32 images, k = 8), and the final blocks' with nulls and intervals.
    for measure in measures.PANEL:
        table = pd.read_csv(artifacts / f"tables/panel_{measure}.csv", index_col=0).to_numpy()
        np.testing.assert_allclose(table, [[measures.panel_values(a, b, 8)[measure] for b in resnet] for a in vit],
                                   atol=1e-9)
        assert scores[f"final_{measure}"] == pytest.approx(measures.panel_values(vit[-1], resnet[-1], 8)[measure])
    final = pd.read_csv(artifacts / "tables/panel_final.csv").set_index("measure")
    assert set(final.index) == set(measures.PANEL) and (final["p_value"] >= 1 / 201).all()
    np.testing.assert_allclose(final["p_holm"], stats.adjust(final["p_value"].to_numpy(), "holm"))
    assert (final["p_holm"] >= final["p_value"]).all()


def test_similarity_of_a_folder_with_an_unreadable_image_compares_the_images_both_read(tiny_vit, tiny_resnet,
                                                                                        class_folder, tmp_path):
    """With dataset.on_error=skip (the default) an unreadable image was counted in the dataset but not
    in the features: IndexError and a FAILED run. The two models are compared on the images both
    read, the skipped one named in tables/skipped.csv; rows each model skipped line up (common_rows)."""
    import shutil

    from hydra import compose, initialize_config_dir

    from latentmap import data
    from latentmap.models import TransformersBackbone

    import similarity

    folder = tmp_path / "images"
    shutil.copytree(class_folder, folder)
    first_class = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    (first_class / "zz-broken.png").write_bytes(b"not an image")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("similarity", overrides=[
            f"output_dir={tmp_path}", "model@model_a=hf", f"model_a.name={tiny_vit}", "pool_a=cls",
            "model@model_b=hf", f"model_b.name={tiny_resnet}", "dataset=imagefolder",
            f"dataset.path={folder}", "tracking=none"])
    similarity.similarity(cfg)
    artifacts = next(tmp_path.glob("runs/*/*/artifacts"))
    skipped = pd.read_csv(artifacts / "tables/skipped.csv")
    assert [Path(f).name for f in skipped["file"]] == ["zz-broken.png"]
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)  # the same images, none broken
    vit = cache.all_blocks(TransformersBackbone(name=str(tiny_vit)), dataset, "cls", tmp_path / "c", extraction())
    resnet = cache.all_blocks(TransformersBackbone(name=str(tiny_resnet)), dataset, "mean", tmp_path / "c",
                              extraction())
    np.testing.assert_allclose(np.load(artifacts / "arrays/cka.npy"),
                               [[linear_cka(a, b) for b in resnet] for a in vit], atol=1e-10)
    kept, positions = cache.common_rows(6, {"a": (1,), "b": (1, 4)})
    assert kept.tolist() == [0, 2, 3, 5] and positions["a"].tolist() == [0, 1, 2, 4]
    assert positions["b"].tolist() == [0, 1, 2, 3]


def test_summary_lines_separate_every_setting_that_differs_except_the_layer():
    """Runs of two seeds and two datasets over three layers: four lines of three points each, each
    with its confidence band, not one zig-zag line; device, batch size and reuse_freed_memory (logged
    only since it exists) never split a line."""
    from matplotlib.collections import PolyCollection

    rows = []
    for seed in ("1", "2"):
        for dataset in ("/data/a", "/data/b"):
            for layer in range(3):
                rows.append({"run_id": f"{seed}{dataset}{layer}", "status": "FINISHED", "params.model.name": "vit",
                             "params.pool": "cls", "params.reducer._target_": "sklearn.decomposition.PCA",
                             "params.seed": seed, "params.dataset.path": dataset, "params.layer": str(layer),
                             "params.batch_size": str(8 * (layer + 1)), "params.device": "cpu" if layer else "cuda",
                             # logged only by runs after the setting existed (the first seed's lack it)
                             **({"params.reuse_freed_memory": "True"} if seed == "2" else {}),
                             "tags.layer_index": str(layer), "tags.num_layers": "3",
                             "tags.relative_depth": str(layer / 2), "metrics.knn_acc_hd": 0.5 + 0.1 * layer,
                             # the map_refit tag: on the second seed's runs only (made after it existed)
                             **({"tags.map_refit": "true" if layer else "false"} if seed == "2" else {}),
                             "metrics.knn_acc_hd_lo": 0.45 + 0.1 * layer, "metrics.knn_acc_hd_hi": 0.55 + 0.1 * layer})
    runs = pd.DataFrame(rows)
    assert studies.group_keys(runs) == ["params.dataset.path", "params.seed"]
    table = studies.runs_table(runs)
    assert table["group"].nunique() == 4
    tagged = table["run_id"].str.startswith("2")
    assert table.loc[tagged, "map_refit"].tolist() == ["false", "true", "true"] * 2
    assert table.loc[~tagged, "map_refit"].isna().all()
    assert set(table["group"]) >= {"dataset.path=a · seed=1", "dataset.path=b · seed=2"}
    figure = studies.depth_figure(table, "knn_acc_hd")
    ax = figure.axes[0]
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [3, 3, 3, 3]
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 4  # one band a line
    assert len({line.get_marker() for line in ax.get_lines()}) == 4  # coinciding lines stay visible


def test_depth_lines_that_coincide_stay_apart_on_screen_and_exact_in_data():
    """Two reducers give the same embedding-space metric at every depth: their lines are drawn a few
    points apart (and keep their markers), while the plotted data stay the exact depths."""
    table = pd.DataFrame({"group": ["PCA"] * 3 + ["UMAP"] * 3, "relative_depth": [0.0, 0.5, 1.0] * 2,
                          "knn_acc_hd": [0.5, 0.7, 0.9] * 2, "knn_acc_hd_lo": [np.nan] * 6,
                          "knn_acc_hd_hi": [np.nan] * 6})
    figure = studies.depth_figure(table, "knn_acc_hd")
    figure.canvas.draw()
    lines = [line for line in figure.axes[0].get_lines() if line.get_label() in ("PCA", "UMAP")]
    assert len(lines) == 2 and lines[0].get_marker() != lines[1].get_marker()
    for line in lines:
        np.testing.assert_array_equal(line.get_xdata(), [0.0, 0.5, 1.0])
    on_screen = [line.get_transform().transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
                 for line in lines]
    gap = on_screen[1][:, 0] - on_screen[0][:, 0]
    assert np.all(gap > 2) and np.allclose(on_screen[0][:, 1], on_screen[1][:, 1])  # apart sideways only
    low, high = figure.axes[0].get_ylim()
    assert low < 0.5 and high > 0.9  # every point in view (shifted artists do not autoscale by themselves)


def test_the_study_report_in_a_real_browser(layer_sweep):
    """The parent's report.html in chromium: every summary figure drawn, every table cell the value
    MLflow holds for that run and metric, a map link per child, and not one request beyond the file."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    from test_look import _chromium

    client, parent, children = _parent_and_children(layer_sweep)
    root = Path(client.download_artifacts(parent.info.run_id, ""))
    figures = sorted(p.stem for p in (root / "plots").glob("*.png"))
    assert {"depth_knn_acc_hd", "depth_twonn_id"} <= set(figures) and any(f.startswith("panel_") for f in figures)
    requests = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("request", lambda request: requests.append(request.url))
        page.route("http*://**", lambda route: route.abort())
        page.goto((root / "report.html").as_uri())
        drawn = page.evaluate("""() => Array.from(document.querySelectorAll('figure img'),
                                   (img) => [img.alt, img.complete && img.naturalWidth > 100])""")
        cells = page.evaluate("""() => Array.from(document.querySelectorAll('#summary td[data-metric], #all-metrics td[data-metric]'),
                                   (td) => [td.dataset.run, td.dataset.metric, Number(td.dataset.value)])""")  # noqa: E501 - JavaScript source
        rows = page.evaluate("() => document.querySelectorAll('#summary tbody tr').length")
        links = page.evaluate("() => Array.from(document.querySelectorAll('a[href*=\"map.html\"]'), "
                              "(a) => a.getAttribute('href'))")
        text = page.evaluate("() => document.body.innerText")
        heads = page.evaluate("() => Array.from(document.querySelectorAll('#summary th'), (th) => th.textContent)")
        captions = page.evaluate("() => Array.from(document.querySelectorAll('figure'), "
                                 "(f) => [f.dataset.name, f.querySelector('figcaption').textContent])")
        page.set_viewport_size({"width": 1000, "height": 900})
        table_fits = page.evaluate("() => document.querySelector('#summary').scrollWidth <= 1000 - 32")
        # the similarity with the final block: five measures, each value over its p-values, in the window
        to_last = page.evaluate("""() => Array.from(document.querySelectorAll('table.to-last'),
                                   (t) => [t.scrollWidth, t.clientWidth, t.querySelectorAll('thead th').length,
                                           Array.from(t.querySelectorAll('td[data-measure]'),
                                                      (td) => td.querySelector('.p')?.textContent)])""")
        browser.close()
    assert to_last and all(width <= shown <= 1000 - 32 and heads == 1 + len(measures.PANEL) and p_lines
                           and all(re.fullmatch(r"p \S+ · BH \S+", line or "") for line in p_lines)
                           for width, shown, heads, p_lines in to_last), to_last
    assert sorted(alt for alt, ok in drawn if ok) == figures  # every figure, each drawn
    # each caption says what its figure shows and names its file (it was the file's name alone)
    assert all(text.endswith(f". plots/{name}.png") and len(text) > len(name) + 30 for name, text in captions)
    by_run = {c.info.run_id: c.data.metrics for c in children}
    assert rows == len(children) and len(cells) >= 4 * len(children)
    # What varied is said once, by the swept settings only; the table's columns are those settings.
    assert "What varied: layer (2: 0, 1) · model.name (2: tiny-vit" in text and "nan" not in text
    assert heads[:2] == ["layer", "model.name"] and table_fits
    for run, metric, value in cells:
        assert value == by_run[run][metric], (run, metric)
    assert sorted(links) == sorted(f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/"
                                   f"{c.info.run_id}/artifacts/map.html?workflowType=machine_learning"
                                   for c in children)
    assert all(url.startswith(("file:", "data:")) for url in requests), requests


def test_a_key_inside_a_varied_group_varies_where_it_differs_among_one_option_s_runs():
    """A report over an experiment: runs of model=pixels at model.size 8 and 16 beside runs of
    model=efficientnet_lite0 (which has no size). The size varies too (it was hidden behind the
    group's option, and rows that differed only in it read the same); a key only one option has,
    and that is the same in all its runs, still stands behind the option."""
    rows = [{"run_id": f"r{i}", "params.choice.model": model, "params.model.size": size,
             "params.model.name": name, "params.choice.reducer": "pca"}
            for i, (model, size, name) in enumerate([("pixels", "8", None), ("pixels", "16", None),
                                                     ("efficientnet_lite0", None, "tf_efficientnet_lite0"),
                                                     ("efficientnet_lite0", None, "tf_efficientnet_lite0")])]
    runs = pd.DataFrame(rows)
    assert studies.varied_keys(runs) == ["params.choice.model", "params.model.size"]
    # seed and the seeds that follow it vary together: one difference, named seed; plots.* change no
    # result (an experiment's report listed cv_seed, data_seed, reducer_seed, seed and plots.enabled)
    seeded = runs.assign(**{f"params.{key}": ["1", "1", "2", "2"] for key in ("seed", "data_seed", "cv_seed",
                                                                             "reducer_seed")},
                         **{"params.plots.enabled": ["true", "false", "true", "false"]})
    assert studies.varied_keys(seeded) == ["params.choice.model", "params.model.size", "params.seed"]
    assert studies.varied_keys(seeded.assign(**{"params.cv_seed": ["1", "3", "2", "2"]})) == [
        "params.choice.model", "params.cv_seed", "params.model.size", "params.seed"]  # it differs once: its own
    # two settings that happen to vary together are two differences (a pair differing in both is no contrast)
    both = seeded.assign(**{"params.metrics.k": ["10", "10", "30", "30"]})
    assert "params.metrics.k" in studies.varied_keys(both) and "params.seed" in studies.varied_keys(both)
    same_size = runs.assign(**{"params.model.size": ["16", "16", None, None]})
    assert studies.varied_keys(same_size) == ["params.choice.model"]


def test_similarity_s_errors_name_its_own_keys(tiny_vit, tiny_resnet, class_folder, tmp_path):
    """A model's errors say model.name= and pool= (run.py's keys); similarity.py's are model_b.name=
    and pool_b=: a missing folder before any run, a class token the model lacks once it is loaded."""
    from hydra import compose, initialize_config_dir

    from latentmap.errors import ConfigError

    import similarity

    def refused(*overrides: str) -> str:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("similarity", overrides=[f"output_dir={tmp_path}", "model@model_a=hf",
                                                   f"model_a.name={tiny_vit}", "model@model_b=hf",
                                                   "dataset=imagefolder", f"dataset.path={class_folder}",
                                                   "tracking=none", *overrides])
        with pytest.raises(ConfigError) as caught:
            similarity.similarity(cfg)
        return str(caught.value)

    missing = refused(f"model_b.name={tmp_path / 'nowhere'}")
    assert missing.startswith(f"model_b.name='{tmp_path / 'nowhere'}' is not a directory"), missing
    no_token = refused(f"model_b.name={tiny_resnet}", "pool_b=cls")
    assert no_token.startswith("pool_b=cls is not available for ") and "pool=" not in no_token, no_token
    assert no_token.endswith("(it has no class token): use pool_b=mean"), no_token  # not embed, which it refuses
    assert "model.name" not in missing + no_token
    few = refused(f"model_b.name={tiny_resnet}", "dataset.limit=3")  # a traceback from debiased CKA, after a run
    assert few == ("similarity.py compares two models on at least 10 images (debiased CKA needs 4, the permutation "
                   "nulls and the k-NN overlap more); the dataset has 3 (dataset.limit=3): use more images, e.g. "
                   "dataset.limit=200"), few


def test_similarity_of_a_model_without_blocks_is_one_line_before_any_run(class_folder, tmp_path):
    """similarity.py with model_a=pixels: one line naming the side and the fix, before a run exists
    (it said 'use pool=embed', a key similarity.py does not have, after a FAILED run)."""
    from hydra import compose, initialize_config_dir

    from latentmap.errors import ConfigError

    import similarity

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("similarity", overrides=[f"output_dir={tmp_path}", "model@model_a=pixels",
                                               "model@model_b=pixels", "dataset=imagefolder",
                                               f"dataset.path={class_folder}"])
    with pytest.raises(ConfigError, match=r"^model_a \(pixels\) has no blocks: similarity.py compares two models "
                                          r"block by block; choose a transformers or timm backbone for model@model_a$"):
        similarity.similarity(cfg)
    assert not (tmp_path / "mlflow.db").exists() or mlflow_runs(tmp_path)[1] == []
