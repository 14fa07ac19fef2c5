"""Any image of a finished run with its nearest neighbours in the embedding space (in the run's
geometry, metrics.distance: cosine by default).

    python scripts/neighbors.py <run id> --index 42 [--k 8] [--out outputs/neighbors/<run>_42.png]
        [--tracking-uri sqlite:///outputs/mlflow.db]

Reads the run's logged arrays (embeddings, labels, dataset indices) and its images from the
dataset its config names; no model is loaded. ``--index`` is the dataset index (as shown in
map.html and the plots), not the row. Wrong-class neighbours are framed red, as in
plots/neighbours.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")  # what --out may be (matplotlib writes each)


def main(argv: list[str] | None = None) -> tuple[Path, list[int]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_id")
    parser.add_argument("--index", type=int, required=True, help="dataset index of the query image")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--out", default=None, help="PNG to write (default outputs/neighbors/<run>_<index>.png)")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    args = parser.parse_args(argv)

    from latentmap import logged, neighbours, plots, targets
    from latentmap.errors import ConfigError

    try:
        run = logged.load(args.run_id, args.tracking_uri)
        if not 1 <= args.k < len(run.coords):
            raise ConfigError(f"--k {args.k} must be in 1..{len(run.coords) - 1}")
        query = run.row_of(args.index)
        out = targets.file_target(Path(args.out or f"outputs/neighbors/{run.run_id}_{args.index}.png"),
                                  IMAGE_SUFFIXES, "the figure")  # after the checks: it makes the folder
        distance = run.config.get("metrics", {}).get("distance", "cosine")  # logged before the key: cosine
        found, distances = neighbours.nearest(run.embeddings, args.k, [query], metric=distance)
        images = run.thumbnails([query, *found[0]])
    except ConfigError as error:
        sys.exit(f"error: {error}")
    wrong = [run.labelled and run.labels[n] != run.labels[query] for n in found[0]]
    figure = plots.neighbour_rows(
        [images[0]], [run.caption(query)], [images[1:]],
        [[f"{run.caption(n)}\nd={d:.3f}" for n, d in zip(found[0], distances[0])]], [wrong],
        f"run {run.run_id[:8]} · {args.k} nearest neighbours of #{args.index} ({distance}, embedding space)")
    figure.savefig(out, dpi=120)
    shown = [int(run.indices[n]) for n in found[0]]
    print(f"{out}: nearest to #{args.index}: {', '.join(f'#{i}' for i in shown)}")
    return out, shown


def cli() -> None:
    """The installed ``latentmap-neighbours`` command (and ``python scripts/neighbors.py``)."""
    from latentmap import stopping

    stopping.command(main, "neighbors.py")
    sys.exit(0)


if __name__ == "__main__":
    cli()
