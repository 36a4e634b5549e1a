"""``medvox predict``: a run folder (or checkpoints) + new inputs -> ``predictions.csv``.

The preprocessing is rebuilt from the plan stored in the checkpoints, so the inputs are treated exactly
as the training data was. Cases are read and predicted a few at a time (memory stays flat over
thousands of inputs); an unreadable input is reported and the others are still predicted.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medvox.config import DataConfig
from medvox.errors import DataError

log = logging.getLogger("medvox")


def _cases(inputs: list[str], data_cfg: DataConfig | None):
    """Cases from a manifest (labels optional) or from image files / folders of images."""
    from medvox.data import cases_from_paths, load_source

    if len(inputs) == 1 and Path(inputs[0]).suffix.lower() in (".csv", ".tsv", ".npz"):
        cfg = data_cfg or DataConfig()
        cfg = DataConfig(**{**cfg.__dict__, "path": inputs[0]})
        return load_source(cfg, require_labels=False).cases
    return cases_from_paths(inputs)


def _check_plans(models) -> dict[str, Any]:
    plan = models[0].plan
    for m in models[1:]:
        if m.plan != plan:
            raise DataError(f"the checkpoints were trained with different preprocessing plans ({models[0].path} vs "
                            f"{m.path}); predict with one run at a time")
    return plan


def run_decision(checkpoints: list[str], models, calibrated: bool = True) -> dict[str, Any]:
    """The decision rule the run itself reported, to apply to its predictions: ``{"rule", "threshold", "from"}``,
    with ``class_weights`` for more than two classes (``threshold`` None and no weights: the argmax;
    :func:`~medvox.metrics.classification.decision_cut` gives what :func:`~medvox.metrics.classification.decide` takes).

    * a ``medvox cv`` run folder: the threshold (two classes) or class weights (more) chosen on its pooled,
      calibrated out-of-fold predictions (``cv_summary.json``'s ``decision``), the one its test metrics are
      given at;
    * one fold folder (``medvox train``): the threshold or class weights chosen on its validation set
      (``metrics.json``), moved through the fold's temperature when the probabilities are calibrated (the same
      cut on the same model);
    * otherwise (checkpoint files, several folders, or a cv decision
      with ``--uncalibrated``, whose probabilities it was not chosen on): the argmax, with the reason in ``from``.
    """
    from medvox.metrics.classification import decision_cut, decision_fields
    from medvox.run import read_json

    def argmax(why: str) -> dict[str, Any]:
        return {"rule": "argmax", "threshold": None, "from": why}

    folder = Path(checkpoints[0])
    if len(checkpoints) != 1 or not folder.is_dir():
        return argmax("checkpoint files or several runs: no decision threshold recorded for them")
    summary = read_json(folder / "cv_summary.json")
    if summary is not None:
        decision = summary.get("decision")
        if decision_cut(decision) is None:
            return argmax(f"{folder / 'cv_summary.json'} has no decision threshold")
        if not calibrated:
            return argmax("--uncalibrated: the run's decision was chosen on calibrated probabilities")
        return {"rule": decision["rule"], **decision_fields(decision_cut(decision)),
                "from": f"{folder / 'cv_summary.json'} (pooled out-of-fold predictions, per-fold calibrated)"}
    metrics = read_json(folder / "metrics.json") or {}
    threshold = decision_cut(((metrics.get("final") or {}).get("val") or {}).get("at_val_threshold"))
    if threshold is None or len(models) != 1:
        return argmax(f"{folder} records no decision threshold (no cv_summary.json, no validation threshold)")
    temperature = models[0].temperature if calibrated else 1.0
    moved = (_through_temperature(float(threshold), temperature) if np.ndim(threshold) == 0 else
             _weights_through_temperature(threshold, temperature))
    return {"rule": (read_json(folder / "config.json") or {}).get("train", {}).get("threshold_rule", "youden"),
            **decision_fields(moved), "from": f"{folder / 'metrics.json'} (the fold's validation set)"
                             + (f", temperature {temperature:.3g}" if temperature != 1.0 else "")}


def _through_temperature(threshold: float, temperature: float) -> float:
    """The cut ``p1 >= threshold`` on raw probabilities, on the same model's probabilities at ``temperature``.

    Example:
        >>> _through_temperature(0.3, 1.0), round(_through_temperature(0.3, 2.0), 4)
        (0.3, 0.3956)
    """
    from medvox.cv.summary import rescale

    if temperature == 1.0 or threshold in (0.0, 1.0):
        return threshold
    return float(rescale(np.array([[1.0 - threshold, threshold]]), temperature)[0, 1])


def _weights_through_temperature(weights: list[float], temperature: float) -> list[float]:
    """Class weights chosen on raw probabilities, for the same model's probabilities at ``temperature``:
    ``argmax(w * softmax(z)) = argmax(z + log w) = argmax(w ** (1 / T) * softmax(z / T))``.

    Example:
        >>> _weights_through_temperature([0.5, 2.0], 2.0)
        [0.7071067811865476, 1.4142135623730951]
    """
    return [float(w) ** (1.0 / temperature) for w in weights]


def predict_cases(checkpoints: list[str], inputs: list[str], out: str | Path, *, tta: bool = False,
                  calibrated: bool = True, batch_size: int = 8, data_cfg: DataConfig | None = None,
                  progress: bool = True, argmax: bool = False, gpu: bool = False) -> dict[str, Any]:
    """Predict every input; write ``out`` (CSV) and return counts and the failures (on the GPU with ``gpu``).

    Columns: case_id, source, label (when known), prob_<class>..., predicted, spread (standard deviation
    over the ensemble members of the predicted class's probability), status, error.

    ``predicted`` follows the run's own decision (:func:`run_decision`): for a ``medvox cv`` run, the threshold
    (two classes) or class weights (more) chosen on its out-of-fold predictions, the decision its reported
    metrics are at (the argmax of an imbalanced task's models often names the majority class for every case). ``argmax=True`` ignores it.
    The returned summary (and the ``.json`` beside ``out``) records the decision used.

    A single run folder fused with a feature model by ``medvox cv`` (``features/fusion.json``) predicts the
    same mixture as its test ensemble (calibrated probabilities only; ``spread`` stays the CNN members'); its
    descriptors are computed on the grid they were fitted on (``features/plan.json`` when that is not the
    CNN's).
    """
    from medvox.data import preprocess_case
    from medvox.data.inspection import progress_bar
    from medvox.descriptors import fuse_probs, load_fusion
    from medvox.inference.models import ensemble_predict, find_checkpoints, inference_device, load_model
    from medvox.metrics.classification import decision_cut, decision_text

    device = inference_device(gpu)
    models = [load_model(p, device) for p in find_checkpoints(checkpoints)]
    plan, classes = _check_plans(models), models[0].classes
    fusion = None
    if calibrated and len(checkpoints) == 1 and Path(checkpoints[0]).is_dir():
        fusion = load_fusion(Path(checkpoints[0]))
    decision = {"rule": "argmax", "threshold": None, "from": "--argmax"} if argmax else \
        run_decision(checkpoints, models, calibrated)
    cut = decision_cut(decision)
    if cut is not None:
        log.info("predicted: %s (the %s decision of %s)", decision_text(cut, classes), decision["rule"],
                 decision["from"])
    cases = _cases(inputs, data_cfg)
    if not cases:
        raise DataError(f"no input images found in {', '.join(inputs)} (NIfTI .nii/.nii.gz, DICOM folders, .npy)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failures: list[dict[str, str]] = []
    n_ok = 0
    feature_plan = fusion.get("plan") if fusion else None
    with open(out, "w", newline="", encoding="utf-8") as fh, progress_bar(progress) as bar:
        task = bar.add_task("predict", total=len(cases))
        writer = csv.writer(fh)
        writer.writerow(["case_id", "source", "label", *[f"prob_{c}" for c in classes], "predicted", "spread",
                         "status", "error"])
        for start in range(0, len(cases), batch_size):
            chunk, arrays, feature_arrays = [], [], []
            for case in cases[start:start + batch_size]:
                try:
                    volume = preprocess_case(case, plan)
                    if feature_plan is not None:
                        feature_arrays.append(preprocess_case(case, feature_plan))
                    arrays.append(volume)
                    chunk.append(case)
                except Exception as exc:  # one bad input must not stop the others
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    failures.append({"case_id": case.id, "source": case.file, "error": reason})
                    writer.writerow([case.id, case.file, "", *[""] * len(classes), "", "", "error", reason])
            if chunk:
                volumes = np.stack(arrays)
                mean, per = ensemble_predict(models, volumes, tta=tta, calibrated=calibrated, batch_size=batch_size)
                if fusion is not None:
                    mean = fuse_probs(fusion, mean, np.stack(feature_arrays) if feature_plan is not None else volumes)
                _write_rows(writer, chunk, classes, mean, per, cut)
                n_ok += len(chunk)
            fh.flush()
            bar.advance(task, len(cases[start:start + batch_size]))
    if failures:  # each one is in the result (and the CSV/JSON); `medvox predict` lists them once on stderr
        log.warning("could not predict %d input(s); see %s", len(failures), out.with_suffix(".json"))
    summary = {"predicted": n_ok, "failed": len(failures), "failures": failures, "output": str(out),
               "models": [str(m.path) for m in models], "tta": tta, "calibrated": calibrated,
               "feature_fusion_weight": fusion["weight"] if fusion else None, "decision": decision}
    (out.with_suffix(".json")).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _write_rows(writer, cases, classes: list[str], mean: np.ndarray, per: np.ndarray,
                threshold: float | None) -> None:
    from medvox.metrics.classification import decide

    pred = decide(mean, threshold)
    spread = per[:, np.arange(len(pred)), pred].std(0)
    for i, case in enumerate(cases):
        # the label index refers to the input manifest's classes; its text is what names the model's class
        label = str(case.meta.get("label_text", "")) if case.label is not None else ""
        writer.writerow([case.id, case.file, label, *[f"{p:.8g}" for p in mean[i]], classes[pred[i]],
                         f"{spread[i]:.6f}", "ok", ""])
