"""``medvox predict``: a run folder (or a fold folder, or one checkpoint) + new inputs -> ``predictions.csv``.

The work is :class:`~medvox.inference.predictor.Predictor`'s: the preprocessing is rebuilt from the plan
stored in the checkpoints, so the inputs are treated exactly as the training data was, and the run's own
decision labels them. This module reads the inputs (image files, folders, or a manifest), writes the CSV
in the run folder's predictions format (:class:`medvox.run.PredictionsWriter`, flushed after every chunk
of inputs: raw, calibrated and final probabilities, the decision cell, and ``source``, ``spread``,
``status``, ``error``, ``warnings``; an input that could not be read, or that ``medvox check`` refuses, keeps
its row with status ``error``), and the ``.json`` beside it with :func:`medvox.run.write_json`. A case outside
the training cases' range (:func:`medvox.data.fingerprint.range_warnings`) or with check's warnings is
predicted, and its warnings are in its row, in the JSON and on the log (one line per case, at most
``SHOWN_WARNINGS`` cases, then a count).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medvox.config import DataConfig
from medvox.data import cases_from_paths, load_source
from medvox.data.fingerprint import RANGE_TOLERANCE
from medvox.errors import DataError
from medvox.inference.models import inference_device
from medvox.inference.predictor import CaseResult, Predictor
from medvox.run import (
    FORMAT_VERSION,
    PREDICT_COLUMNS,
    PredictionsWriter,
    join_warnings,
    require_output_file,
    write_json,
)

log = logging.getLogger("medvox")

SHOWN_WARNINGS = 10  # cases whose warnings are logged one by one; the rest are counted


def _cases(inputs: list[str], data_cfg: DataConfig | None):
    """Cases from a manifest (labels optional) or from image files / folders of images."""
    if len(inputs) == 1 and Path(inputs[0]).suffix.lower() in (".csv", ".tsv", ".npz"):
        cfg = data_cfg or DataConfig()
        cfg = DataConfig(**{**cfg.__dict__, "path": inputs[0]})
        return load_source(cfg, require_labels=False).cases
    return cases_from_paths(inputs)


def predict_cases(run: str | Path, inputs: list[str], out: str | Path, *, tta: bool = False,
                  calibrated: bool = True, batch_size: int = 8, data_cfg: DataConfig | None = None,
                  progress: bool = True, argmax: bool = False, gpu: bool = False,
                  allow_missing: bool = False) -> dict[str, Any]:
    """Predict every input with the run ``run``; write ``out`` (CSV) and ``out.json``; return that record.

    Args:
        run: a ``medvox cv`` run folder, a fold folder, or a ``.pt`` checkpoint (decided by the argmax).
        inputs: NIfTI / DICOM / ``.npy`` files, folders of them, or one manifest (CSV/TSV/``.npz``).
        out: the CSV; checked (not a folder, writable) before any model is loaded.
        tta, calibrated, argmax, allow_missing: as :meth:`Predictor.from_run` takes them.
        gpu: predict on the first visible GPU (the CPU when there is none).

    The CSV's ``prob_`` columns are the probabilities the decision applies to (calibrated, or fused for a run
    with a descriptor model), ``predicted`` follows from them and the row's ``decision`` cell; ``spread`` is the
    members' standard deviation of the predicted class's probability. The JSON records the decision
    (:meth:`~medvox.metrics.decision.Decision.to_json`), the members and whether all the run's members were
    there, the failures, and the warnings (``warned``: ``case_id``, ``source``, ``warnings``), the training
    range compared with (``input_range``, None for a run from before it) and its ``range_tolerance``.

    Raises:
        DataError: ``out`` is a folder or cannot be written, or no input image was found.
        RunError: the run is not a finished run / fold, or a fold's final checkpoint is missing (unless
            ``allow_missing``).
    """
    out = require_output_file(out)
    record_path = out.with_suffix(".json")
    if record_path == out:
        raise DataError(f"--out {out}: the predictions CSV and its JSON record would be the same file; give a .csv "
                        "name")
    predictor = Predictor.from_run(run, tta=tta, device=inference_device(gpu), calibrated=calibrated, argmax=argmax,
                                   allow_missing=allow_missing, batch_size=batch_size)
    cases = _cases(inputs, data_cfg)
    if not cases:
        raise DataError(f"no input images found in {', '.join(inputs)} (NIfTI .nii/.nii.gz, DICOM folders, .npy)")
    results: list[CaseResult] = []
    final = predictor.decision.probabilities
    with PredictionsWriter(out, predictor.classes, predictor.decision, raw=final != "raw",
                           calibrated=final != "calibrated", extra=PREDICT_COLUMNS) as writer:
        for chunk in predictor.iter_cases(cases, batch_size, progress):
            _write_rows(writer, predictor, chunk)
            _log_warnings(chunk, sum(1 for r in results if r.warnings))
            results.extend(chunk)
    failures = [{"case_id": r.case.id, "source": r.case.file, "error": r.error} for r in results if not r.ok]
    if failures:  # each one is in the CSV and the JSON; `medvox predict` lists them once on stderr
        log.warning("could not predict %d input(s); see %s", len(failures), record_path)
    warned = [{"case_id": r.case.id, "source": r.case.file, "warnings": r.warnings} for r in results if r.warnings]
    if len(warned) > SHOWN_WARNINGS:
        log.warning("... %d more case(s) with warnings (%d in all): see the 'warnings' column of %s",
                    len(warned) - SHOWN_WARNINGS, len(warned), out)
    if predictor.input_range is None:
        log.info("%s records no training input range (trained by an older medvox): spacing, shape and "
                    "intensity are not compared with the training cases", predictor.source)
    record = {"format_version": FORMAT_VERSION, "predicted": len(results) - len(failures), "failed": len(failures),
              "failures": failures, "output": str(out), "source": str(predictor.source),
              "members": [str(p) for p in predictor.members], "all_members_present": predictor.complete,
              "missing_members": predictor.missing, "tta": tta, "calibrated": calibrated,
              "temperatures": predictor.temperatures,
              "feature_fusion_weight": predictor.fusion["weight"] if predictor.fusion else None,
              "decision": predictor.decision.to_json(), "warned": warned, "input_range": predictor.input_range,
              "range_tolerance": RANGE_TOLERANCE}
    write_json(record_path, record)
    return record


def _write_rows(writer: PredictionsWriter, predictor: Predictor, chunk: list[CaseResult]) -> None:
    k = len(predictor.classes)
    nan = np.full((1, k), np.nan)  # a failed input's row: its cells stay empty

    def stack(name: str) -> np.ndarray:
        return np.concatenate([getattr(r.prediction, name) if r.ok else nan for r in chunk])

    index = {c: i for i, c in enumerate(predictor.classes)}
    # a manifest's label is matched to the model's classes by its text (its index is the manifest's own)
    labels = np.array([index.get(str(r.case.meta.get("label_text", "")), -1) if r.case.label is not None else -1
                       for r in chunk], dtype=np.int64)
    writer.write([r.case.id for r in chunk], [r.case.group for r in chunk], labels, stack("probs"),
                 raw=stack("raw"), calibrated=stack("calibrated"),
                 extra={"source": [r.case.file for r in chunk],
                        "spread": [f"{r.prediction.spread[0]:.6f}" if r.ok else "" for r in chunk],
                        "status": ["ok" if r.ok else "error" for r in chunk],
                        "error": [r.error or "" for r in chunk],
                        "warnings": [join_warnings(r.warnings) for r in chunk]})


def _log_warnings(chunk: list[CaseResult], before: int) -> None:
    """One line per warned case, for the first ``SHOWN_WARNINGS`` of the run (``before``: warned so far)."""
    for r in chunk:
        if r.warnings and before < SHOWN_WARNINGS:
            log.warning("warning: %s (%s): %s", r.case.id, r.case.file, join_warnings(r.warnings))
        before += bool(r.warnings)
