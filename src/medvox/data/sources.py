"""Turn a data source into cases: a CSV/TSV manifest, a MedMNIST ``.npz``, or a folder per class.

Reading a source never decodes an image (an npz's arrays are read when first used). Problems
a row has on its own (an empty label, a path that leaves the manifest's folder, a duplicate id)
are collected in ``CaseSet.problems`` for ``check``; a source that cannot be read at all (no such
file, a missing column) raises :class:`SourceError` naming what is there and the flag to use.

Example:
    >>> cases = load_source(DataConfig(path="data/manifest.csv"))
    >>> cases.classes, len(cases.pool), cases.cases[0].images
    (['benign', 'malignant'], 200, [PosixPath('data/images/case_000.nii.gz')])
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvox.config import DataConfig
from medvox.data.cache import file_signature
from medvox.data.io import is_image_path, suffix_of
from medvox.data.report import Problem
from medvox.errors import DataError

_EMPTY_LABELS = {"", "nan", "na", "n/a", "none", "null", "unknown", "?", "-"}
_POOL_SPLITS = {"", "train", "training", "val", "valid", "validation", "trainval", "cv"}
_TEST_SPLITS = {"test", "testing", "holdout", "held-out", "heldout"}
SPLIT_COL = "split"


@dataclass
class Case:
    """One sample: its image(s) or in-memory array, label, patient and provenance.

    Attributes:
        id: unique case id (used in splits.json and predictions).
        group: patient id; cases of one patient always share a fold (= id when unknown).
        images: one path per channel, or None for an in-memory case.
        array: in-memory volume ``(C, D, H, W)`` or ``(D, H, W)`` (e.g. a MedMNIST row), or None.
        label: index into ``CaseSet.classes``; None when unlabeled.
        fold: fold given by the manifest's fold column, or None.
        subset: "train" (the cross-validation pool) or "test" (held out, never in a fold).
        row: 1-based manifest line (header = 1) for messages; None for other sources.
        meta: anything else (npz key and index, raw label text, ...).
    """

    id: str
    group: str
    images: list[Path] | None = None
    array: np.ndarray | None = None
    label: int | None = None
    fold: int | None = None
    subset: str = "train"
    row: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> str:
        """How the case's input is named in messages: the path as written, or ``npz key[index]``."""
        if self.meta.get("written"):
            return " + ".join(self.meta["written"])
        if self.images:
            return " + ".join(str(p) for p in self.images)
        return f"{self.meta.get('npz_key', 'array')}[{self.meta.get('index', '?')}]"


@dataclass
class CaseSet:
    """All cases of a source, the class names, and what was wrong while reading it."""

    cases: list[Case]
    classes: list[str]
    source: Path
    kind: str  # "manifest" | "npz" | "folder" | "paths"
    problems: list[Problem] = field(default_factory=list)

    @property
    def pool(self) -> list[Case]:
        """The cross-validation pool (everything not held out)."""
        return [c for c in self.cases if c.subset != "test"]

    @property
    def test(self) -> list[Case]:
        return [c for c in self.cases if c.subset == "test"]


class SourceError(DataError):
    """The source cannot be read at all; ``problems`` says why, one entry per reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(f"{p.where()}: {p.what}" + (f" (fix: {p.fix})" if p.fix else "")
                                   for p in problems))


def load_source(cfg: DataConfig, require_labels: bool = True) -> CaseSet:
    """Read the cases of ``cfg.path`` (manifest, MedMNIST .npz or folder-per-class).

    Args:
        cfg: the data config (path and column names).
        require_labels: False accepts unlabeled cases (``predict``); labels are then None.

    Raises:
        SourceError: no path, no such file, an unknown format, or missing required columns.
    """
    if not cfg.path:
        raise SourceError([Problem("no data given", "pass a manifest (.csv/.tsv), a MedMNIST .npz or a "
                                   "folder with one sub-folder per class; or run `medvox make-demo-data DIR`")])
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise SourceError([Problem(f"{path} does not exist", "check the path", file=str(path))])
    if path.is_dir():
        return _from_folder(path, require_labels)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _from_npz(path, require_labels)
    if suffix in (".csv", ".tsv", ".txt"):
        return _from_manifest(path, cfg, require_labels)
    raise SourceError([Problem(f"unknown data source type {suffix!r}", "use a .csv/.tsv manifest, a MedMNIST "
                               ".npz or a folder with one sub-folder per class", file=str(path))])


def class_order(labels: set[str]) -> list[str]:
    """Stable class order: numerically when every label is an integer, else alphabetically."""
    try:
        return [str(v) for v in sorted({int(v) for v in labels})]
    except ValueError:
        return sorted(labels)


def _label_key(text: str) -> str:
    """"1", "01" and "1.0" are the same class when labels are numbers."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


# --- manifest -------------------------------------------------------------------------------


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(line number, values)`` rows; delimiter sniffed, BOM and whitespace stripped."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=",\t;|")
    except csv.Error:
        dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    header = [h.strip() for h in next(reader, [])]
    rows = []
    for values in reader:
        if any(v.strip() for v in values):
            rows.append((reader.line_num, [v.strip() for v in values]))
    return header, rows


def _from_manifest(path: Path, cfg: DataConfig, require_labels: bool) -> CaseSet:
    header, rows = _read_table(path)
    _require_columns(path, header, cfg, require_labels)
    root = path.parent
    cases, problems = [], []
    for line, values in rows:
        record = dict(zip(header, (values + [""] * len(header))[:len(header)], strict=True))
        case, row_problems = _case_from_row(record, line, root, cfg, require_labels)
        if len(values) > len(header) and any(values[len(header):]):
            row_problems.append(Problem(f"{len(values)} values but the header has {len(header)} columns",
                                        "quote values that contain the delimiter", row=line, file=case.file))
        for p in row_problems:
            p.case_index = len(cases)
        cases.append(case)
        problems += row_problems
    label_texts = {c.meta["label_text"] for c in cases if c.meta.get("label_text") is not None}
    classes = class_order(label_texts)
    for case in cases:
        if case.meta.get("label_text") is not None:
            case.label = classes.index(case.meta["label_text"])
    _default_ids(cases)
    for p in problems:
        p.case_id = cases[p.case_index].id
    problems += _duplicate_problems(cases)
    return CaseSet(cases, classes, path, "manifest", problems)


def _require_columns(path: Path, header: list[str], cfg: DataConfig, require_labels: bool) -> None:
    present = ", ".join(repr(h) for h in header) or "none"
    problems = [
        Problem(f"no image column {col!r} in the header (columns present: {present})",
                "name the image column(s) with --image-col NAME (repeat it for multi-channel input)",
                row=1, file=str(path))
        for col in cfg.image_cols if col not in header
    ]
    if require_labels and cfg.label_col not in header:
        problems.append(Problem(f"no label column {cfg.label_col!r} in the header (columns present: {present})",
                                "name the label column with --label-col NAME", row=1, file=str(path)))
    if problems:
        raise SourceError(problems)


def _case_from_row(record: dict[str, str], line: int, root: Path, cfg: DataConfig,
                   require_labels: bool) -> tuple[Case, list[Problem]]:
    problems: list[Problem] = []
    written = [record[col] for col in cfg.image_cols]
    images, case_escapes = [], False
    for col, value in zip(cfg.image_cols, written, strict=True):
        if not value:
            problems.append(Problem(f"no image in column {col!r}", "fill in the path or remove the row", row=line))
            continue
        image = Path(value).expanduser()
        image = image if image.is_absolute() else root / image
        if not _inside(image, root):
            case_escapes = True
            problems.append(Problem(f"path escapes the data folder {root}: {value}",
                                    "keep images under the manifest's folder (a symlinked sub-folder is fine)",
                                    row=line, file=value))
        images.append(image)
    case = Case(id=record.get(cfg.id_col, ""), group=record.get(cfg.group_col, ""), images=images,
                row=line, meta={"written": written, "escapes": case_escapes})
    problems += _parse_label(case, record.get(cfg.label_col), cfg.label_col, require_labels)
    problems += _parse_fold_and_split(case, record, cfg)
    for p in problems:
        p.row, p.file = line, p.file or " + ".join(written)
    return case, problems


def _inside(path: Path, root: Path) -> bool:
    """Lexically inside ``root`` (no ``..`` out of it); symlinks are not followed on purpose."""
    norm, base = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    return os.path.commonpath([norm, base]) == base


def _parse_label(case: Case, text: str | None, col: str, require_labels: bool) -> list[Problem]:
    if text is None or text.strip().lower() in _EMPTY_LABELS:
        case.meta["label_text"] = None
        if not require_labels:
            return []
        what = "empty label" if not text else f"unknown label {text!r}"
        return [Problem(what, f"give the case a class in column {col!r} or remove the row")]
    case.meta["label_text"] = _label_key(text)
    return []


def _parse_fold_and_split(case: Case, record: dict[str, str], cfg: DataConfig) -> list[Problem]:
    problems = []
    fold_text = record.get(cfg.fold_col, "")
    if fold_text:
        try:
            case.fold = int(float(fold_text))
        except ValueError:
            problems.append(Problem(f"fold {fold_text!r} is not an integer",
                                    f"use integer fold numbers in column {cfg.fold_col!r}"))
    split = record.get(SPLIT_COL, "").lower()
    if split in _TEST_SPLITS:
        case.subset = "test"
    elif split not in _POOL_SPLITS:
        problems.append(Problem(f"unknown split {record[SPLIT_COL]!r}",
                                f"column {SPLIT_COL!r} takes 'test' (held out) or 'train'/empty (pool)"))
    return problems


def _default_ids(cases: list[Case]) -> None:
    """Cases without an id get the image's name, or its path when names collide."""
    def stem(case: Case) -> str:
        return _strip_suffix(Path(case.meta["written"][0]).name) if case.meta["written"][0] else f"row{case.row}"

    stems = Counter(stem(c) for c in cases if not c.id)
    for case in cases:
        if not case.id:
            name = stem(case)
            if stems[name] > 1 and case.meta["written"][0]:
                name = _strip_suffix(case.meta["written"][0]).replace(os.sep, "/")
            case.id = name
        case.group = case.group or case.id


def _duplicate_problems(cases: list[Case]) -> list[Problem]:
    """A repeated id or a repeated image: the second row is the problem (it would leak across folds)."""
    problems, seen_id, seen_image = [], {}, {}
    for i, case in enumerate(cases):
        if case.id in seen_id:
            problems.append(Problem(f"duplicate id {case.id!r} (first used on row {seen_id[case.id]})",
                                    "give every case a unique id", row=case.row, file=case.file,
                                    case_id=case.id, case_index=i))
        seen_id.setdefault(case.id, case.row)
        key = tuple(os.path.normpath(p) for p in case.images or [])
        if key and key in seen_image:
            problems.append(Problem(f"the same image(s) as row {seen_image[key]}",
                                    "list every image once", row=case.row, file=case.file,
                                    case_id=case.id, case_index=i))
        seen_image.setdefault(key, case.row)
    for p in problems:
        p.case_id = p.case_id or cases[p.case_index].id
    return problems


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii", ".npy", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- MedMNIST .npz ----------------------------------------------------------------------------


class NpzImages:
    """One image array of an ``.npz`` (``train_images``, ...), decompressed on first use, then kept.

    A MedMNIST-64 npz holds 400 MB of deflated images: reading them costs seconds that a warm start
    (store, inspections and splits all cached) never needs, so the source reads only the labels and the
    arrays' headers, and the cases hold :class:`NpzVolume` views that load their array when asked.
    """

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.key, self.shape, self.dtype = path, key, tuple(shape), np.dtype(dtype)
        self._array: np.ndarray | None = None

    def load(self) -> np.ndarray:
        if self._array is None:
            with np.load(self.path) as npz:
                array = npz[self.key]
            if array.shape != self.shape or array.dtype != self.dtype:
                raise DataError(f"{self.path}: {self.key} changed while it was being read "
                                f"({self.shape} {self.dtype} -> {array.shape} {array.dtype}); run again")
            self._array = array
        return self._array


class NpzVolume:
    """Row ``index`` of an :class:`NpzImages`: shape, dtype and size without reading; the data on demand."""

    __slots__ = ("images", "index")

    def __init__(self, images: NpzImages, index: int) -> None:
        self.images, self.index = images, index

    shape = property(lambda self: self.images.shape[1:])
    dtype = property(lambda self: self.images.dtype)
    size = property(lambda self: int(np.prod(self.images.shape[1:])))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.images.load()[self.index]
        return array if dtype is None else array.astype(dtype, copy=False)


def _npz_header(path: Path, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of ``member`` (an ``.npy`` inside the zip), from its header alone."""
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
    return tuple(shape), np.dtype(dtype)


def _from_npz(path: Path, require_labels: bool) -> CaseSet:
    """MedMNIST layout: official train+val form the pool, the official test split is held out.

    The image arrays are not read here (see :class:`NpzImages`); each case's signature names the file
    (path, size, modification time), the array and the row, as a NIfTI case's names its file.
    """
    with np.load(path) as npz:
        keys = set(npz.files)
        splits = [s for s in ("train", "val", "test") if f"{s}_images" in keys]
        if "train" not in splits:
            raise SourceError([Problem(f"no 'train_images' array (arrays present: {', '.join(sorted(keys))})",
                                       "use a MedMNIST-format .npz (train/val/test_images and _labels)",
                                       file=str(path))])
        images = {s: NpzImages(path, f"{s}_images", *_npz_header(path, f"{s}_images.npy")) for s in splits}
        labels = {s: npz[f"{s}_labels"].reshape(images[s].shape[0], -1)[:, 0] for s in splits
                  if f"{s}_labels" in keys}
    if require_labels and len(labels) < len(splits):
        missing = [f"{s}_labels" for s in splits if s not in labels]
        raise SourceError([Problem(f"no {', '.join(missing)} array", "add the labels", file=str(path))])
    classes = class_order({str(int(v)) for s in labels for v in np.unique(labels[s])})
    index = {int(name): i for i, name in enumerate(classes)}
    signature = file_signature(path)
    cases = []
    for split in splits:
        n = images[split].shape[0]
        width = max(4, len(str(n - 1)))
        for i in range(n):
            case_id = f"{split}_{i:0{width}d}"
            label = index[int(labels[split][i])] if split in labels else None
            cases.append(Case(id=case_id, group=case_id, array=NpzVolume(images[split], i), label=label,
                              subset="test" if split == "test" else "train",
                              meta={"npz_key": f"{split}_images", "index": i,
                                    "_signature": f"npz|{signature}|{split}_images|{i}"}))
    return CaseSet(cases, classes, path, "npz")


# --- folders ----------------------------------------------------------------------------------


def _from_folder(root: Path, require_labels: bool) -> CaseSet:
    """``root/<class>/<case>.nii.gz`` (or DICOM series sub-folders); unlabeled: images in ``root``."""
    direct = _images_in(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and not is_image_path(d))
    if direct and (not require_labels or not class_dirs):
        if require_labels:
            raise SourceError([Problem(f"images directly in {root} but no class sub-folders",
                                       "put each class's images in root/<class>/, or use a manifest",
                                       file=str(root))])
        return CaseSet(cases_from_paths([root]), [], root, "folder")
    classes = class_order({d.name for d in class_dirs if _images_in(d)})
    if not classes:
        raise SourceError([Problem(f"no images found in {root} or its sub-folders",
                                   "use root/<class>/<case>.nii.gz (or DICOM series folders)", file=str(root))])
    cases = []
    for label, name in enumerate(classes):
        for image in _images_in(root / name):
            case_id = f"{name}/{_strip_suffix(image.name)}"
            cases.append(Case(id=case_id, group=case_id, images=[image], label=label,
                              meta={"written": [str(image.relative_to(root))]}))
    return CaseSet(cases, classes, root, "folder")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image_path(p))


def cases_from_paths(paths: list[str | Path]) -> list[Case]:
    """Unlabeled cases for prediction: image files, DICOM series folders, or folders of them.

    Raises:
        DataError: a path that does not exist or holds no image.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        items = [path] if is_image_path(path) else (_images_in(path) if path.is_dir() else [])
        if not items:
            raise DataError(f"{path}: not an image ({suffix_of(path) or 'folder without images'}); "
                            "give NIfTI, DICOM series folders or .npy files")
        found += items
    names = Counter(_strip_suffix(p.name) for p in found)
    cases = []
    for path in found:
        case_id = _strip_suffix(path.name) if names[_strip_suffix(path.name)] == 1 else str(path)
        cases.append(Case(id=case_id, group=case_id, images=[path], subset="test",
                          meta={"written": [str(path)]}))
    return cases
