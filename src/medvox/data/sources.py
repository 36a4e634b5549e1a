"""Turn a data source into cases: a CSV/TSV manifest, a MedMNIST ``.npz``, or a folder per class.

Reading a source never decodes an image (an npz's arrays are read when first used). Problems
a row has on its own (an empty label, a path that leaves the manifest's folder, a duplicate id, a
label outside the declared ``data.classes``, a fold that is not a whole number) are collected in
``CaseSet.problems`` for ``check``; a source that cannot be read at all (no such file, a missing
column, an ``.npz`` whose labels are one-hot with several 1s, fractional, or of another count than its
images) raises :class:`SourceError` naming what is there and the fix.

Labels: numbers are classes by value ("1", "01" and "1.0" are one class, "-1" and "1" two), ordered
numerically; other labels alphabetically; ``data.classes`` declares the classes and their order. An
``.npz`` label array may be ``(N,)``, ``(N, 1)`` or one-hot ``(N, K)`` (read as the column holding the 1,
with a notice). A manifest that is not UTF-8 is read as Windows-1252 / Latin-1 with a notice.

Example:
    >>> cases = load_source(DataConfig(path="data/manifest.csv"))
    >>> cases.classes, len(cases.pool), cases.cases[0].images
    (['benign', 'malignant'], 200, [PosixPath('data/images/case_000.nii.gz')])
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvox.config import DataConfig
from medvox.data.cache import file_signature
from medvox.data.io import dtype_problem, is_image_path, suffix_of
from medvox.data.report import Problem
from medvox.errors import DataError

_EMPTY_LABELS = {"", "nan", "na", "n/a", "none", "null", "unknown", "?", "-"}
_POOL_SPLITS = {"", "train", "training", "val", "valid", "validation", "trainval", "cv"}
_TEST_SPLITS = {"test", "testing", "holdout", "held-out", "heldout"}
SPLIT_COL = "split"
GROUP_AFTER = 10  # one problem shared by more cases than this is reported once, naming the first of them


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
        return _from_folder(path, require_labels, cfg.classes)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _from_npz(path, cfg, require_labels)
    if suffix in (".csv", ".tsv", ".txt"):
        return _from_manifest(path, cfg, require_labels)
    raise SourceError([Problem(f"unknown data source type {suffix!r}", "use a .csv/.tsv manifest, a MedMNIST "
                               ".npz or a folder with one sub-folder per class", file=str(path))])


def class_order(labels: set[str]) -> list[str]:
    """Stable class order: numerically when every label is a number, else alphabetically."""
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def _label_key(text: str) -> str:
    """"1", "01" and "1.0" are the same class when labels are numbers."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def name_cases(cases: list[Case], limit: int = GROUP_AFTER) -> str:
    """``row 12 (case c11, file images/c11.nii.gz), ...`` for messages; at most ``limit``, then how many more."""
    def one(c: Case) -> str:
        return (f"row {c.row} (case {c.id}, file {c.file})" if c.row is not None else f"case {c.id} ({c.file})")

    text = ", ".join(one(c) for c in cases[:limit])
    return text + (f" and {len(cases) - limit} more" if len(cases) > limit else "")


def _grouped(p: Problem, cases: list[Case], indices: list[int]) -> Problem:
    """``p`` blamed on the first of ``indices``; the others ride along in ``p.also`` (``skip_bad`` drops all)."""
    first = cases[indices[0]]
    p.row, p.case_id, p.case_index, p.file = first.row, first.id, indices[0], p.file or first.file
    p.also = [(cases[i].row, cases[i].id, i) for i in indices[1:]]
    return p


def _undeclared_problems(cases: list[Case], declared: list[str], col: str | None) -> list[Problem]:
    """A label outside ``data.classes``: a row error naming the row, case and the declared classes; a label
    shared by more than ``GROUP_AFTER`` cases is one problem listing the first of them."""
    by_label: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        key = c.meta.get("label_text")
        if key is not None and key not in declared:
            by_label.setdefault(key, []).append(i)
            c.label = None
    names = ", ".join(repr(d) for d in declared)
    problems = []
    for key, indices in by_label.items():
        raw = cases[indices[0]].meta.get("label_raw", key)
        close = [d for d in declared if _fold_spelling(d) == _fold_spelling(raw)]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = f"the label in column {col!r}" if col else "the label"
        fix = f"correct {where}, or add {raw!r} to the declared classes (--classes / data.classes)"
        if col is None and is_number(raw) and not any(is_number(d) for d in declared):
            fix = ("an .npz holds class numbers, not names: declare them by number, e.g. --classes "
                   + ",".join(sorted({c.meta["label_text"] for c in cases if c.meta.get("label_text")}, key=float)))
        if len(indices) <= GROUP_AFTER:
            for i in indices:
                problems.append(Problem(f"label {raw!r} is not one of the declared classes {names}{hint}", fix,
                                        row=cases[i].row, file=cases[i].file, case_index=i))
        else:
            problems.append(_grouped(Problem(
                f"label {raw!r} is not one of the declared classes {names}{hint}: {len(indices)} cases, "
                + name_cases([cases[i] for i in indices]), fix), cases, indices))
    return problems


def _fold_spelling(text: str) -> str:
    """A label without case, spaces, ``_`` or ``-``: how hand-typed spellings of one class compare."""
    import re

    return re.sub(r"[\s_-]+", " ", str(text).casefold()).strip()


def _assign_labels(cases: list[Case], declared: list[str], col: str | None,
                   key: Callable[[str], str] = _label_key) -> tuple[list[str], list[Problem]]:
    """Class names (declared, else inferred) and each case's index into them; the problems of undeclared labels.
    ``key`` spells a declared class as labels are spelled (numbers by value; a folder's name as it is)."""
    texts = {c.meta["label_text"] for c in cases if c.meta.get("label_text") is not None}
    problems = []
    if declared:
        classes = [key(d.strip()) for d in declared]
        problems = _undeclared_problems(cases, classes, col)
    else:
        classes = class_order(texts)
    for case in cases:
        if case.meta.get("label_text") in classes:
            case.label = classes.index(case.meta["label_text"])
    return classes, problems


def _probability_hint(classes: list[str], path: Path, col: str) -> list[Problem]:
    """Labels such as 0 / 0.5 / 1: each value would be a class of its own; they may be probabilities."""
    if not classes or not all(is_number(c) for c in classes):
        return []
    values = [float(c) for c in classes]
    if any(not v.is_integer() for v in values) and all(0 <= v <= 1 for v in values):
        shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
        return [Problem(f"labels {shown} in column {col!r} include fractions between 0 and 1: probabilities or soft "
                        f"labels? each distinct value is a class of its own ({len(classes)} classes)",
                        "give one class label per case (e.g. threshold the probabilities), or declare the classes "
                        "with --classes", file=str(path), level="warning")]
    return []


# --- manifest -------------------------------------------------------------------------------


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]], Problem | None]:
    """Header, ``(line number, values)`` rows and a notice when the file is not UTF-8; delimiter sniffed, BOM
    and whitespace stripped. UTF-16 with a BOM (Excel's "Unicode text") is read as such; other bytes that are
    not UTF-8 are read as Windows-1252, else Latin-1 (which reads any byte), with the notice."""
    raw = path.read_bytes()
    notice = None
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        text = raw.decode("utf-16")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line, byte = raw[:exc.start].count(b"\n") + 1, raw[exc.start]
            encoding = "cp1252" if _decodes(raw, "cp1252") else "latin-1"
            text = raw.decode(encoding)
            name = {"cp1252": "Windows-1252", "latin-1": "Latin-1 (ISO-8859-1)"}[encoding]
            notice = Problem(f"the manifest is not UTF-8 (line {line} holds byte 0x{byte:02x}): read as {name}, where "
                             f"that byte is {bytes([byte]).decode(encoding)!r}",
                             "save the manifest as UTF-8 (Excel: 'CSV UTF-8') to be sure every character reads as "
                             "written", row=line, file=str(path), level="warning")
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
    return header, rows, notice


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _from_manifest(path: Path, cfg: DataConfig, require_labels: bool) -> CaseSet:
    header, rows, notice = _read_table(path)
    _require_columns(path, header, cfg, require_labels)
    root = path.parent
    cases, problems = [], [notice] if notice else []
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
    classes, label_problems = _assign_labels(cases, list(cfg.classes), cfg.label_col)
    problems += label_problems
    if not cfg.classes:
        problems += _probability_hint(classes, path, cfg.label_col)
    _default_ids(cases)
    for p in problems:
        if p.case_index is not None:
            p.case_id = cases[p.case_index].id
            p.also = [(row, cases[i].id, i) for row, _, i in p.also]
    problems += _duplicate_problems(cases)
    return CaseSet(cases, classes, path, "manifest", problems)


def _require_columns(path: Path, header: list[str], cfg: DataConfig, require_labels: bool) -> None:
    present = ", ".join(repr(h) for h in header) or "none"
    twice = sorted({col for col in cfg.image_cols if list(cfg.image_cols).count(col) > 1})
    if twice:  # two identical channels would train without a word; a repeated flag is a slip
        raise SourceError([Problem(f"image column {col!r} given {list(cfg.image_cols).count(col)} times (--image-col): "
                                   "every case would get identical channels", "name each image column once",
                                   row=1, file=str(path)) for col in twice])
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
    case.meta["label_raw"] = text
    return []


def _parse_fold_and_split(case: Case, record: dict[str, str], cfg: DataConfig) -> list[Problem]:
    problems = []
    fold_text = record.get(cfg.fold_col, "")
    if fold_text:
        try:
            value = float(fold_text)
        except ValueError:
            value = math.nan
        if value.is_integer():
            case.fold = int(value)
        else:  # 1.7 is not fold 1: a fold column with fractions is a mistake, not something to round
            case.meta["bad_fold"] = fold_text
            problems.append(Problem(f"fold {fold_text!r} is not a whole number",
                                    f"use fold numbers 0..k-1 in column {cfg.fold_col!r}"))
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
    """A repeated id or a repeated image: the later rows are the problem (they would leak across folds). An id
    or image repeated on more than ``GROUP_AFTER`` rows is one problem naming the first repeats."""
    problems = []
    for kind, key_of in (("id", lambda c: c.id), ("image", lambda c: tuple(os.path.normpath(p) for p in c.images or []))):
        rows: dict[Any, list[int]] = {}
        for i, case in enumerate(cases):
            key = key_of(case)
            if key:
                rows.setdefault(key, []).append(i)
        for key, indices in rows.items():
            first, repeats = cases[indices[0]], indices[1:]
            if not repeats:
                continue
            if kind == "id":
                what, fix = f"duplicate id {key!r} (first used on row {first.row})", "give every case a unique id"
            else:
                what, fix = f"the same image(s) as row {first.row}", "list every image once"
            if len(repeats) <= GROUP_AFTER:
                problems += [Problem(what, fix, row=cases[i].row, file=cases[i].file, case_id=cases[i].id, case_index=i)
                             for i in repeats]
            else:
                rows_text = ", ".join(str(cases[i].row) for i in repeats[:GROUP_AFTER])
                problems.append(_grouped(Problem(f"{what}, repeated on {len(repeats):,} rows: {rows_text} and "
                                                 f"{len(repeats) - GROUP_AFTER:,} more", fix), cases, repeats))
    return sorted(problems, key=lambda p: p.case_index)


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
            try:
                with np.load(self.path) as npz:
                    array = npz[self.key]
            except Exception as exc:  # a damaged member shows only when it is inflated
                raise DataError(f"{self.path}: {self.key} cannot be read ({type(exc).__name__}: "
                                f"{str(exc)[:120]}): the file is damaged or truncated; download or write it again"
                                ) from exc
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


def _from_npz(path: Path, cfg: DataConfig, require_labels: bool) -> CaseSet:
    """MedMNIST layout: official train+val form the pool, the official test split is held out.

    The image arrays are not read here (see :class:`NpzImages`); each case's signature names the file
    (path, size, modification time), the array and the row, as a NIfTI case's names its file.
    """
    _require_zip(path)
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            splits = [s for s in ("train", "val", "test") if f"{s}_images" in keys]
            if "train" not in splits:
                raise SourceError([Problem(f"no 'train_images' array (arrays present: {', '.join(sorted(keys))})",
                                           "use a MedMNIST-format .npz (train/val/test_images and _labels)",
                                           file=str(path))])
            images = {s: NpzImages(path, f"{s}_images", *_npz_header(path, f"{s}_images.npy")) for s in splits}
            problems = [p for s in splits for p in _npz_image_problems(path, images[s])]
            labels, notices = {}, []
            for s in splits:
                if f"{s}_labels" in keys:
                    found, label_problems = _npz_labels(path, npz, s, images[s].shape[0])
                    problems += [p for p in label_problems if p.level == "error"]
                    notices += [p for p in label_problems if p.level != "error"]
                    if found is not None:
                        labels[s] = found
    except SourceError:
        raise
    except Exception as exc:  # a damaged archive (bad zip member, CRC error, cut-off member)
        raise SourceError([Problem(f"unreadable .npz ({type(exc).__name__}: {str(exc)[:120]})",
                                   "the file is damaged or truncated; download or write it again",
                                   file=str(path))]) from exc
    if problems:
        raise SourceError(problems)
    if require_labels and len(labels) < len(splits):
        missing = [f"{s}_labels" for s in splits if s not in labels]
        raise SourceError([Problem(f"no {', '.join(missing)} array", "add the labels", file=str(path))])
    signature = file_signature(path)
    cases = []
    for split in splits:
        n = images[split].shape[0]
        width = max(4, len(str(n - 1)))
        for i in range(n):
            case_id = f"{split}_{i:0{width}d}"
            label_text = str(int(labels[split][i])) if split in labels else None
            cases.append(Case(id=case_id, group=case_id, array=NpzVolume(images[split], i),
                              subset="test" if split == "test" else "train",
                              meta={"npz_key": f"{split}_images", "index": i, "label_text": label_text,
                                    "_signature": f"npz|{signature}|{split}_images|{i}"}))
    classes, label_problems = _assign_labels(cases, list(cfg.classes), None)
    return CaseSet(cases, classes, path, "npz", notices + label_problems)


def _require_zip(path: Path) -> None:
    """An ``.npz`` is a zip archive: say what the file is when it is not (``np.load`` would say "pickled data")."""
    import zipfile

    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        what = "empty file (0 bytes)"
    elif head.startswith(b"\x93NUMPY"):
        what = "a single .npy array named .npz, not a MedMNIST .npz archive"
    elif all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        what = "not an .npz: the file holds text, not a zip archive of arrays"
    elif head.startswith(b"PK"):
        what = "a damaged or truncated .npz (its zip directory is missing: an interrupted download?)"
    else:
        what = "not an .npz (no zip archive signature)"
    raise SourceError([Problem(what, "give a MedMNIST-format .npz (numpy.savez of train/val/test_images and "
                               "_labels)", file=str(path))])


def _npz_image_problems(path: Path, images: NpzImages) -> list[Problem]:
    """The images' layout from the array header: (N, D, H, W) or (N, C, D, H, W), numbers, not channels last."""
    shape, key = images.shape, images.key
    problem = dtype_problem(images.dtype)
    if problem is not None:
        return [Problem(f"{key}: {problem[0]}", problem[1], file=str(path))]
    if len(shape) == 5 and shape[-1] <= 4 < min(shape[1:4]):
        return [Problem(f"{key} has shape {shape}: channels last (N, D, H, W, C) with C = {shape[-1]}; medvox "
                        "reads (N, D, H, W) or channels first (N, C, D, H, W), so this would be "
                        f"{shape[1]} channels of {shape[2]} x {shape[3]} x {shape[4]}",
                        f"move the channel axis before saving: np.moveaxis({key}, -1, 1)", file=str(path))]
    if len(shape) not in (4, 5) or min(shape[-3:], default=0) < 2:
        return [Problem(f"{key} has shape {shape}: not a stack of 3D volumes",
                        "give (N, D, H, W) or (N, C, D, H, W) arrays", file=str(path))]
    return []


def _npz_labels(path: Path, npz: Any, split: str, n: int) -> tuple[np.ndarray | None, list[Problem]]:
    """One integer class per image from ``{split}_labels``: ``(N,)``, ``(N, 1)`` or one-hot ``(N, K)``."""
    key = f"{split}_labels"

    def error(what: str, fix: str) -> tuple[None, list[Problem]]:
        return None, [Problem(f"{key}: {what}", fix, file=str(path))]

    try:
        raw = npz[key]
    except ValueError:  # an object array: numpy would need to unpickle it
        return error("an array of Python objects (loading it would mean unpickling)",
                     "save the labels as a numeric array of shape (N,) or (N, 1)")
    if raw.dtype.kind not in "biuf":
        return error(f"{raw.dtype} values, not numbers", "save the labels as integers, one class index per image")
    count = raw.shape[0] if raw.ndim else 1
    if raw.ndim == 0 or raw.ndim > 2 or count != n:
        return error(f"shape {raw.shape}: {count} label row(s) for {n} images in {split}_images",
                     f"give one label per image: shape ({n},) or ({n}, 1)")
    x = raw.reshape(n, -1)
    width = max(4, len(str(n - 1)))

    def rows(indices: np.ndarray) -> str:
        shown = ", ".join(f"{split}_{i:0{width}d}" for i in indices[:GROUP_AFTER])
        return shown + (f" and {len(indices) - GROUP_AFTER} more" if len(indices) > GROUP_AFTER else "")

    if x.shape[1] > 1:
        if not np.isin(x, (0, 1)).all():
            return error(f"shape {raw.shape} with values other than 0 and 1: neither one class per image nor "
                         "one-hot", f"give one class index per image: shape ({n},) or ({n}, 1)")
        ones = x.sum(axis=1)
        several, none = np.flatnonzero(ones > 1), np.flatnonzero(ones == 0)
        if several.size:
            first = several[0]
            return error(f"multi-label: {several.size} image(s) have several classes (case {split}_{first:0{width}d}: "
                         f"columns {', '.join(map(str, np.flatnonzero(x[first])))}); medvox trains one class per "
                         f"image, which is not supported here (cases {rows(several)})",
                         "give one class per image (e.g. one column of the labels, or one model per label)")
        if none.size:
            return error(f"one-hot rows without a 1: {none.size} image(s) have no class (cases {rows(none)})",
                         "give every image a class, or remove it")
        notice = Problem(f"{key} is one-hot ({n} x {x.shape[1]}): read as class = the column holding the 1",
                         f"save one class index per image, shape ({n},), to silence this", file=str(path),
                         level="warning")
        return x.argmax(axis=1).astype(np.int64), [notice]
    v = x[:, 0]
    if v.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            return error(f"{bad.size} label(s) are NaN or Inf (cases {rows(bad)})", "give every image a class")
        frac = np.flatnonzero(v != np.round(v))
        if frac.size:
            values = ", ".join(f"{v[i]:g}" for i in frac[:3])
            return error(f"fractional labels ({values}, ...) on {frac.size} image(s): a label must be a whole class "
                         f"number (cases {rows(frac)})", "give the class index of each image; probabilities or "
                         "soft labels are not classes")
    return v.astype(np.int64), []


# --- folders ----------------------------------------------------------------------------------


def _from_folder(root: Path, require_labels: bool, declared: tuple[str, ...] | list[str] = ()) -> CaseSet:
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
    names = class_order({d.name for d in class_dirs if _images_in(d)})
    if not names:
        raise SourceError([Problem(f"no images found in {root} or its sub-folders",
                                   "use root/<class>/<case>.nii.gz (or DICOM series folders)", file=str(root))])
    cases = []
    for name in names:
        for image in _images_in(root / name):
            case_id = f"{name}/{_strip_suffix(image.name)}"
            cases.append(Case(id=case_id, group=case_id, images=[image],
                              meta={"written": [str(image.relative_to(root))], "label_text": name, "label_raw": name}))
    classes, problems = _assign_labels(cases, list(declared), None, key=str)
    for p in problems:
        p.what = p.what.replace("label ", "class folder ", 1)
        p.fix = (f"move the images into a declared class's folder, or add {cases[p.case_index].meta['label_raw']!r} "
                 "to the declared classes (--classes / data.classes)")
    return CaseSet(cases, classes, root, "folder", problems)


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
