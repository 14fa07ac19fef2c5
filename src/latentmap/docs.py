"""The documentation's generated pages: the configuration reference, read from the config files
that define every default (``conf/``), and the measured tables, read from the benchmark's JSON
(``docs/data/*.json``, each with its command, machine and date).

    python -m latentmap.docs            # rewrite docs/reference/*.md
    python -m latentmap.docs --check    # exit 1 when a generated page is out of date (the suite runs it)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF, DOCS = ROOT / "conf", ROOT / "docs"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w@]*):(?P<value>.*)$")


def yaml_keys(text: str) -> list[tuple[str, str, str]]:
    """``(dotted key, default as written, the comment lines above it)`` of a config file, in order.
    ``defaults:`` and Hydra's own nodes are skipped; a nested mapping's keys are dotted; a key whose
    items follow one a line (``- item``) has the list as its value."""
    found, comment, path = [], [], []
    skipping = None  # indentation of a node whose children are not settings
    lines = text.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("# @package") or not stripped:
            comment = [] if not stripped else comment
            continue
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if match is None:  # a list item or a continued value
            continue
        indent, key = len(match["indent"]) // 2, match["key"]
        if skipping is not None and indent > skipping:
            continue
        skipping = None
        path = path[:indent] + [key]
        value = match["value"].split(" #", 1)[0].strip()
        if key in ("defaults", "hydra") and indent == 0:
            skipping, comment = 0, []
            continue
        if not value:  # a mapping, or a list written one item a line: then the list is the value
            items = []
            for following in lines[number + 1:]:
                item = following.strip()
                if item.startswith("- "):
                    items.append(item[2:].strip())
                elif item and not item.startswith("#"):
                    break
            value = f"[{', '.join(items)}]" if items else ""
        if value:  # a leaf; a mapping's own comment carries on to its first leaf
            found.append((".".join(path), value, " ".join(comment)))
            comment = []
    return found


def _preset_choices(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A preset's ``(group, option)`` overrides from its defaults list and ``(key, values)`` of the
    sweep it sets (``hydra.sweeper.params``), read by OmegaConf."""
    from omegaconf import OmegaConf

    loaded = OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}
    groups = [(key.removeprefix("override /"), str(option)) for entry in loaded.get("defaults") or []
              if isinstance(entry, dict) for key, option in entry.items() if key.startswith("override /")]
    params = ((loaded.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return groups, [(key, str(values)) for key, values in params.items()]


def _intro(text: str, own: bool = True) -> list[str]:
    """A config file's opening comment. With ``own``, only where it is the file's own: followed by
    a blank line, by ``defaults:`` (or ``_target_:``) or by nothing; one that runs straight into a
    key is that key's comment (the key's row shows it)."""
    lines = [line for line in text.splitlines() if not line.startswith("# @package")]
    block = []
    for line in lines:
        if not line.startswith("#"):
            if own and line.strip() and not line.startswith(("defaults:", "hydra:", "_target_:")):
                return []
            break
        block.append(line.lstrip("#").strip())
    return block


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """A config comment as Markdown text: outside code spans ``<`` written ``&lt;``, so that a
    placeholder such as ``<path>/<class>/<image>`` shows as written instead of as an HTML tag the
    browser drops (``<image>`` even became an empty picture), and ``_`` escaped, so that
    ``{_target_: ...}`` is not set in italics."""
    parts = re.split(r"(`+)(.*?)\1", text)  # text, then (fence, code) pairs, then text, ...
    out = []
    for i in range(0, len(parts), 3):
        out.append(parts[i].replace("<", "&lt;").replace("_", "\\_"))
        if i + 2 < len(parts):
            out.append(parts[i + 1] + parts[i + 2] + parts[i + 1])
    return "".join(out)


_HEADER = ["| key | default | rule | what it does |", "|---|---|---|---|"]


def _rows(text: str, prefix: str = "", target: str = "") -> list[str]:
    """One table row per key of a config file: its default (from the file), its rule (from
    :data:`latentmap.settings.SETTINGS`), and the file's comment followed by an example override where
    it sets something other than the default. A key without a rule is an argument of the group's
    ``_target_``, which checks it. (Four columns: with the example in a column of its own, a browser
    at 1,000 px squeezed the keys until they broke at every underscore.)"""
    from latentmap.settings import SETTINGS

    rows = []
    for key, value, comment in yaml_keys(text):
        full = prefix + key
        setting = SETTINGS.get(full)
        if key.rsplit(".", 1)[-1].startswith("_"):
            rule, example = "the class Hydra builds", ""
        elif setting is not None:
            rule = setting.rule()
            example = f"`{full}={setting.example}`" if setting.example.strip("'\"") != value.strip("'\"") else ""
        else:
            rule, example = (f"an argument of `{target.rsplit('.', 1)[-1]}`" if target else "passed on"), ""
        does = " ".join(part for part in (_prose(comment), f"Example: {example}." if example else "") if part)
        rows.append(f"| `{full}` | `{_cell(value)}` | {_prose(rule)} | {_cell(does)} |")
    return rows


def _target(text: str, common: Path) -> str:
    """The ``_target_`` of a group option (written in it or in the shared file it includes)."""
    for source in (text, common.read_text() if common.is_file() else ""):
        for key, value, _ in yaml_keys(source):
            if key == "_target_":
                return value
    return ""


def _included(text: str) -> str | None:
    """The conf/common file a group option includes (``- /common/<name>@_here_``), if any."""
    match = re.search(r"^\s*- /common/(\w+)@_here_", text, re.M)
    return match[1] if match else None


def configuration_reference(conf: Path = CONF) -> str:
    """Every key of every config file: its default (the one place it is written), its rule and an
    example (:mod:`latentmap.settings`), and what the config file says about it."""
    common = conf / "common"
    lines = ["# Reference: every setting", "",
             "Generated by `python -m latentmap.docs` from the config files in `conf/`, where every default is "
             "written once, and from `latentmap.settings`, where every rule is; do not edit by hand. Override any "
             "key on the command line (`key=value`); pick a group's option with `group=option`. A key the config "
             "does not define is refused in one line, and a value against its rule is refused in one line before "
             "any run exists.", "",
             "## Every command (`conf/common/run.yaml`)", "", *_HEADER, *_rows((common / "run.yaml").read_text()),
             "", "## Commands that extract embeddings: `run.py`, `scripts/similarity.py` (`conf/common/extract.yaml`)",
             "", *_HEADER, *_rows((common / "extract.yaml").read_text()),
             "", "## `run.py` (`conf/config.yaml`, and `conf/common/panel.yaml` as `study.*`)", "", *_HEADER,
             *_rows((conf / "config.yaml").read_text()),
             *_rows((common / "panel.yaml").read_text(), "study.")]
    for name, script in (("finetune", "scripts/finetune.py"), ("similarity", "scripts/similarity.py")):
        lines += ["", f"## `{script}` (`conf/{name}.yaml`)", "", *_HEADER, *_rows((conf / f"{name}.yaml").read_text())]
        if name == "similarity":
            lines += _rows((common / "panel.yaml").read_text())
    for group in sorted(d for d in conf.iterdir() if d.is_dir() and d.name not in ("hydra", "experiment", "common")):
        lines += ["", f"## `{group.name}`", ""]
        shared = sorted({_included(option.read_text()) for option in group.glob("*.yaml")} - {None})
        for name in shared:
            text = (common / f"{name}.yaml").read_text()
            users = sorted(o.stem for o in group.glob("*.yaml") if _included(o.read_text()) == name)
            lines += [f"### Keys of {', '.join(f'`{group.name}={u}`' for u in users)} (`conf/common/{name}.yaml`)",
                      "", *_HEADER, *_rows(text, f"{group.name}.", _target(text, common / "none")), ""]
            nested = _included(text)
            if nested:
                lines += [f"and the keys of `conf/common/{nested}.yaml`:", "", *_HEADER,
                          *_rows((common / f"{nested}.yaml").read_text(), f"{group.name}."), ""]
        for option in sorted(group.glob("*.yaml")):
            text = option.read_text()
            intro = _intro(text)
            lines += [f"### `{group.name}={option.stem}`", ""]
            if intro:
                lines += [_prose(" ".join(intro)), ""]
            included = _included(text)
            target = _target(text, common / f"{included}.yaml" if included else common / "none")
            rows = _rows(text, f"{group.name}.", target)
            if rows:
                lines += [*_HEADER, *rows, ""]
    lines += ["", "## Presets (`experiment=`)", "",
              "A preset sets keys anywhere in the config (the rows below: the value it sets); the command "
              "line can still override each."]
    for preset in sorted((conf / "experiment").glob("*.yaml")):
        text = preset.read_text()
        about, commands = [], []
        for line in _intro(text, own=False):  # a preset's opening comment is its description
            before, python, command = line.partition("python ")
            if python and not before.strip() and about and about[-1].endswith(":"):
                about[-1] = about[-1][:-1] + "."  # "...: <command>" with the command moved below
            if python:  # a command, on its own line or at the end of a sentence
                commands.append(python + command)
                line = before.rstrip().removesuffix(":").rstrip()
                line = line + ":" if line and not commands[1:] else line
            if line:
                about.append(line)
        lines += ["", f"### `experiment={preset.stem}`", "", _prose(" ".join(about))]
        if commands:
            lines += ["", "```bash", *commands, "```"]
        chosen, sweep = _preset_choices(text)
        groups = [f"| `{group}={option}` | the `{group}` group's option |" for group, option in chosen]
        swept = [f"| `{key}={values}` | swept: one job a value (`-m`) |" for key, values in sweep]
        rows = [row for row in _rows(text) if not row.startswith("| `task` |")]
        if groups or swept:
            lines += ["", "| it chooses | |", "|---|---|", *groups, *swept]
        if rows:
            lines += ["", "| key | set to | rule | what it does |", "|---|---|---|---|", *rows]
    return "\n".join(lines).rstrip() + "\n"


def _measured(payload: dict) -> str:
    return f"`{payload['command']}` on {payload['machine']}, {payload['date']}."


def calibration_table(payload: dict) -> str:
    """The calibration benchmark's table (coverage, width, rejection rates, after and before)."""
    def cell(row: dict, key: str) -> str:
        value, error = row.get(key), row.get(f"{key}_mc")
        if value is None or value != value:
            return ""
        return f"{value:.3f}" + (f" ± {error:.3f}" if error is not None and error == error else "")

    def ratio(row: dict, key: str) -> str:
        value = row.get(key)
        return "" if value is None or value != value else f"{value:.2f}"

    lines = [_measured(payload) + " Coverage of the 95% intervals (± its Monte Carlo standard error), the mean "
             "width over 3.92 x the estimates' standard deviation (1 is exact), and the paired test's rejection rate "
             "at p < 0.05 (null: two exchangeable runs; power: a less noisy view), each after (half-samples) and "
             "before (the per-image bootstrap)" + ("; for the map's metrics, also with each half's map refitted "
                                                   "against held fixed" if any("coverage_fixed" in row for row in
                                                                              payload["rows"]) else "") + ".", "",
             "Per mixture, map and size: the intervals (coverage, width), then the paired test where it was run; "
             "each measure after | before."]
    groups: dict[tuple, list[dict]] = {}
    for row in payload["rows"]:
        groups.setdefault((row["mixture"], row["map"], row["n"], row["R"]), []).append(row)
    for (mixture, map_, n, replications), rows in groups.items():
        # Two tables of five columns, not one of nine: the nine ran past the page at 1,400 px.
        lines += ["", f"**{mixture}, map {map_}, N = {n:,}, R = {replications} draws**", "",
                  "| metric | coverage | before | width ratio | before |", "|---|---|---|---|---|"]
        lines += [f"| {row['metric']} | {cell(row, 'coverage_after')} | {cell(row, 'coverage_before')} | "
                  f"{ratio(row, 'width_ratio_after')} | {ratio(row, 'width_ratio_before')} |" for row in rows]
        if any(cell(row, "coverage_fixed") for row in rows):  # the map's metrics, refitted against held fixed
            lines += ["", "| map metric | coverage, map refitted | map held fixed | null rejection, refitted | "
                      "held fixed |", "|---|---|---|---|---|"]
            lines += [f"| {row['metric']} | {cell(row, 'coverage_after')} | {cell(row, 'coverage_fixed')} | "
                      f"{cell(row, 'null_reject_after')} | {cell(row, 'null_reject_fixed')} |"
                      for row in rows if cell(row, "coverage_fixed")]
        if any(cell(row, key) for row in rows for key in ("null_reject_after", "real_reject_after")):
            lines += ["", "| metric | null rejection | before | power | before |", "|---|---|---|---|---|"]
            lines += [f"| {row['metric']} | {cell(row, 'null_reject_after')} | {cell(row, 'null_reject_before')} | "
                      f"{cell(row, 'real_reject_after')} | {cell(row, 'real_reject_before')} |" for row in rows]
    return "\n".join(lines)


def protocols_tables(payload: dict) -> str:
    """The similarity measures and TwoNN against external protocols."""
    lines = [_measured(payload)]
    if payload.get("monotonicity"):
        lines += ["", "Layer monotonicity, MobileNetV2 (16 blocks, mean-pooled, 500 CIFAR-10 test images):", "",
                  "| measure | Spearman with -abs(i - j) | violation rate |", "|---|---|---|"]
        lines += [f"| {r['measure']} | {r['spearman']:.3f} | {r['violation_rate']:.3f} |"
                  for r in payload["monotonicity"]]
    seeds = payload["seeds"]
    accuracies = ", ".join(f"{a:.3f}" for a in seeds["accuracies"])
    lines += ["", f"Corresponding blocks across 5 seeds of a 5-block digits CNN (held-out accuracies {accuracies}; "
              "20 ordered pairs x 5 blocks):", "", "| measure | block matched to its counterpart |", "|---|---|"]
    lines += [f"| {r['measure']} | {r['accuracy']:.2f} |" for r in seeds["rows"]]
    lines += ["", "TwoNN on d-spheres (2,000 points in 64 dimensions), half-sample 95% intervals:", "",
              "| d | estimate | interval | covers d |", "|---|---|---|---|"]
    lines += [f"| {r['dimension']} | {r['estimate']:.2f} | [{r['lo']:.2f}, {r['hi']:.2f}] | "
              f"{'yes' if r['covers'] else 'no'} |" for r in payload["twonn"]]
    return "\n".join(lines)


def measured_page(data: Path = DOCS / "data") -> str:
    """The measured tables, each from its benchmark JSON."""
    parts = ["---", "hide:", "  - toc", "---", "",  # the wide tables get the table of contents' width
             "# Reference: measured tables", "",
             "Generated by `python -m latentmap.docs` from the benchmark's JSON in `docs/data/` (copied from "
             "`outputs/bench/` after a run of `scripts/bench.py`); each table names its command, machine and date.",
             "What the tables mean, and what they do not show, is on the [Calibration](../calibration.md) page."]
    titles = {"calibration-pca": "Calibration: the 2-D map fitted on every draw and on every half-sample (PCA)",
              "calibration-fixed-coverage": "Calibration: the 2-D map held fixed, coverage at N = 300, 1,000, 5,000",
              "calibration-umap": "Calibration: UMAP maps, fitted on every draw and on every half-sample",
              "calibration-tsne": "Calibration: t-SNE maps, fitted on every draw and on every half-sample",
              "calibration-tsne-held": "Calibration: t-SNE maps, fitted on every draw and held fixed on its "
                                       "half-samples",
              "calibration-pca-run": "Calibration: a long tail of classes, many small classes, and real features "
                                     "(CIFAR-10 through MobileNetV2)"}
    for name, title in titles.items():
        path = data / f"{name}.json"
        if path.is_file():
            parts += ["", f"## {title}", "", calibration_table(json.loads(path.read_text()))]
    path = data / "protocols.json"
    if path.is_file():
        parts += ["", "## The similarity measures against external protocols", "",
                  protocols_tables(json.loads(path.read_text()))]
    return "\n".join(parts).rstrip() + "\n"


def pages() -> dict[Path, str]:
    return {DOCS / "reference" / "configuration.md": configuration_reference(),
            DOCS / "reference" / "measured.md": measured_page()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated page is out of date")
    args = parser.parse_args(argv)
    stale = [path for path, text in pages().items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python -m latentmap.docs", file=sys.stderr)
        return 1 if stale else 0
    for path, text in pages().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
