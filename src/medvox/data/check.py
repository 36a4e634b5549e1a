"""``medvox check``: every problem of a dataset, by row and file, in one pass, before anything runs.

Found per row: missing / unreadable / truncated files, a text file named like an image, images
that are not 3D (2D and 5D are rejected; 4D is channels), voxels that are not real numbers (complex,
RGB), a voxel size of 0 or below, a singular or NaN affine, an image too big for ``data.max_volume_mb``,
NaN/Inf voxels, constant volumes (an error: a blank scan is almost always a failed export;
``--skip-bad`` drops them), empty or unknown labels, labels outside the declared ``data.classes``,
labels spelled two ways ("Malignant" / "malignant"; numbers are compared as numbers, so -1 and 1 are two
classes), duplicate ids or images (one grouped problem beyond 10 repeats), paths escaping the data
folder, broken DICOM series (missing slices, mixed series), a channel count different from the other
cases, a fold that is not a whole number or outside 0..k-1.
Warned per row: a sheared grid (the shear is dropped), extreme anisotropy or shape, a manifest that is
not UTF-8 (read as Windows-1252 / Latin-1), one-hot ``.npz`` labels (converted), labels that look like
probabilities (0 / 0.5 / 1).
Found over the dataset: a patient in two provided folds or in both the pool and the test split, a
fold column filled on some rows only, a class absent from a provided fold, a class without a case in
the cross-validation pool (only in the test split, or declared but absent), too few patients of a class
for ``k`` folds (naming its rows when it has 10 cases or fewer), fewer than two classes, missing columns
(naming those present and the flag).

``check_data`` only reads: nothing is written, whatever it finds.

Example:
    >>> report = check_data(DataConfig(path="manifest.csv"))
    >>> print(report.format()); report.ok
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

from medvox.config import DataConfig
from medvox.data.inspection import inspect_cases
from medvox.data.report import CheckReport, Problem
from medvox.data.sources import GROUP_AFTER, Case, CaseSet, SourceError, is_number, load_source, name_cases


def check_data(cfg: DataConfig, require_labels: bool = True, cases: CaseSet | None = None,
               cache: dict[str, Any] | None = None, progress: bool = True) -> CheckReport:
    """Check a dataset: source, every image, and the dataset as a whole.

    Args:
        cfg: the data config (path, columns, folds).
        require_labels: False for unlabeled inputs (``predict``): no label or fold checks.
        cases: an already loaded source (``prepare`` loads it first to find its cache folder).
        cache: inspection records by file signature from an earlier run; unchanged files are not
            decoded again. Updated in place.
        progress: progress bar while reading many images.

    Returns:
        The report: ``.ok``, ``.problems``, ``.format()``, ``.cases`` and per-case ``.inspections``.
    """
    report = CheckReport(source=str(cfg.path))
    try:
        caseset = cases if cases is not None else load_source(cfg, require_labels)
    except SourceError as exc:
        report.problems = list(exc.problems)
        return report
    report.cases = caseset
    records, image_problems = inspect_cases(caseset.cases, cfg.workers, cache, progress, cfg.max_volume_mb)
    report.inspections = records
    problems = list(caseset.problems) + image_problems + _channel_problems(caseset.cases, records)
    if require_labels:
        problems += check_case_set(caseset.cases, caseset.classes, cfg)
    report.problems = sorted(problems, key=_order)
    return report


def _order(p: Problem) -> tuple:
    """Row order; case-less (dataset-wide) problems last."""
    return (p.case_index is None, p.row if p.row is not None else 1 << 30, p.case_index or 0)


def _channel_problems(cases: list[Case], records: list[dict | None]) -> list[Problem]:
    counts = Counter(r["channels"] for r in records if r is not None)
    if len(counts) < 2:
        return []
    usual, n_usual = counts.most_common(1)[0]
    return [
        Problem(f"{r['channels']} channel(s) but {n_usual} other cases have {usual}",
                "give every case the same channels (image columns / 4th axis)",
                row=case.row, file=case.file, case_id=case.id, case_index=i)
        for i, (case, r) in enumerate(zip(cases, records, strict=True)) if r is not None and r["channels"] != usual
    ]


def check_case_set(cases: list[Case], classes: list[str], cfg: DataConfig) -> list[Problem]:
    """Dataset-wide checks on labeled cases: patients vs folds and test, classes vs ``k``."""
    labeled = [(i, c) for i, c in enumerate(cases) if c.label is not None]
    spelling, variants = _label_spelling_problems(labeled, classes, cfg.label_col)
    problems = spelling + _test_leak_problems(labeled)
    # a class that is only another spelling of one is not checked for its size or folds: its rows are the problem
    labeled = [(i, c) for i, c in labeled if c.label not in variants]
    pool = [(i, c) for i, c in labeled if c.subset != "test"]
    problems += _classes_without_pool_cases(labeled, classes, variants, bool(cfg.classes))
    if len({c.label for _, c in pool}) < 2:
        problems.append(Problem(f"the cross-validation pool has {len({c.label for _, c in pool})} class(es)",
                                "a classifier needs at least two classes with cases"))
        return problems
    folds = {c.fold for _, c in pool if c.fold is not None}
    if folds:  # a provided fold column: its values must be the folds 0..k-1
        range_problems, valid = _fold_range_problems(pool, cfg)
        problems += range_problems
        pool = [(i, c) for i, c in pool if c.fold is None or c.fold in valid]  # the others are named already
        folds = {c.fold for _, c in pool if c.fold is not None}
        problems += _provided_fold_problems(pool, classes, cfg)
        if len(folds) >= 2:
            problems += _too_few_problems(pool, classes, len(folds), provided=True, declared=bool(cfg.classes))
    else:
        problems += _too_few_problems(pool, classes, cfg.folds, declared=bool(cfg.classes))
    return problems


def _classes_without_pool_cases(labeled: list[tuple[int, Case]], classes: list[str], variants: set[int],
                                declared: bool) -> list[Problem]:
    """A class no pool case has cannot be learned (its loss weight and margins divide by its count): one only
    in the test split, or a declared class without cases. Dataset-wide: dropping cases does not fix it."""
    pool_labels = {c.label for _, c in labeled if c.subset != "test"}
    problems = []
    for label, name in enumerate(classes):
        if label in pool_labels or label in variants:
            continue
        in_test = [c for _, c in labeled if c.label == label and c.subset == "test"]
        if in_test:
            problems.append(Problem(
                f"class {name!r} is only in the test split ({len(in_test)} case(s): {name_cases(in_test)}): no "
                "cross-validation case teaches it", f"move patients of class {name!r} into the pool (the "
                f"'split' column), or remove its test cases"))
        elif declared:
            problems.append(Problem(f"declared class {name!r} has no case",
                                    f"add cases of class {name!r}, or remove it from --classes (data.classes)"))
    return problems


def _label_spelling_problems(labeled: list[tuple[int, Case]], classes: list[str],
                             col: str) -> tuple[list[Problem], set[int]]:
    """Class names that differ only in case, spaces, ``_`` or ``-`` ("Malignant" / "malignant", "grade_1" /
    "grade 1"), as tables typed by hand often have: each spelling would be a class of its own. The rows of the
    less common spellings are the problem (dataset-wide: ``--skip-bad`` does not drop them, the label needs the
    fix). Returns the problems and those spellings' label indices."""
    counts = Counter(c.label for _, c in labeled)
    groups: dict[str, list[int]] = defaultdict(list)
    for label in counts:
        if is_number(classes[label]):  # numbers compare as numbers: -1 and 1 are two classes, not two spellings
            continue
        groups[re.sub(r"[\s_-]+", " ", classes[label].casefold()).strip()].append(label)
    problems, variants = [], set()
    for labels in groups.values():
        if len(labels) < 2:
            continue
        usual = max(labels, key=lambda lab: (counts[lab], -lab))
        variants |= set(labels) - {usual}
        name = classes[usual]
        for _, c in labeled:
            if c.label in labels and c.label != usual:
                where = f"in column {col!r}" if c.row is not None else "(rename its folder)"
                problems.append(Problem(
                    f"label {classes[c.label]!r} differs from {name!r} ({counts[usual]} cases) only in case, spaces, "
                    "'_' or '-': they would be two classes", f"write the class as {name!r} {where}",
                    row=c.row, file=c.file, case_id=c.id))
    return problems, variants


def _test_leak_problems(labeled: list[tuple[int, Case]]) -> list[Problem]:
    pool_groups = {c.group for _, c in labeled if c.subset != "test"}
    return [
        Problem(f"patient {c.group!r} is in both the test split and the cross-validation pool",
                "keep all scans of a patient on one side (fix the 'split' column)",
                row=c.row, file=c.file, case_id=c.id, case_index=i)
        for i, c in labeled if c.subset == "test" and c.group in pool_groups
    ]


def _provided_fold_problems(pool: list[tuple[int, Case]], classes: list[str], cfg: DataConfig) -> list[Problem]:
    problems = [
        Problem(f"no fold although other rows have one in column {cfg.fold_col!r}",
                "fill in the fold of every pool row, or remove the column to let medvox split",
                row=c.row, file=c.file, case_id=c.id, case_index=i)
        for i, c in pool if c.fold is None and "bad_fold" not in c.meta  # a fold like 1.7 is reported already
    ]
    with_fold = [(i, c) for i, c in pool if c.fold is not None]
    by_group: dict[str, Counter] = defaultdict(Counter)
    for _, c in with_fold:
        by_group[c.group][c.fold] += 1
    for i, c in with_fold:
        folds = by_group[c.group]
        home = folds.most_common(1)[0][0]  # the patient's main fold; the other rows are the problem
        if len(folds) > 1 and c.fold != home:
            problems.append(Problem(
                f"patient {c.group!r} is in folds {sorted(folds)} (this row: fold {c.fold})",
                "put all scans of a patient in one fold", row=c.row, file=c.file, case_id=c.id, case_index=i))
    fold_values = sorted({c.fold for _, c in with_fold})
    if len(fold_values) < 2:
        problems.append(Problem(f"column {cfg.fold_col!r} has {len(fold_values)} distinct fold(s)",
                                "give at least two folds, or remove the column to let medvox split"))
    for fold in fold_values:
        present = {c.label for _, c in with_fold if c.fold == fold}
        for label, name in enumerate(classes):
            if label not in present and any(c.label == label for _, c in with_fold):
                problems.append(Problem(f"class {name!r} is absent from provided fold {fold}",
                                        "move a patient of that class into the fold, or let medvox split "
                                        f"(remove column {cfg.fold_col!r})"))
    return problems


def _fold_range_problems(pool: list[tuple[int, Case]], cfg: DataConfig) -> tuple[list[Problem], range]:
    """Provided folds must be 0..k-1 (k = ``data.folds``): -1 or 7 with ``--folds 2`` is a typo or a marker
    that medvox would otherwise read as a fold of its own. A column that counts 1..k is read as given.
    Returns the problems and the valid fold values."""
    k = cfg.folds
    values = {c.fold for _, c in pool if c.fold is not None}
    first = 1 if values <= set(range(1, k + 1)) and k in values else 0  # a column counting 1..k is read as given
    valid = range(first, first + k)
    bad = [(i, c) for i, c in pool if c.fold is not None and c.fold not in valid]
    span = f"{first}..{first + k - 1}"
    fix = (f"use folds {span} in column {cfg.fold_col!r}, or --folds to match the column; hold a case out "
           "with split=test, not a negative fold")
    if len(bad) <= GROUP_AFTER:
        problems = [Problem(f"fold {c.fold} is out of range: folds are {span} (data.folds = {k})", fix, row=c.row,
                            file=c.file, case_id=c.id, case_index=i) for i, c in bad]
    else:
        shown = sorted({c.fold for _, c in bad})
        problems = [Problem(f"folds {', '.join(map(str, shown[:10]))} are out of range: folds are {span} (data.folds "
                            f"= {k}); {len(bad)} rows: {name_cases([c for _, c in bad])}", fix)]
    empty = [f for f in valid if f not in values]
    if empty and len(values & set(valid)) >= 2:  # every fold is trained and validated: none may be empty
        problems.append(Problem(f"no case in provided fold(s) {', '.join(map(str, empty))} of {span} "
                                f"(data.folds = {k})", f"give --folds {len(values & set(valid))} to match the "
                                f"column, or put patients in every fold of column {cfg.fold_col!r}"))
    return problems, valid


def _too_few_problems(pool: list[tuple[int, Case]], classes: list[str], k: int,
                      provided: bool = False, declared: bool = False) -> list[Problem]:
    if k < 2:
        return [Problem(f"folds = {k}", "use --folds 2 or more")]
    problems = []
    for label, name in enumerate(classes):
        members = [c for _, c in pool if c.label == label]
        patients = len({c.group for c in members})
        if members and patients < k:
            fix = (f"add patients of class {name!r} to every fold" if provided else
                   f"add cases of class {name!r}" + (f" or use --folds {patients}" if patients >= 2 else ""))
            what = f"too few cases of class {name!r} for {k} folds: {patients} patient(s), {len(members)} case(s)"
            if len(members) <= GROUP_AFTER:  # a stray value ('maybe') or a typo: which rows hold it
                what += f": {name_cases(members)}"
                if not declared:
                    fix += "; if it is a typo, declare the classes (--classes) and it is reported as a row error"
            problems.append(Problem(what, fix))
    return problems
