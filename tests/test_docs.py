"""The documentation site: it builds with ``mkdocs build --strict``, its generated pages are what
the generator writes today (from ``conf/`` and the benchmark's JSON), and the configuration
reference names every key every config file defines, with the default the file writes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from latentmap import docs

from helpers import CONF, ROOT


def test_the_generated_pages_are_up_to_date():
    assert docs.main(["--check"]) == 0, "run: python -m latentmap.docs"


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The site as ``mkdocs build --strict`` writes it (once for the module's tests)."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[dev]' installs mkdocs-material")
    site = tmp_path_factory.mktemp("docs") / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return site


def test_the_site_builds_strictly(built_site):
    built = {p.relative_to(built_site).as_posix() for p in built_site.rglob("index.html")}
    for page in ("getting-started/index.html", "reference/configuration/index.html", "calibration/index.html",
                 "reference/measured/index.html", "studies/index.html", "development/index.html"):
        assert page in built


# What a reader at 1,000 or 1,400 px cannot see whole: a table wider than the text column (Material
# lets it scroll sideways, so its right-hand columns are off screen), a picture that did not load, and
# code in a table broken between two letters or digits (num_worker|s; src/latentmap/site_hooks.py).
_UNSEEN = """() => [
    ...[...document.querySelectorAll('article .md-typeset__scrollwrap')]
        .filter(box => box.scrollWidth > box.clientWidth + 1)
        .map(box => `table ${box.scrollWidth} px wide in ${box.clientWidth} px: ${box.innerText.slice(0, 60)}`),
    ...[...document.querySelectorAll('article img')]
        .filter(img => !img.complete || img.naturalWidth === 0)
        .map(img => `picture not shown: ${img.outerHTML.slice(0, 80)}`),
    ...[...document.querySelectorAll('article td code, article th code')]
        .filter(code => code.getClientRects().length > 1)
        .flatMap(code => {
            const broken = [];
            const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
            let previous = null, node;
            while ((node = walker.nextNode())) {
                for (let i = 0; i < node.length; i++) {
                    const range = document.createRange();
                    range.setStart(node, i);
                    range.setEnd(node, i + 1);
                    const box = range.getClientRects()[0];
                    if (!box) continue;
                    const here = {top: box.top, char: node.data[i]};
                    const marked = i === 0 && node.previousSibling?.nodeName === 'WBR';  // CamelCase|Words
                    if (previous && here.top > previous.top + 2 && !marked && /[A-Za-z0-9]/.test(previous.char)
                        && /[A-Za-z0-9]/.test(here.char))
                        broken.push(`${code.innerText.slice(0, 60)} broken mid-word before ${here.char}`);
                    previous = here;
                }
            }
            return broken;
        }),
]"""


def test_every_page_reads_whole_at_1000_and_1400_px(built_site):
    """Every page of the site in Chromium at 1,000 and 1,400 px: no table runs past the text column,
    every picture loads, and no code in a table breaks mid-word. (It caught the calibration table at
    1,134 px, a config comment's ``<image>`` placeholder that the browser drew as an empty picture,
    and 421 identifiers broken mid-word, 357 of them the settings reference's keys.)"""
    from test_look import _pages

    pages = sorted(path for path in built_site.rglob("index.html")
                   if path.relative_to(built_site).parts[0] not in ("assets", "search"))
    assert len(pages) == len(list((ROOT / "docs").rglob("*.md")))  # one a page of docs/
    unseen = []
    with _pages() as open_page:
        for width in (1000, 1400):
            for path in pages:
                with open_page(path, width, 900) as page:
                    unseen += [f"{path.parent.relative_to(built_site)} at {width} px: {problem}"
                               for problem in page.evaluate(_UNSEEN)]
    assert not unseen, "\n".join(unseen)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if key in ("defaults", "hydra") and not prefix:
            continue
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")
                                        if p.parts[-2] not in ("hydra", "experiment", "launcher")))
def test_the_reference_names_every_key_with_its_default(path):
    """Each leaf of each config file (read by OmegaConf, independently of the generator's reader)
    is a row of the reference, with the value the file writes."""
    page = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    if path.startswith("common/") or "/" not in path:  # a section that names the file
        heading = next(line for line in page.splitlines()
                       if line.startswith(("#", "and the keys of")) and f"`conf/{path}`" in line)
    else:  # a group's option: its own section
        heading = f"### `{path.split('/')[0]}={path.split('/')[1].removesuffix('.yaml')}`"
    page = page.split(heading, 1)[1].split("\n#", 1)[0]  # that section only
    loaded = OmegaConf.to_container(OmegaConf.load(CONF / path), resolve=False)
    loaded.pop("defaults", None)
    group = {"common/dataset.yaml": "dataset.", "common/reducer.yaml": "reducer.", "common/model.yaml": "model.",
             "common/timm.yaml": "model.", "common/transformers.yaml": "model.", "common/panel.yaml": "study."}.get(
        path, "" if "/" not in path or path.startswith("common/") else path.split("/")[0] + ".")
    for key, value in _leaves(loaded):
        written = "null" if value is None else ("true" if value is True else "false" if value is False else None)
        row = f"| `{group}{key}` | `"
        assert row in page, (path, key)
        line = next(line for line in page.splitlines() if line.startswith(row))
        shown = line.split("` | `", 1)[1].split("` |", 1)[0]
        if written is not None:
            assert shown == written, (path, key, shown)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(shown) == float(value), (path, key, shown)
        else:
            assert shown.strip("'\"") == str(value).replace("|", "\\|"), (path, key, shown)


def test_the_measured_tables_come_from_the_benchmark_json():
    payload = json.loads((ROOT / "docs" / "data" / "calibration-pca.json").read_text())
    page = (ROOT / "docs" / "reference" / "measured.md").read_text()
    assert f"`{payload['command']}` on {payload['machine']}, {payload['date']}." in page
    first = payload["rows"][0]
    section = page.split(f"**{first['mixture']}, map {first['map']}, N = {first['n']:,}, R = {first['R']} draws**")[1]
    assert f"| {first['metric']} | {first['coverage_after']:.3f} ± {first['coverage_after_mc']:.3f} |" in section


def test_the_held_fixed_note_quotes_the_calibration_s_json():
    """The rates compare.py and the study pages quote for two maps held fixed (linked.HELD_FIXED_RATE)
    are the calibration's measured ones: silhouette_2d's false rejections with the maps held fixed
    (UMAP, scikit-learn's t-SNE, PCA), and the largest over every map metric refitted."""
    from latentmap import linked
    from latentmap.resampling import MAP_METRICS

    def rows(name: str) -> list[dict]:
        return json.loads((ROOT / "docs" / "data" / f"calibration-{name}.json").read_text())["rows"]

    def held(name: str, key: str) -> set[str]:
        return {f"{round(100 * r[key])}%" for r in rows(name) if r["metric"] == "silhouette_2d"}

    assert held("umap", "null_reject_fixed") == {"15%"} and held("tsne-held", "null_reject_after") == {"20%"}
    assert held("pca", "null_reject_fixed") == {"11%"}
    for quoted in ("15% of draws with UMAP maps", "20% with scikit-learn's t-SNE", "11% with PCA", "at most 4%"):
        assert quoted in linked.HELD_FIXED_RATE, quoted
    refitted = [r["null_reject_after"] for name in ("umap", "tsne", "pca") for r in rows(name)
                if r["metric"] in MAP_METRICS]
    assert len(refitted) == 16 and max(refitted) <= 0.04


def test_placeholders_in_config_comments_show_as_written():
    """A comment's ``<path>/<class>/<image>`` reaches the reader as written: raw in the page, the
    browser took each placeholder for an HTML tag and dropped it (``<image>`` drew an empty picture).
    Rendered by Python-Markdown, the library mkdocs renders the site with."""
    import html
    import re

    import markdown

    rendered = markdown.markdown(docs.configuration_reference(), extensions=["tables"])
    assert not re.search(r"<(path|class|image|timm name|hub id|metric|name|index)\b", rendered)
    text = html.unescape(re.sub(r"<[^>]+>", "", rendered))  # what the browser shows
    for written in ("A local folder: <path>/<class>/<image> gives labels", "model.name=<timm name>.",
                    "openTSNE needs perplexity < (N - 1) / 3", "cuda:<index>"):
        assert written in text, written
    assert docs._prose("a <b> `c <d>`") == "a &lt;b> `c <d>`"  # code spans keep their text


def test_the_reference_shows_lists_presets_and_names_as_written():
    """A list-valued key (``zeroshot.templates``) has its row with the list; each preset its
    description, its commands in a code block and the keys it sets; ``{_target_: ...}`` in a comment
    keeps its underscores (unescaped, Markdown set "target" in italics)."""
    import html
    import re

    import markdown

    page = docs.configuration_reference()
    templates = OmegaConf.load(CONF / "zeroshot" / "default.yaml").templates
    row = next(line for line in page.splitlines() if line.startswith("| `zeroshot.templates` |"))
    assert all(template in row for template in templates)
    presets = page.split("## Presets (`experiment=`)")[1]
    for preset in sorted((CONF / "experiment").glob("*.yaml")):
        section = presets.split(f"### `experiment={preset.stem}`")[1].split("\n### ")[0]
        for key, _ in _leaves({k: v for k, v in OmegaConf.to_container(OmegaConf.load(preset)).items()
                               if k not in ("task",)}):
            assert f"| `{key}` |" in section, (preset.stem, key)
    layers = presets.split("### `experiment=layers`")[1].split("\n### ")[0]
    for chosen in ("| `model=vit` |", "| `layer=range(0,12)` | swept", "| `reducer=pca,umap` | swept"):
        assert chosen in layers, chosen  # what conf/experiment/layers.yaml overrides and sweeps
    finetune_study = presets.split("### `experiment=finetune_study`")[1].split("\n### ")[0]
    assert "```bash\npython run.py experiment=finetune_study finetuned=" in finetune_study
    rendered = markdown.markdown(page, extensions=["tables", "fenced_code"])
    assert "<em>target</em>" not in rendered
    assert "{_target_: ...," in html.unescape(re.sub(r"<[^>]+>", "", rendered))


def test_a_files_intro_is_its_own_comment_not_its_first_keys():
    """An option's intro is the file's opening comment only where a blank line or ``defaults:``
    ends it; the comments of the keys that follow stay in their rows (they were glued onto the
    intro: the audit's "Turn the whole audit off" and the plots' key comments)."""
    page = docs.configuration_reference()

    def intro(heading: str) -> str:
        return page.split(heading, 1)[1].split("| key |", 1)[0]

    audit = intro("### `audit=default`")
    assert "The data audit of every run" in audit and "Turn the whole audit off" not in audit
    assert "Thumbnails drawn" not in intro("### `plots=default`")
    assert "Raw pixels" in intro("### `model=pixels`")


def test_code_in_tables_breaks_only_between_parts():
    """The site hook's break points: after a name's dot, a slash, an underscore, an equals sign or a
    comma, and between CamelCase words; a number, an HTML entity and a tag stay whole; a first
    cell that is only code (a setting's key) breaks only after dots, slashes and equals signs,
    while prose in a first cell and code outside tables are left alone. A value and its error stay
    together in a table."""
    from latentmap.site_hooks import breakable, tables_with_breaks

    assert breakable("reuse_freed_memory=false") == "reuse_<wbr>freed_<wbr>memory=<wbr>false"
    assert breakable("Dinov2ForImageClassification") == "Dinov2<wbr>For<wbr>Image<wbr>Classification"
    assert breakable("0.5,1.0") == "0.5,<wbr>1.0"  # numbers whole
    assert breakable("cuda:&lt;index&gt;") == "cuda:&lt;index&gt;"
    assert breakable("a_b&DoubleRightArrow;c&#x1Fa;") == "a_<wbr>b&DoubleRightArrow;c&#x1Fa;"
    assert breakable('<span class="a_b">x.y</span>') == '<span class="a_b">x.<wbr>y</span>'
    page = ("<p><code>a_b</code></p><table><tr><th>key</th></tr>"
            "<tr>\n<td><code>model.preprocess_on_device</code></td><td><code>num_workers=4</code></td></tr>"
            "<tr><td>the <code>knn_acc</code> row</td><td></td></tr>"
            '<tr><td><a href="#k"><code>knn_acc</code></a></td><td></td></tr></table>')
    assert tables_with_breaks(page) == (
        "<p><code>a_b</code></p><table><tr><th>key</th></tr>"
        "<tr>\n<td><code>model.<wbr>preprocess_on_device</code></td><td><code>num_<wbr>workers=<wbr>4</code></td></tr>"
        "<tr><td>the <code>knn_<wbr>acc</code> row</td><td></td></tr>"
        '<tr><td><a href="#k"><code>knn_acc</code></a></td><td></td></tr></table>')  # a linked key: a name
    assert tables_with_breaks("<p>0.973 ± 0.009</p><table><tr><td>0.973 ± 0.009</td></tr></table>") == (
        "<p>0.973 ± 0.009</p><table><tr><td>0.973&nbsp;±&nbsp;0.009</td></tr></table>")
