"""The run folder, read and written in one place.

Every file name of a run is defined here once; :func:`write_json` is the one (atomic, JSON-safe) writer,
:func:`write_predictions` / :func:`read_predictions` the one predictions-CSV format, and :class:`Run` opens
a run folder (``medvox cv``) or a fold folder (``medvox train``) for every consumer: the cv summary, the
report, compare, predict, explain and export.

Layout of a cross-validation run::

    <output>/<run>/
        cv_summary.json          format_version, decision, calibration, members, pooled OOF and test metrics
        cv_table.md              the same figures as a table
        oof_predictions.csv      every case's out-of-fold prediction (raw, calibrated, final) + the decision
        test_predictions.csv     the fold ensemble on the held-out test set, same columns
        features/                the descriptor model when the run is fused (fusion.json, fold_<k>.json)
        fold_<k>/                config.json, plan.json, splits.json, run_info.json, metrics.json,
                                 calibration.json, val_predictions.csv, best.pt, best_ema.pt, last.pt, ...

A predictions CSV holds ``case_id, patient_id, label, prob_<class>..., predicted, decision`` and, where they
differ from ``prob_``, ``raw_prob_<class>...`` and ``calibrated_prob_<class>...``; ``prob_`` are the
probabilities the decision applies to (its cell says which: raw, calibrated or fused), so ``predicted``
follows from the row and its ``decision`` cell alone (:meth:`medvox.metrics.decision.Decision.from_cell`).

Example:
    >>> run = Run.open("results/resnet50")            # doctest: +SKIP
    >>> run.decision.text(), run.oof().probs.shape    # doctest: +SKIP
    ('calibrated p(malignant) >= 0.509', (160, 2))
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from medvox.errors import DataError, MedvoxError
from medvox.metrics.classification import to_jsonable
from medvox.metrics.decision import Decision

FORMAT_VERSION = 1

# every file of a run folder
CV_SUMMARY = "cv_summary.json"
CV_TABLE = "cv_table.md"
OOF_PREDICTIONS = "oof_predictions.csv"
TEST_PREDICTIONS = "test_predictions.csv"
REPORT = "report.html"
FEATURES = "features"
FUSION = "fusion.json"
LOCK = ".medvox.lock"
# every file of a fold folder
CONFIG = "config.json"
PLAN = "plan.json"
SPLITS = "splits.json"
RUN_INFO = "run_info.json"
METRICS = "metrics.json"
CALIBRATION = "calibration.json"
VAL_PREDICTIONS = "val_predictions.csv"
SKIPPED = "skipped_cases.json"
PRETRAINED_REPORT = "pretrained_report.json"
TRAIN_LOG = "train.log"
BEST = "best.pt"
BEST_EMA = "best_ema.pt"
LAST = "last.pt"

_FOLD_RE = re.compile(r"fold_(\d+)")


class RunError(MedvoxError):
    """A run folder that is missing, incomplete or inconsistent (exit code 5)."""

    exit_code = 5


def fold_name(k: int) -> str:
    return f"fold_{int(k)}"


# -- JSON ----------------------------------------------------------------------------------------------------
def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON, atomically (a temporary file renamed over ``path``) and JSON-safe (NumPy and torch
    types converted, NaN -> null), readable by the group like the checkpoints."""
    path = Path(path)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON file as a dict; ``None`` when it is missing or not a JSON object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


# -- predictions CSV ---------------------------------------------------------------------------------------------
# the columns ``medvox predict`` adds to the prediction columns; ``warnings`` holds short codes joined by WARNINGS_SEP
PREDICT_COLUMNS = ("source", "spread", "status", "error", "warnings")
WARNINGS_SEP = "; "


def join_warnings(warnings: list[str]) -> str:
    """A ``warnings`` cell: the codes joined by :data:`WARNINGS_SEP` (a code never holds ``;``)."""
    return WARNINGS_SEP.join(w.replace(";", ",") for w in warnings)


def split_warnings(cell: str) -> list[str]:
    """The codes of a ``warnings`` cell (empty: none)."""
    return [w.strip() for w in (cell or "").split(";") if w.strip()]


@dataclass
class Predictions:
    """One predictions CSV.

    Attributes:
        ids, groups: case and patient ids ``(N,)``.
        labels: label indices ``(N,)``, ``-1`` where the label is unknown.
        probs: ``(N, K)`` the probabilities ``decision`` applies to (``prob_`` columns).
        raw, calibrated: ``(N, K)`` when the file holds them (else the same as ``probs`` where
            ``decision.probabilities`` says so, or None).
        decision: the decision ``predicted`` follows from.
        extra: further columns by name (``fold``, ``spread``, ``source``, ``status``, ...).
    """

    ids: list[str]
    groups: list[str]
    labels: np.ndarray
    probs: np.ndarray
    classes: list[str]
    decision: Decision
    raw: np.ndarray | None = None
    calibrated: np.ndarray | None = None
    extra: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def predicted(self) -> list[str]:
        return self.decision.labels(self.probs)

    @property
    def warnings(self) -> list[list[str]] | None:
        """Each row's warning codes (``medvox predict``'s ``warnings`` column), or None without that column."""
        return None if "warnings" not in self.extra else [split_warnings(v) for v in self.extra["warnings"]]

    @property
    def folds(self) -> np.ndarray | None:
        return None if "fold" not in self.extra else np.array([int(v) for v in self.extra["fold"]])

    def labelled(self) -> Predictions:
        """The rows whose label is known."""
        keep = self.labels >= 0
        pick = (lambda a: None if a is None else a[keep])  # noqa: E731
        return Predictions([i for i, k in zip(self.ids, keep, strict=True) if k],
                           [g for g, k in zip(self.groups, keep, strict=True) if k], self.labels[keep],
                           self.probs[keep], self.classes, self.decision, pick(self.raw), pick(self.calibrated),
                           {c: [v for v, k in zip(vals, keep, strict=True) if k] for c, vals in self.extra.items()})


def _fmt_prob(p: float) -> str:
    return format(float(p), ".9g")


def _as_written(a: np.ndarray) -> np.ndarray:
    """``a`` rounded as a predictions CSV stores it (9 significant digits)."""
    return np.vectorize(lambda v: float(_fmt_prob(v)), otypes=[np.float64])(a) if a.size else a


class PredictionsWriter:
    """A predictions CSV (see the module docstring) written a few rows at a time, each call flushed: ``medvox
    predict`` over thousands of inputs shows its progress in the file and keeps what it finished.

    Args:
        path: the CSV (written in place; :func:`write_predictions` writes a whole file atomically instead).
        classes: the ``K`` class names.
        decision: the decision ``predicted`` follows from (its cell is in every row).
        raw, calibrated: whether the file has ``raw_prob_`` / ``calibrated_prob_`` columns.
        extra: the names of further columns.

    A row whose ``extra["status"]`` is not ``"ok"`` (an input that could not be predicted) is kept with empty
    probability and ``predicted`` cells; its ``probs`` rows are ignored (NaN is fine).
    """

    def __init__(self, path: str | Path, classes: list[str], decision: Decision, *, raw: bool = False,
                 calibrated: bool = False, extra: list[str] | tuple[str, ...] = ()):
        self.path, self.classes, self.decision = Path(path), list(classes), decision
        self.sets = [name for name, on in (("raw", raw), ("calibrated", calibrated)) if on]
        self.extra = list(extra)
        self._cell = decision.to_cell()
        self._fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._writer = csv.writer(self._fh)
        self._writer.writerow(["case_id", "patient_id", "label", *[f"prob_{c}" for c in self.classes], "predicted",
                               "decision", *[f"{name}_prob_{c}" for name in self.sets for c in self.classes],
                               *self.extra])
        self._fh.flush()

    def write(self, ids: list[str], groups: list[str], labels: np.ndarray, probs: np.ndarray, *,
              raw: np.ndarray | None = None, calibrated: np.ndarray | None = None,
              extra: dict[str, list[Any]] | None = None) -> None:
        """Rows ``ids`` (``labels`` -1: unknown, an empty cell), then a flush."""
        k = len(self.classes)
        # decided on the values as the file holds them: `predicted` follows from the file
        probs = _as_written(np.asarray(probs, dtype=np.float64).reshape(len(ids), k))
        extra = extra or {}
        if sorted(extra) != sorted(self.extra):
            raise ValueError(f"extra columns {sorted(extra)}, the file has {sorted(self.extra)}")
        given = {"raw": raw, "calibrated": calibrated}
        sets = []
        for name in self.sets:
            if given[name] is None:
                raise ValueError(f"the file has {name}_prob_ columns: give {name}=")
            sets.append(_as_written(np.asarray(given[name], dtype=np.float64).reshape(probs.shape)))
        status = extra.get("status")
        ok = np.array([s == "ok" for s in status] if status is not None else [True] * len(ids), dtype=bool)
        decided = iter(self.decision.labels(probs[ok]) if ok.any() else [])

        def cells(a: np.ndarray, i: int) -> list[str]:
            return list(map(_fmt_prob, a[i])) if ok[i] else [""] * k

        for i, cid in enumerate(ids):
            label = self.classes[int(labels[i])] if int(labels[i]) >= 0 else ""
            self._writer.writerow([cid, groups[i], label, *cells(probs, i), next(decided) if ok[i] else "",
                                   self._cell, *[v for a in sets for v in cells(a, i)],
                                   *[extra[c][i] for c in self.extra]])
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
            os.chmod(self.path, 0o644)

    def __enter__(self) -> PredictionsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_predictions(path: str | Path, ids: list[str], groups: list[str], labels: np.ndarray, probs: np.ndarray,
                      classes: list[str], decision: Decision, *, raw: np.ndarray | None = None,
                      calibrated: np.ndarray | None = None, extra: dict[str, list[Any]] | None = None) -> Path:
    """Write a predictions CSV (see the module docstring), atomically; ``labels`` -1: unknown (empty cell).

    ``probs`` are the probabilities ``decision`` applies to; ``raw`` / ``calibrated`` are added as their own
    columns when given and different from ``probs``. The file is read back the same by :func:`read_predictions`
    (9 significant digits: every figure computed from the file equals one computed from what it read).
    Rows whose ``extra["status"]`` is not ``"ok"`` are kept without probabilities (:class:`PredictionsWriter`)."""
    path = Path(path)
    probs = _as_written(np.asarray(probs, dtype=np.float64).reshape(len(ids), len(classes)))
    extra = dict(extra or {})
    ok = np.array([s == "ok" for s in extra["status"]] if "status" in extra else [True] * len(ids), dtype=bool)
    given = {name: None if a is None else _as_written(np.asarray(a, dtype=np.float64).reshape(probs.shape))
             for name, a in (("raw", raw), ("calibrated", calibrated))}
    differs = {name: a is not None and not np.array_equal(a[ok], probs[ok]) for name, a in given.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with PredictionsWriter(tmp, classes, decision, raw=differs["raw"], calibrated=differs["calibrated"],
                               extra=list(extra)) as writer:
            writer.write(ids, groups, labels, probs, raw=given["raw"], calibrated=given["calibrated"], extra=extra)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_predictions(path: str | Path, classes: list[str] | None = None) -> Predictions:
    """A predictions CSV written by :func:`write_predictions`: its ``ok`` rows (a row whose ``status`` column says
    otherwise, an input that could not be predicted, is left out).

    Raises:
        RunError: the file is missing or not such a CSV, its ``prob_`` columns differ from ``classes``, or a
            ``predicted`` value does not follow from its row and decision.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
            header = list(rows[0].keys()) if rows else []
    except OSError as exc:
        raise RunError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    found = [c[len("prob_"):] for c in header if c.startswith("prob_")]
    if not rows or not found or "decision" not in header:
        raise RunError(f"{path} is not a medvox predictions file of format {FORMAT_VERSION} (no rows, prob_ or "
                       "decision column): run the command that writes it again")
    if classes is not None and found != list(classes):
        raise RunError(f"{path}: probability columns {found} do not match the run's classes {list(classes)}")
    index = {c: i for i, c in enumerate(found)}
    ok = [r for r in rows if r.get("status", "ok") == "ok"]

    def matrix(prefix: str) -> np.ndarray | None:
        if f"{prefix}{found[0]}" not in header:
            return None
        return np.array([[float(r[f"{prefix}{c}"]) for c in found] for r in ok], dtype=np.float64).reshape(-1, len(found))

    cell = next((r["decision"] for r in rows if r.get("decision")), None)
    try:
        decision = Decision.from_cell(cell, found) if cell else Decision.argmax(found)
        probs = matrix("prob_")
    except ValueError as exc:
        raise RunError(f"{path}: {exc}") from None
    raw, calibrated = matrix("raw_prob_"), matrix("calibrated_prob_")
    if decision.probabilities == "raw" and raw is None:
        raw = probs
    if decision.probabilities == "calibrated" and calibrated is None:
        calibrated = probs
    labels = np.array([index.get(r.get("label", ""), -1) for r in ok], dtype=np.int64)
    wrong = [r["case_id"] for r, p in zip(ok, decision.labels(probs), strict=True) if r["predicted"] != p]
    if wrong:
        raise RunError(f"{path}: 'predicted' of {len(wrong)} row(s) (first: {wrong[0]}) does not follow from the "
                       f"row's probabilities and its decision ({decision.text()}): the file was edited")
    known = {"case_id", "patient_id", "label", "predicted", "decision"}
    extra = {c: [r[c] for r in ok] for c in header
             if c not in known and not c.startswith(("prob_", "raw_prob_", "calibrated_prob_"))}
    return Predictions([r["case_id"] for r in ok], [r.get("patient_id", "") for r in ok], labels, probs, found,
                       decision, raw, calibrated, extra)


# -- a lock on a folder ----------------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a folder for the whole time one process writes it.

    The lock file (created with ``O_EXCL``) names the holder's pid and host; a second writer is refused at
    once with them; a lock left by a dead process on this host is taken over.
    """

    def __init__(self, folder: str | Path, what: str = "run"):
        self.path = Path(folder) / LOCK
        self.what = what
        self._held = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_json(self.path) or {}
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return self  # this process holds it already (cv holds the run while a fold trains)
                if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)  # a dead writer's lock
                    continue
                raise RunError(f"{self.path.parent} is being written by another medvox process (pid "
                               f"{holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to finish, or "
                               f"write to another --output / --run-name. If no such process runs, delete {self.path}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self._held = True
            return self
        raise RunError(f"could not lock {self.path.parent}")

    def refuse_if_held(self) -> None:
        """Raise at once when another live process holds the lock (a command checks this before any work, and
        takes the lock itself only when it starts writing).

        Raises:
            RunError: naming the holder's pid and host.
        """
        holder = read_json(self.path)
        if not holder:
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            return
        if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
            return
        raise RunError(f"{self.path.parent} is being written by another medvox process (pid {holder.get('pid', '?')} "
                       f"on {holder.get('host', '?')}); wait for it to finish, or write to another --output / "
                       f"--run-name. If no such process runs, delete {self.path}")

    def __exit__(self, *exc) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


# -- the run -----------------------------------------------------------------------------------------------------
@dataclass
class Fold:
    """One fold folder of a run."""

    index: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def metrics(self) -> dict[str, Any] | None:
        return read_json(self.path / METRICS)

    @cached_property
    def calibration(self) -> dict[str, Any] | None:
        return read_json(self.path / CALIBRATION)

    @property
    def finished(self) -> bool:
        return bool(self.metrics and "final" in self.metrics)

    @property
    def final_weights(self) -> str | None:
        """The checkpoint file name the fold's final evaluation used (``metrics.json``)."""
        return ((self.metrics or {}).get("final") or {}).get("weights")

    def final_checkpoint(self) -> Path:
        """The fold's final checkpoint; never another one in its place.

        Raises:
            RunError: the fold is unfinished or the checkpoint its ``metrics.json`` names is missing.
        """
        name = self.final_weights
        if name is None:
            present = [n for n in (BEST_EMA, BEST) if (self.path / n).is_file()]
            if self.metrics is None and len(present) >= 1:
                return self.path / present[0]  # a fold folder holding only checkpoints (copied by hand)
            raise RunError(f"{self.path}: the fold has not finished (no final weights in {METRICS}); finish it with "
                           "`medvox cv` / `medvox train --resume`")
        if not (self.path / name).is_file():
            raise RunError(f"{self.path / name} is missing: it holds this fold's final weights ({METRICS}); another "
                           "checkpoint would give other probabilities under the run's decision. Restore it, or "
                           "retrain the fold")
        return self.path / name


class Run:
    """A run folder (``medvox cv``) or one fold folder (``medvox train``), opened read-only.

    Args:
        path: the folder.

    Raises:
        RunError: ``path`` is not a folder, or holds neither ``cv_summary.json`` nor a fold.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"{path}: no such run folder (give the folder `medvox cv` wrote, e.g. results/resnet50)")
        self.path = path
        self.name = path.name
        # a fold folder: its metrics.json, or (without fold_<k> folders inside) its config or final weights alone
        self.is_fold = (path / METRICS).is_file() or not self._fold_dirs() and any(
            (path / name).is_file() for name in (CONFIG, BEST_EMA, BEST))
        if not self.is_fold and not self._fold_dirs() and not (path / CV_SUMMARY).is_file():
            raise RunError(f"{path} is not a medvox run folder (no {CV_SUMMARY} and no fold_<k>/ folders): give the "
                           "folder `medvox cv` wrote, or one of its fold_<k> folders")
        self.summary = read_json(path / CV_SUMMARY) if not self.is_fold else None
        if self.summary is not None and self.summary.get("format_version") != FORMAT_VERSION:
            raise RunError(f"{path / CV_SUMMARY} is of format {self.summary.get('format_version')!r}, this medvox reads "
                           f"format {FORMAT_VERSION}: summarise the run again with `medvox cv` (finished folds are "
                           "not retrained)")

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """The run (or fold) folder ``path``; see :class:`Run`."""
        return cls(path)

    def _fold_dirs(self) -> list[Path]:
        dirs = [p for p in self.path.glob("fold_*") if p.is_dir() and _FOLD_RE.fullmatch(p.name)]
        return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))

    @cached_property
    def folds(self) -> list[Fold]:
        if self.is_fold:
            m = _FOLD_RE.fullmatch(self.path.name)
            return [Fold(int(m.group(1)) if m else 0, self.path)]
        return [Fold(int(d.name.split("_")[1]), d) for d in self._fold_dirs()]

    def _first(self, name: str) -> dict[str, Any]:
        return next((d for d in (read_json(f.path / name) for f in self.folds) if d is not None), {})

    @cached_property
    def config(self) -> dict[str, Any]:
        """The resolved config the run was trained with (its first fold's ``config.json``), as a dict."""
        return self._first(CONFIG)

    @cached_property
    def plan(self) -> dict[str, Any]:
        return self._first(PLAN)

    @cached_property
    def run_info(self) -> dict[str, Any]:
        return self._first(RUN_INFO)

    @cached_property
    def splits(self) -> dict[str, Any]:
        return self._first(SPLITS)

    @cached_property
    def classes(self) -> list[str]:
        if self.summary and self.summary.get("classes"):
            return list(self.summary["classes"])
        found = next((f.metrics["classes"] for f in self.folds if f.metrics and f.metrics.get("classes")), None)
        return list(found or self.plan.get("classes") or [])

    @property
    def finished(self) -> bool:
        """A cv run with its summary, or a fold that ran to its end."""
        return self.summary is not None if not self.is_fold else self.folds[0].finished

    @property
    def temperatures(self) -> list[float]:
        """One temperature per fold (1.0 where none was fitted)."""
        cal = (self.summary or {}).get("calibration") or [f.calibration for f in self.folds]
        return [float((c or {}).get("temperature") or 1.0) for c in cal]

    @property
    def decision(self) -> Decision:
        """The run's decision: a cv run's (chosen on its pooled calibrated out-of-fold predictions), a fold's
        (chosen on its validation set, moved through its temperature for calibrated probabilities), else the
        argmax with the reason."""
        if self.summary is not None:
            return Decision.from_json(self.summary["decision"])
        if self.is_fold:
            recorded = self.raw_decision
            if recorded is not None:
                return recorded.through_temperature(self.temperatures[0])
            return Decision.argmax(self.classes, f"{self.folds[0].path / METRICS} records no decision")
        return Decision.argmax(self.classes, f"{self.path} has no {CV_SUMMARY} (the cross-validation is unfinished)")

    @property
    def raw_decision(self) -> Decision | None:
        """The run's decision for uncalibrated probabilities, where it has one: a fold's (chosen on its raw
        validation probabilities), a cv run's when it was chosen on raw ones; else None."""
        if self.summary is not None:
            decision = Decision.from_json(self.summary["decision"])
            return decision if decision.probabilities == "raw" else None
        if self.is_fold:
            fold = self.folds[0]
            recorded = (((fold.metrics or {}).get("final") or {}).get("val") or {}).get("decision")
            return Decision.from_json(recorded) if recorded else None
        return None

    @cached_property
    def fusion(self) -> dict[str, Any] | None:
        """The descriptor model (``features/fusion.json`` with its fold models and grid), or None when the run is
        not fused or its weight is 0."""
        if self.is_fold or not (self.summary or {}).get("fusion"):
            return None
        folder = self.path / FEATURES
        doc = read_json(folder / FUSION)
        models = [read_json(p) for p in sorted(folder.glob("fold_*.json"))]
        if doc is None or not models or any(m is None for m in models):
            raise RunError(f"{folder}: the run is fused with a descriptor model ({CV_SUMMARY}) but its files are "
                           "missing or damaged; summarise the run again with `medvox cv`")
        if not doc.get("weight"):
            return None
        return {**doc, "weight": float(doc["weight"]), "models": models, "plan": read_json(folder / PLAN)}

    def members(self, allow_missing: bool = False) -> list[Path]:
        """The final checkpoint of every fold: the models the run's figures and decision come from.

        Raises:
            RunError: a fold is unfinished or its final checkpoint is missing (``allow_missing``: those folds are
                left out instead, :meth:`member_problems` says which; the caller must then not use the run's
                decision).
        """
        out, problems = self._member_check()
        if problems and not allow_missing:
            raise RunError(problems[0] + (f" ({len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))
        if not out:
            raise RunError(f"{self.path}: no fold has its final checkpoint")
        return out

    def member_problems(self) -> list[str]:
        """Why :meth:`members` lacks a fold's final checkpoint, one line per problem (empty: all are there)."""
        return self._member_check()[1]

    def _member_check(self) -> tuple[list[Path], list[str]]:
        out, problems = [], []
        for fold in self.folds:
            try:
                out.append(fold.final_checkpoint())
            except RunError as exc:
                problems.append(str(exc))
        recorded = (self.summary or {}).get("members")
        if recorded and len(self.folds) != len(recorded):
            problems.append(f"{self.path}: {CV_SUMMARY} names {len(recorded)} fold models, the folder holds "
                            f"{len(self.folds)} fold folders")
        return out, problems

    def oof(self) -> Predictions | None:
        """The pooled out-of-fold predictions (``oof_predictions.csv``), None before the summary."""
        path = self.path / OOF_PREDICTIONS
        return read_predictions(path, self.classes or None) if path.is_file() else None

    def test(self) -> Predictions | None:
        """The test ensemble's predictions (``test_predictions.csv``), None without a test set."""
        path = self.path / TEST_PREDICTIONS
        return read_predictions(path, self.classes or None) if path.is_file() else None

    def experiment_config(self):
        """The run's config as an :class:`~medvox.config.ExperimentConfig`.

        Raises:
            RunError: ``config.json`` is missing or does not describe a valid config.
        """
        from medvox.config import ConfigError, from_dict

        if not self.config:
            raise RunError(f"{self.path}: no readable {CONFIG} in its fold folders")
        try:
            return from_dict(self.config)
        except (ConfigError, TypeError, ValueError) as exc:
            raise RunError(f"{self.path}: {CONFIG} is not a medvox config ({exc})") from None

    @cached_property
    def fingerprint(self) -> dict[str, Any] | None:
        """The dataset fingerprint from the preprocessing cache (``<cache>/<data hash>/<plan hash>/``), if still
        there: the cache folder whose ``plan.json`` equals the run's plan holds the one it was made from."""
        from medvox.config import DataConfig
        from medvox.data.cache import cache_root

        data_hash = self.run_info.get("cache_dataset")
        if not data_hash or not self.plan:
            return None
        root = cache_root(DataConfig(cache_dir=(self.config.get("data") or {}).get("cache_dir")))
        for plan_file in sorted((root / str(data_hash)).glob(f"*/{PLAN}")):
            if read_json(plan_file) == self.plan:
                return read_json(plan_file.parent / "fingerprint.json")
        return None

    @cached_property
    def notes(self) -> list[str]:
        """What is missing or unusual, in words, for a page to show."""
        notes = []
        s = self.summary
        if s is None and not self.is_fold:
            notes.append(f"{CV_SUMMARY} is missing: the cross-validation has not finished.")
        fusion = (s or {}).get("fusion")
        if fusion:
            notes.append(f"Fused with a descriptor model (weight {fusion['weight']:.2f}, chosen on out-of-fold "
                         f"{fusion.get('criterion', 'AUC')}): the out-of-fold and test probabilities are the mixture.")
        if len(self.folds) == 1:
            notes.append("Only one fold: no spread over folds (standard deviation and CI need two or more).")
        ema = (self.config.get("train") or {}).get("ema_decay")
        weights = [f.final_weights for f in self.folds]
        if ema == 0 or (weights and all(w == BEST for w in weights)):
            notes.append("The final weights are the raw weights at their best epoch (best.pt), not the EMA's.")
        if s is not None and not s.get("test"):
            notes.append("No held-out test set: only cross-validation results.")
        for fold in self.folds:
            if fold.metrics is None:
                notes.append(f"{fold.name}: {METRICS} is missing (the fold did not start or was deleted).")
            elif fold.metrics.get("status") not in ("complete", "early_stopped"):
                notes.append(f"{fold.name}: status {fold.metrics.get('status')!r} (not finished).")
        return notes


def require_output_file(path: str | Path, what: str = "--out") -> Path:
    """An output file path checked before any work starts: not a folder, its folder creatable and writable (a
    file is created there and removed again; an existing file must be writable).

    Raises:
        DataError: naming the path and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder; give a file name, e.g. {path / 'predictions.csv'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot create its folder ({exc.strerror or exc})") from None
    try:
        with tempfile.NamedTemporaryFile(prefix=f".{path.name}.", suffix=".probe", dir=path.parent):
            pass
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot be written ({exc.strerror or exc}); give a path in a folder you "
                        "can write to") from None
    return path


def require_output_folder(path: str | Path, what: str = "--out") -> Path:
    """An output folder checked before any work starts, creating nothing: not an existing file, no file on its
    way, and writable (a probe file is made and removed in it, or in its nearest existing parent).

    Raises:
        DataError: naming the path and the fix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} {path} is a file, not a folder; give a folder name (e.g. {path.with_suffix('')}_out), "
                        "or move the file away")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{what} {path}: cannot be created, {existing} is a file; give a folder outside it")
    try:
        with tempfile.NamedTemporaryFile(prefix=".medvox.", suffix=".probe", dir=existing):
            pass
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot be written ({exc.strerror or exc} in {existing}); give a folder you "
                        "can write to") from None
    return path


__all__ = ["FORMAT_VERSION", "Fold", "Predictions", "PredictionsWriter", "Run", "RunError", "RunLock", "read_json",
           "PREDICT_COLUMNS", "join_warnings", "read_predictions", "require_output_file",
           "require_output_folder", "split_warnings", "write_json", "write_predictions"]
