"""Export a finished run's embeddings to the tools people already use.

    python scripts/export.py projector <run id> <dir>    # TensorBoard Embedding Projector files
    python scripts/export.py parquet <run id> <file>     # one row per image, for pandas/DuckDB
    python scripts/export.py atlas <run id> <file>       # for Apple's Embedding Atlas viewer
        [--tracking-uri sqlite:///outputs/mlflow.db]

projector writes tensors.tsv (one embedding per line), metadata.tsv (index and label, with a
header), sprite.png (one thumbnail per point, row-major, in the same order) and
projector_config.pbtxt; point TensorBoard at <dir> (``tensorboard --logdir <dir>``, or load the
two TSV files at projector.tensorflow.org). The sprite stays within the Projector's 8192 x 8192
pixels: with more points than fit at ``--thumb`` pixels, a seeded, class-stratified subsample is
exported (all three files alike) and the script says so.

parquet writes columns index, label, label_name, x, y (the run's 2-D map) and embedding (a list
of float32), in row order.

atlas writes what Embedding Atlas reads: x, y, each image's nearest neighbours in the run's geometry
(``neighbors``: ``{"ids": [...], "distances": [...]}``, zero-based rows, as its ``--neighbors``
option documents), the label, and the run's per-image audit columns (k-means and HDBSCAN cluster,
suspected label error and the suggested label, duplicate, whether the probe was right, outlier score). Open it
with ``embedding-atlas <file> --x x --y y --neighbors neighbors``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

SPRITE_MAX = 8192  # the Projector's limit on each side of the sprite image


FEWEST = 1000  # the fewest points a subsampled sprite keeps (below, --thumb is refused): fewer map too little


def projector(run, out: Path, thumb: int, seed: int) -> dict:
    from PIL import Image

    from latentmap import data
    from latentmap.errors import ConfigError

    per_side = SPRITE_MAX // thumb
    n = len(run.coords)
    rows = np.arange(n)
    wanted = min(n, FEWEST)
    if per_side * per_side < wanted:
        largest = SPRITE_MAX // math.ceil(math.sqrt(wanted))
        raise ConfigError(f"--thumb {thumb}: a {SPRITE_MAX} x {SPRITE_MAX} sprite holds {per_side * per_side} "
                          f"thumbnails of {thumb} px, of the run's {n} points: use --thumb {largest} or less "
                          f"(room for {'all ' + str(n) if wanted == n else str(wanted)} points)")
    if n > per_side * per_side:
        rows = np.sort(data.balanced_order(run.labels if run.labelled else None, n, seed)[: per_side * per_side])
        print(f"{n} points do not fit a {SPRITE_MAX} x {SPRITE_MAX} sprite at {thumb} px: exporting a seeded, "
              f"class-stratified subsample of {len(rows)}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "tensors.tsv").open("w") as handle:
        for start in range(0, len(rows), 4096):
            block = np.asarray(run.embeddings[rows[start : start + 4096]], dtype=np.float32)
            np.savetxt(handle, block, delimiter="\t", fmt="%.7g")
    with (out / "metadata.tsv").open("w") as handle:
        handle.write("index\tlabel\n")
        for row in rows:
            label = run.class_names[run.labels[row]] if run.labelled else ""
            handle.write(f"{run.indices[row]}\t{label.replace(chr(9), ' ').replace(chr(10), ' ')}\n")
    columns = math.ceil(math.sqrt(len(rows)))
    sprite = Image.new("RGB", (columns * thumb, columns * thumb), (255, 255, 255))
    for start in range(0, len(rows), 1024):
        for offset, image in enumerate(run.thumbnails(rows[start : start + 1024], size=thumb)):
            position = start + offset
            tile = Image.fromarray(image).resize((thumb, thumb), Image.Resampling.NEAREST)
            sprite.paste(tile, ((position % columns) * thumb, (position // columns) * thumb))
    sprite.save(out / "sprite.png")
    (out / "projector_config.pbtxt").write_text(
        "embeddings {\n"
        f'  tensor_name: "latentmap {run.run_id}"\n'
        f'  tensor_path: "tensors.tsv"\n'
        f'  metadata_path: "metadata.tsv"\n'
        "  sprite {\n"
        f'    image_path: "sprite.png"\n'
        f"    single_image_dim: {thumb}\n"
        f"    single_image_dim: {thumb}\n"
        "  }\n"
        "}\n")
    return {"points": len(rows), "of": n, "sprite_px": columns * thumb}


def parquet(run, path: Path) -> dict:
    import pyarrow as pa

    names = [run.class_names[c] if run.labelled else None for c in run.labels]
    embeddings = np.asarray(run.embeddings, dtype=np.float32)
    table = pa.table({
        "index": pa.array(run.indices, pa.int64()),
        "label": pa.array(run.labels, pa.int64()),
        "label_name": pa.array(names, pa.string()),
        "x": pa.array(run.coords[:, 0], pa.float32()),
        "y": pa.array(run.coords[:, 1], pa.float32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel(), pa.float32()), embeddings.shape[1]),
    })
    _write_parquet(table, path)
    return {"rows": table.num_rows}


ATLAS_COLUMNS = {"audit_cluster_kmeans": "cluster_kmeans", "audit_cluster_hdbscan": "cluster_hdbscan",
                 "audit_duplicate": "duplicate", "audit_probe_correct": "probe_correct",
                 "audit_label_issue": "label_issue", "outlier_score": "outlier_score",
                 "neighbour_disagreement": "neighbour_disagreement"}


def atlas(run, path: Path, k: int) -> dict:
    """The parquet Embedding Atlas opens: x, y, neighbours, label and the audit's columns."""
    import pyarrow as pa

    from latentmap import metrics, neighbours

    distance = str(run.config.get("metrics", {}).get("distance", "cosine"))  # logged before the key: cosine
    space = metrics.embedding_space(np.asarray(run.embeddings, dtype=np.float32), distance)
    exact_up_to = run.config.get("metrics", {}).get("exact_neighbours", 20000)  # logged before the key: 20000
    found = neighbours.every_nearest(space, k, distance, exact_up_to)
    names = [run.class_names[c] if run.labelled else "" for c in run.labels]
    columns = {
        "index": pa.array(run.indices, pa.int64()),
        "label": pa.array(names, pa.string()),
        "x": pa.array(run.coords[:, 0], pa.float32()),
        "y": pa.array(run.coords[:, 1], pa.float32()),
        "neighbors": pa.array([{"ids": ids.tolist(), "distances": d.tolist()}
                               for ids, d in zip(found.indices.astype(np.int64), found.distances.astype(float))]),
    }
    for array, column in ATLAS_COLUMNS.items():
        if array not in run.extra:
            continue
        values = np.asarray(run.extra[array])
        if column in ("duplicate", "probe_correct", "label_issue"):  # -2: not scored by the audit
            columns[column] = pa.array([None if v == -2 else bool(v) for v in values], pa.bool_())
        elif column.startswith("cluster"):
            columns[column] = pa.array([None if v == -2 else int(v) for v in values], pa.int32())
        else:
            columns[column] = pa.array(values.astype(np.float32), pa.float32())
    if "audit_suggested" in run.extra and run.labelled:
        columns["suggested_label"] = pa.array([run.class_names[int(v)] if v >= 0 else None
                                               for v in run.extra["audit_suggested"]], pa.string())
    table = pa.table(columns)
    _write_parquet(table, path)
    return {"rows": table.num_rows, "columns": table.column_names}


def _write_parquet(table, path: Path) -> None:
    """``table`` to ``path`` through a temporary sibling renamed into place: a failed write leaves
    no half-written file, and an earlier file stays whole until the new one is complete."""
    import pyarrow.parquet as pq

    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["projector", "parquet", "atlas"])
    parser.add_argument("run_id")
    parser.add_argument("target", help="a folder (projector) or a .parquet file (parquet, atlas)")
    parser.add_argument("--k", type=int, default=None,
                        help="nearest neighbours per image (atlas; default 10, or all the others in a smaller run)")
    parser.add_argument("--thumb", type=int, default=32, help="sprite thumbnail size in pixels (projector)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsample when the sprite cannot hold all")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    args = parser.parse_args(argv)

    from latentmap import logged, targets
    from latentmap.errors import ConfigError

    try:
        if not 1 <= args.thumb <= SPRITE_MAX:
            raise ConfigError(f"--thumb {args.thumb} must be in 1..{SPRITE_MAX}")
        if args.format == "atlas" and args.k is not None and args.k < 1:
            raise ConfigError(f"--k {args.k} must be a positive number of neighbours, e.g. --k 10")
        target = Path(args.target)
        run = logged.load(args.run_id, args.tracking_uri)
        # the target checked, and its folder made, once the run is known: before the work
        if args.format == "projector":
            result = projector(run, targets.folder_target(target, "the projector export"), args.thumb, args.seed)
        elif args.format == "atlas":
            others = len(run.coords) - 1
            if args.k is not None and args.k > others:
                raise ConfigError(f"--k {args.k} is more neighbours than the run's {others} other images: "
                                  f"use --k {min(10, others)}")
            targets.file_target(target, (".parquet",), "the atlas export (Parquet)")
            result = atlas(run, target, min(10, others) if args.k is None else args.k)
        else:
            result = parquet(run, targets.file_target(target, (".parquet",), "the parquet export (Parquet)"))
    except ConfigError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.target}: {result}")
    return result


def cli() -> None:
    """The installed ``latentmap-export`` command (and ``python scripts/export.py``)."""
    from latentmap import stopping

    stopping.command(main, "export.py")
    sys.exit(0)


if __name__ == "__main__":
    cli()
