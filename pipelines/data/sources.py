"""Turn what a user has (an ImageFolder tree or a CSV/Parquet manifest) into one listing.

The listing is a polars DataFrame with one row per candidate image:
`source` (the id the user knows it by: relative path or manifest id), `path` (absolute
file path, null when it could not be resolved), `label_name` (null when unknown),
`group` (the manifest's group, null for ImageFolder), `problem` (null, or a quarantine
reason found before decoding: unknown label, missing file, broken symlink, ...) and
`detail` (what exactly, when the reason alone does not say). Rows are never dropped here;
a row with a `problem` goes to quarantine.csv.

A kind of source is one class here (``ImageFolderSource``, ``ManifestSpec``) registered in
``SOURCE_KINDS``: what ingest records of it, how it lists, what it adds to the fingerprint.
A new kind (a DICOM series index, a cloud bucket listing) is one more class, nothing else.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import polars as pl

from pipelines.data.images import UNREADABLE

UNKNOWN_LABEL = "unknown_label"
MISSING_LABEL = "missing_label"
NO_CLASS_FOLDER = "no_class_folder"
AMBIGUOUS_FILE = "ambiguous_file"
DUPLICATE_ROW = "duplicate_manifest_row"
MISSING_FILE = "missing_file"
BROKEN_LINK = "broken_symlink"
LINK_LOOP = "symlink_loop"
BAD_FILE_NAME = "file_name_not_utf8"  # its path cannot be stored (Parquet, JSON and CSV are UTF-8)
NOT_A_FILE = "not_a_regular_file"  # a FIFO, socket or device: reading it could block forever

# What a spreadsheet or pandas writes for "no value" (pandas' default na_values, compared
# case-insensitively): a label "NA" is a missing label, not a fifth class.
MISSING_TOKENS = (
    "", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan", "<na>", "n/a", "na", "nan",
    "none", "null", "nat",
)

LISTING_SCHEMA = {
    "source": pl.String,
    "path": pl.String,
    "label_name": pl.String,
    "group": pl.String,
    "problem": pl.String,
    "detail": pl.String,
}


class ManifestError(ValueError):
    """The manifest cannot be read, or lacks a column it was told to use."""


class Source(Protocol):
    """A kind of input ``msmae ingest`` reads; ``info()`` is recorded as ``dataset.json``'s ``source``."""

    kind: ClassVar[str]
    INPUT_KEYS: ClassVar[tuple[str, ...]]  # the info keys that name input paths: they identify the source

    def info(self) -> dict: ...
    def listing(self, classes: list[str] | None) -> pl.DataFrame: ...
    def fingerprint_bytes(self) -> bytes: ...
    @staticmethod
    def describe_info(info: dict) -> str: ...


@dataclass(frozen=True)
class ImageFolderSource:
    """``<root>/<class>/<file>``: the class is the folder name (torchvision's ImageFolder)."""

    root: Path
    kind: ClassVar[str] = "image_folder"
    INPUT_KEYS: ClassVar[tuple[str, ...]] = ("root",)

    def info(self) -> dict:
        return {"kind": self.kind, "root": str(Path(self.root).resolve())}

    def listing(self, classes: list[str] | None) -> pl.DataFrame:
        return list_image_folder(Path(self.root), classes)

    def fingerprint_bytes(self) -> bytes:
        return b""  # the listing's sizes and mtimes say it all

    @staticmethod
    def describe_info(info: dict) -> str:
        return str(info.get("root"))


@dataclass(frozen=True)
class ManifestSpec:
    """A CSV/Parquet manifest: where it is and which of its columns mean what (HAM10000 ships one)."""

    manifest: Path
    image_root: Path
    image_col: str
    label_col: str
    group_col: str | None = None
    kind: ClassVar[str] = "manifest"
    INPUT_KEYS: ClassVar[tuple[str, ...]] = ("manifest", "image_root")

    def info(self) -> dict:
        return {
            "kind": self.kind, "manifest": str(self.manifest.resolve()), "image_root": str(self.image_root.resolve()),
            "image_col": self.image_col, "label_col": self.label_col, "group_col": self.group_col,
        }

    def listing(self, classes: list[str] | None) -> pl.DataFrame:
        return list_manifest(self, classes)

    def fingerprint_bytes(self) -> bytes:
        return self.manifest.read_bytes()  # a relabelled row changes the dataset

    @staticmethod
    def describe_info(info: dict) -> str:
        return f"manifest {info.get('manifest')} (images under {info.get('image_root')})"


SOURCE_KINDS: dict[str, type] = {kind.kind: kind for kind in (ImageFolderSource, ManifestSpec)}


def as_source(src: Path | Source) -> Source:
    """A folder path is an ImageFolder; anything else is already a source."""
    return ImageFolderSource(Path(src)) if isinstance(src, (str, Path)) else src


def source_key(info: dict | None) -> tuple:
    """What makes two ingests 'the same source' (columns and options may change; the inputs may not)."""
    kind = SOURCE_KINDS.get(info.get("kind")) if isinstance(info, dict) else None
    return ("unknown",) if kind is None else (kind.kind, *(info.get(k) for k in kind.INPUT_KEYS))


def describe(info: dict | None) -> str:
    kind = SOURCE_KINDS.get(info.get("kind")) if isinstance(info, dict) else None
    return "an unknown source" if kind is None else kind.describe_info(info)


def input_paths(info: dict) -> list[Path]:
    kind = SOURCE_KINDS.get(info.get("kind"))
    return [Path(info[k]) for k in (kind.INPUT_KEYS if kind else ()) if info.get(k)]


@dataclass(frozen=True)
class TreeEntry:
    """One thing found under a root: a regular file (``problem`` None), or what could not be read and why."""

    rel: str  # POSIX path relative to the root
    problem: str | None = None
    detail: str | None = None


def scan_tree(root: Path, *, outer: tuple[tuple[int, int], ...] = ()) -> list[TreeEntry]:
    """Everything under `root` that could be an image, sorted by relative path.

    Sorted so the listing, and everything derived from it, is identical across runs and
    file systems. Symlinks are followed, folders included (a class folder that links to
    another disk is a class like any other); a folder link that leads back to one of its
    own ancestors is listed once as a `symlink_loop` instead of being walked forever.
    Nothing is skipped silently: broken and looping links, unreadable folders and
    special files come back with a problem, and hidden files are listed like any other
    (a stray `.DS_Store` is quarantined as not an image). ``outer``: the (device, inode) of
    folders above `root` when it is one part of a larger walk (``pipelines.data.folder_datasource``), so a
    link back to any of them is a loop too.
    """
    root_stat = os.stat(root)
    found: list[TreeEntry] = []
    stack: list[tuple[str, str, tuple[tuple[int, int], ...]]] = [(str(root), "", (*outer, (root_stat.st_dev, root_stat.st_ino)))]
    while stack:
        folder, prefix, ancestors = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            if not prefix:
                raise  # the root itself: nothing can be listed, which is an error, not a quarantine line
            found.append(TreeEntry(prefix.rstrip("/"), UNREADABLE, f"cannot list folder: {e.strerror}"))
            continue
        for entry in entries:
            rel = prefix + entry.name
            bad_name = unstorable_name(rel)
            if bad_name is not None:
                found.append(bad_name)
                continue
            try:
                st = os.stat(entry.path)  # follows symlinks
            except OSError as e:
                found.append(_unstattable(entry.path, rel, e))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    found.append(TreeEntry(rel, LINK_LOOP, f"folder link to {os.path.realpath(entry.path)}, one of its own parents"))
                else:
                    stack.append((entry.path, rel + "/", (*ancestors, key)))
            elif stat.S_ISREG(st.st_mode):
                found.append(TreeEntry(rel))
            else:
                found.append(TreeEntry(rel, NOT_A_FILE, "not a regular file (FIFO, socket or device)"))
    return sorted(found, key=lambda e: e.rel)


def unstorable_name(rel: str) -> TreeEntry | None:
    """A quarantine entry for a name that is not valid UTF-8 (the OS hands such bytes back as surrogate
    escapes, which polars, Parquet, JSON and CSV cannot hold); None for a good name. One such file must
    not abort a listing of thousands."""
    try:
        rel.encode("utf-8")
        return None
    except UnicodeEncodeError:
        shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
        return TreeEntry(shown, BAD_FILE_NAME, f"the name is not valid UTF-8 ({shown!r}); rename it (e.g. convmv -f latin1 -t utf8)")


def _unstattable(path: str, rel: str, error: OSError) -> TreeEntry:
    if error.errno == errno.ELOOP:
        return TreeEntry(rel, LINK_LOOP, "symlink chain loops back on itself")
    if os.path.islink(path):
        return TreeEntry(rel, BROKEN_LINK, f"symlink to {os.readlink(path)}, which does not exist")
    return TreeEntry(rel, UNREADABLE, f"cannot stat: {error.strerror}")


def list_image_folder(root: Path, classes: list[str] | None = None) -> pl.DataFrame:
    """ImageFolder: `<root>/<class>/<file>`; class = the first path component.

    Files directly in `root` have no class and are quarantined (`no_class_folder`); with an
    explicit `classes` list, folders outside it are quarantined as `unknown_label`. Files
    deeper than one level keep the first folder as their class, as torchvision does.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {root} is not a directory")
    entries = scan_tree(root)
    df = pl.DataFrame(
        {"source": [e.rel for e in entries], "walk_problem": [e.problem for e in entries], "detail": [e.detail for e in entries]},
        schema={"source": pl.String, "walk_problem": pl.String, "detail": pl.String},
    )
    parts = pl.col("source").str.split("/")
    df = df.with_columns(
        path=pl.lit(str(root.resolve()) + os.sep) + pl.col("source"),
        label_name=pl.when(parts.list.len() > 1).then(parts.list.first()).otherwise(None),
        group=pl.lit(None, dtype=pl.String),
    )
    allowed = pl.col("label_name").is_in(classes) if classes else pl.lit(True)
    df = df.with_columns(
        problem=pl.when(pl.col("walk_problem").is_not_null())
        .then(pl.col("walk_problem"))
        .when(pl.col("label_name").is_null())
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
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ManifestError(f"manifest {path}: expected a .csv or .parquet file, got {suffix!r}")
    try:
        if suffix == ".csv":
            return pl.read_csv(path, infer_schema=False)
        return pl.read_parquet(path).with_columns(pl.all().cast(pl.String))
    except (pl.exceptions.PolarsError, OSError) as e:
        kind = "CSV" if suffix == ".csv" else "Parquet"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ManifestError(f"manifest {path} cannot be read as {kind} ({first}); check that it is a {kind} file with a header row") from None


def _missing_as_null(column: str) -> pl.Expr:
    """The column's text, stripped, with empty cells and missing-value tokens (NA, nan, None, ...) as null."""
    text = pl.col(column).str.strip_chars()
    return pl.when(text.str.to_lowercase().is_in(MISSING_TOKENS)).then(None).otherwise(text)


def list_manifest(spec: ManifestSpec, classes: list[str] | None = None) -> pl.DataFrame:
    """Manifest rows → listing; ids without an extension resolve to `<id>.<ext>` under image_root.

    Resolution builds one index of the files under `image_root` (relative path, and relative
    path without its extension), so a HAM10000 id such as `ISIC_0027419` finds
    `images/ISIC_0027419.jpg` with one directory walk instead of a stat per guess.
    """
    df = read_manifest(spec.manifest)
    for col, what in ((spec.image_col, "--image-col"), (spec.label_col, "--label-col"), (spec.group_col, "--group-col")):
        if col is not None and col not in df.columns:
            raise ManifestError(f"manifest {spec.manifest}: column {col!r} ({what}) not found; columns are {df.columns}")
    if not spec.image_root.is_dir():
        raise FileNotFoundError(f"--image-root {spec.image_root} is not a directory")

    entries = scan_tree(spec.image_root)
    files = pl.DataFrame(
        {"rel": [e.rel for e in entries], "file_problem": [e.problem for e in entries], "detail": [e.detail for e in entries]},
        schema={"rel": pl.String, "file_problem": pl.String, "detail": pl.String},
    )
    exact = files.select(key=pl.col("rel"), exact=pl.col("rel"), exact_problem=pl.col("file_problem"), exact_detail=pl.col("detail"))
    by_stem = (
        files.with_columns(key=pl.col("rel").str.replace(r"\.[^./]+$", ""))
        .group_by("key", maintain_order=True)
        .agg(n_stem=pl.len(), stem=pl.col("rel").first(), stem_problem=pl.col("file_problem").first(), stem_detail=pl.col("detail").first())
    )

    out = df.select(
        source=_missing_as_null(spec.image_col),
        label_name=_missing_as_null(spec.label_col),
        group=_missing_as_null(spec.group_col) if spec.group_col else pl.lit(None, dtype=pl.String),
    ).with_row_index("_row")
    # An exact match wins over a stem match: "a.jpg" names a.jpg even if a.jpg.png exists.
    out = out.join(exact, left_on="source", right_on="key", how="left")
    out = out.join(by_stem, left_on="source", right_on="key", how="left")
    root = str(spec.image_root.resolve()) + os.sep
    label_ok = pl.lit(True) if not classes else pl.col("label_name").is_in(classes)
    stem_matches = pl.col("exact").is_null() & (pl.col("n_stem") == 1)
    rel = pl.coalesce(pl.col("exact"), pl.when(stem_matches).then(pl.col("stem")))
    file_problem = pl.coalesce(pl.col("exact_problem"), pl.when(stem_matches).then(pl.col("stem_problem")))
    out = out.with_columns(
        path=pl.when(rel.is_not_null()).then(pl.lit(root) + rel),
        detail=pl.coalesce(pl.col("exact_detail"), pl.when(stem_matches).then(pl.col("stem_detail"))),
        dup_row=pl.col("_row") != pl.col("_row").min().over("source"),
    ).with_columns(
        problem=pl.when(pl.col("source").is_null())
        .then(pl.lit(MISSING_FILE))
        .when(pl.col("dup_row"))
        .then(pl.lit(DUPLICATE_ROW))
        .when(pl.col("exact").is_null() & (pl.col("n_stem") > 1))
        .then(pl.lit(AMBIGUOUS_FILE))
        .when(pl.col("path").is_null())
        .then(pl.lit(MISSING_FILE))
        .when(file_problem.is_not_null())
        .then(file_problem)
        .when(pl.col("label_name").is_null())
        .then(pl.lit(MISSING_LABEL))
        .when(~label_ok)
        .then(pl.lit(UNKNOWN_LABEL))
        .otherwise(None)
    )
    out = out.sort("_row").with_columns(source=pl.col("source").fill_null(""))
    return out.select(list(LISTING_SCHEMA)).cast(LISTING_SCHEMA)
