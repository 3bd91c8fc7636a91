"""Turn what a user has (an ImageFolder tree or a CSV/Parquet manifest) into one listing.

The listing is a polars DataFrame with one row per candidate image:
`source` (the id the user knows it by: relative path or manifest id), `path` (absolute
file path, null when it could not be resolved), `label_name` (null when unknown),
`group` (the manifest's group, null for ImageFolder) and `problem` (null, or a quarantine
reason found before decoding: unknown label, missing file, ...). Rows are never dropped
here; a row with a `problem` goes to quarantine.csv.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

UNKNOWN_LABEL = "unknown_label"
NO_CLASS_FOLDER = "no_class_folder"
AMBIGUOUS_FILE = "ambiguous_file"
DUPLICATE_ROW = "duplicate_manifest_row"
MISSING_FILE = "missing_file"

LISTING_SCHEMA = {
    "source": pl.String,
    "path": pl.String,
    "label_name": pl.String,
    "group": pl.String,
    "problem": pl.String,
}


@dataclass(frozen=True)
class ManifestSpec:
    """Where the manifest is and which of its columns mean what."""

    manifest: Path
    image_root: Path
    image_col: str
    label_col: str
    group_col: str | None = None


def walk_files(root: Path) -> list[str]:
    """All regular files under `root`, as sorted POSIX paths relative to it.

    Sorted so the listing, and everything derived from it, is identical across runs and
    file systems. Symlinks to files are followed; hidden files are listed like any other
    (a stray `.DS_Store` is quarantined as not an image, not silently skipped).
    """
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath, name)
            if full.is_file():
                out.append(full.relative_to(root).as_posix())
    return sorted(out)


def list_image_folder(root: Path, classes: list[str] | None = None) -> pl.DataFrame:
    """ImageFolder: `<root>/<class>/<file>`; class = the first path component.

    Files directly in `root` have no class and are quarantined (`no_class_folder`); with an
    explicit `classes` list, folders outside it are quarantined as `unknown_label`. Files
    deeper than one level keep the first folder as their class, as torchvision does.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {root} is not a directory")
    rel = walk_files(root)
    df = pl.DataFrame({"source": rel}, schema={"source": pl.String})
    parts = pl.col("source").str.split("/")
    df = df.with_columns(
        path=pl.lit(str(root.resolve()) + os.sep) + pl.col("source"),
        label_name=pl.when(parts.list.len() > 1).then(parts.list.first()).otherwise(None),
        group=pl.lit(None, dtype=pl.String),
    )
    allowed = pl.col("label_name").is_in(classes) if classes else pl.lit(True)
    df = df.with_columns(
        problem=pl.when(pl.col("label_name").is_null())
        .then(pl.lit(NO_CLASS_FOLDER))
        .when(~allowed)
        .then(pl.lit(UNKNOWN_LABEL))
        .otherwise(None)
    )
    return df.select(list(LISTING_SCHEMA)).cast(LISTING_SCHEMA)


def read_manifest(path: Path) -> pl.DataFrame:
    """Read a .csv or .parquet manifest with every column as text (ids must not become numbers)."""
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pl.read_csv(path, infer_schema=False)
    if suffix in (".parquet", ".pq"):
        df = pl.read_parquet(path)
        return df.with_columns(pl.all().cast(pl.String))
    raise ValueError(f"manifest {path}: expected a .csv or .parquet file, got {suffix!r}")


def list_manifest(spec: ManifestSpec, classes: list[str] | None = None) -> pl.DataFrame:
    """Manifest rows → listing; ids without an extension resolve to `<id>.<ext>` under image_root.

    Resolution builds one index of the files under `image_root` (relative path, and relative
    path without its extension), so a HAM10000 id such as `ISIC_0027419` finds
    `images/ISIC_0027419.jpg` with one directory walk instead of a stat per guess.
    """
    df = read_manifest(spec.manifest)
    for col, what in ((spec.image_col, "--image-col"), (spec.label_col, "--label-col"), (spec.group_col, "--group-col")):
        if col is not None and col not in df.columns:
            raise ValueError(f"manifest {spec.manifest}: column {col!r} ({what}) not found; columns are {df.columns}")
    if not spec.image_root.is_dir():
        raise FileNotFoundError(f"--image-root {spec.image_root} is not a directory")

    files = pl.DataFrame({"rel": walk_files(spec.image_root)}, schema={"rel": pl.String})
    exact = files.select(key=pl.col("rel"), exact=pl.col("rel"))
    by_stem = (
        files.with_columns(key=pl.col("rel").str.replace(r"\.[^./]+$", ""))
        .group_by("key", maintain_order=True)
        .agg(n_stem=pl.len(), stem=pl.col("rel").first())
    )

    out = df.select(
        source=pl.col(spec.image_col).str.strip_chars(),
        label_name=pl.col(spec.label_col).str.strip_chars(),
        group=pl.col(spec.group_col).str.strip_chars() if spec.group_col else pl.lit(None, dtype=pl.String),
    ).with_row_index("_row")
    # An exact match wins over a stem match: "a.jpg" names a.jpg even if a.jpg.png exists.
    out = out.join(exact, left_on="source", right_on="key", how="left")
    out = out.join(by_stem, left_on="source", right_on="key", how="left")
    root = str(spec.image_root.resolve()) + os.sep
    label_ok = pl.col("label_name").is_not_null() & (pl.col("label_name") != "")
    if classes:
        label_ok = label_ok & pl.col("label_name").is_in(classes)
    rel = pl.coalesce(pl.col("exact"), pl.when(pl.col("n_stem") == 1).then(pl.col("stem")))
    out = out.with_columns(
        path=pl.when(rel.is_not_null()).then(pl.lit(root) + rel),
        dup_row=pl.col("_row") != pl.col("_row").min().over("source"),
    ).with_columns(
        problem=pl.when(pl.col("source").is_null() | (pl.col("source") == ""))
        .then(pl.lit(MISSING_FILE))
        .when(pl.col("dup_row"))
        .then(pl.lit(DUPLICATE_ROW))
        .when(pl.col("exact").is_null() & (pl.col("n_stem") > 1))
        .then(pl.lit(AMBIGUOUS_FILE))
        .when(pl.col("path").is_null())
        .then(pl.lit(MISSING_FILE))
        .when(~label_ok)
        .then(pl.lit(UNKNOWN_LABEL))
        .otherwise(None)
    )
    out = out.sort("_row").with_columns(source=pl.col("source").fill_null(""))
    return out.select(list(LISTING_SCHEMA)).cast(LISTING_SCHEMA)
