"""The cross-validation summary: calibration, pooled out-of-fold predictions, the decision, fusion and the
test ensemble, and every figure the run reports.

Order of work (each step reads what the one before wrote, through :mod:`medvox.run`):

1. each fold's temperature, fitted on its validation predictions (``fold_<k>/calibration.json``);
2. the pooled out-of-fold predictions: raw, each fold's calibrated, and fused with the descriptor model
   where the run is; the final ones are those the decision is chosen on;
3. the decision (:class:`~medvox.metrics.decision.Decision`), chosen by ``threshold_rule`` on the final
   out-of-fold probabilities; ``oof_predictions.csv`` written with all three sets and the decision;
4. the test ensemble through :class:`~medvox.inference.predictor.Predictor`, ``test_predictions.csv``;
5. the figures: computed by :func:`figures_of` from the prediction files as read back, so
   ``cv_summary.json``, ``cv_table.md``, the report and ``medvox compare`` show one number for one thing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medvox import run as runfiles
from medvox.metrics.calibration import fit_calibration, rescale_folds
from medvox.metrics.classification import compute_metrics, to_jsonable
from medvox.metrics.decision import Decision
from medvox.run import Predictions, Run, read_json, read_predictions, write_json, write_predictions

SUMMARY_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "precision", "loss")
THRESHOLD_METRICS = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "precision")
# what each figure of cv_summary.json is, in words: the report and the table print these
FIGURES = {
    "cv": "each fold model on its validation cases, raw probabilities, at the argmax",
    "cv_at_decision": "each fold's validation cases in the pooled out-of-fold predictions, at the run's decision",
    "oof": "the pooled out-of-fold predictions the decision was chosen on, at the run's decision",
    "test": "the fold ensemble on the held-out test set, at the run's decision",
}


def bootstrap_ci(values: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap CI of the mean of ``values`` (resampling folds with replacement)."""
    vals = np.asarray([v for v in values if v is not None], dtype=float)
    if len(vals) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = vals[rng.integers(0, len(vals), size=(n_boot, len(vals)))].mean(axis=1)
    alpha = (1 - level) / 2
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))]


def fold_table(fold_metrics: list[dict]) -> dict[str, dict]:
    """Mean, standard deviation (ddof=1) and bootstrap 95 % CI of every metric over folds."""
    table = {}
    for name in SUMMARY_METRICS:
        values = [m.get(name) for m in fold_metrics]
        present = [v for v in values if v is not None]
        table[name] = {
            "per_fold": values,
            "mean": float(np.mean(present)) if present else None,
            "std": float(np.std(present, ddof=1)) if len(present) > 1 else None,
            "ci95": bootstrap_ci(present),
        }
    return table


def calibrate_fold(fold_dir: Path) -> dict[str, Any]:
    """Temperature scaling fitted on the fold's validation predictions (raw), written to ``calibration.json``."""
    val = read_predictions(Path(fold_dir) / runfiles.VAL_PREDICTIONS).labelled()
    doc = {**fit_calibration(val.labels, val.raw if val.raw is not None else val.probs), "fitted_on": "validation"}
    write_json(Path(fold_dir) / runfiles.CALIBRATION, doc)
    return doc


def pooled_oof(fold_dirs: list[Path], temperatures: list[float]) -> tuple[Predictions, np.ndarray, np.ndarray]:
    """Every fold's validation predictions in one set: ``(rows, folds (N,), calibrated (N, K))``; ``rows.raw``
    are the fold models' raw probabilities."""
    parts = [read_predictions(Path(d) / runfiles.VAL_PREDICTIONS).labelled() for d in fold_dirs]
    classes = parts[0].classes
    for d, p in zip(fold_dirs, parts, strict=True):
        if p.classes != classes:
            raise runfiles.RunError(f"{d}: classes {p.classes} differ from fold_0's {classes}")
    folds = np.concatenate([np.full(p.n, k) for k, p in enumerate(parts)])
    raw = np.concatenate([p.raw if p.raw is not None else p.probs for p in parts])
    rows = Predictions(sum((p.ids for p in parts), []), sum((p.groups for p in parts), []),
                       np.concatenate([p.labels for p in parts]), raw, classes, Decision.argmax(classes), raw=raw)
    return rows, folds, rescale_folds(raw, folds, temperatures)


def figures_of(preds: Predictions) -> dict[str, Any]:
    """The metrics of a predictions file at its own decision (AUC and loss do not depend on it): the one
    function behind every pooled out-of-fold and test figure medvox reports."""
    p = preds.labelled()
    return compute_metrics(p.labels, p.probs, threshold=p.decision.cut, class_names=p.classes)


def folds_at_decision(preds: Predictions) -> dict[str, dict]:
    """:func:`fold_table` of each fold's cases of the pooled out-of-fold predictions at their decision."""
    folds = preds.folds
    return fold_table([compute_metrics(preds.labels[folds == k], preds.probs[folds == k],
                                       threshold=preds.decision.cut, class_names=preds.classes)
                       for k in sorted(np.unique(folds))])


def test_ensemble(run_dir: Path, prepared, decision: Decision, tta: bool, fusion: dict[str, Any] | None = None,
                  device: Any = "cpu") -> dict[str, Any] | None:
    """The fold ensemble on the held-out test set (``test_predictions.csv``) and its variants' figures at the
    argmax: plain, with TTA, calibrated, fused; the final variant's figures at the run's decision come from
    the file (:func:`figures_of`)."""
    from medvox.inference.models import load_model
    from medvox.inference.predictor import Predictor

    order = np.sort(np.asarray(prepared.test_idx, dtype=np.int64))
    if len(order) == 0:
        return None
    run = Run(run_dir)
    models = [load_model(p, device) for p in run.members()]
    labels, images = prepared.labels[order], prepared.images[order]
    classes = list(prepared.classes)
    variants: dict[str, Any] = {}
    final = None
    for use_tta in ((False, True) if tta else (False,)):
        predictor = Predictor(run, models, decision, tta=use_tta, fusion=fusion)
        pred = predictor.predict_preprocessed(images, feature_probs=(fusion or {}).get("test_features"))
        suffix = "_tta" if use_tta else ""
        variants[f"ensemble{suffix}"] = compute_metrics(labels, pred.raw, class_names=classes)
        variants[f"ensemble{suffix}_calibrated"] = compute_metrics(labels, pred.calibrated, class_names=classes)
        final = pred
    if final.fused is not None:
        variants["fused"] = compute_metrics(labels, final.fused, class_names=classes)
    cases = [prepared.cases[i] for i in order]
    path = write_predictions(run_dir / runfiles.TEST_PREDICTIONS, [c.id for c in cases], [c.group for c in cases],
                             labels, final.probs, classes, decision, raw=final.raw, calibrated=final.calibrated,
                             extra={"spread": [f"{s:.6f}" for s in final.spread]})
    name = "fused" if final.fused is not None else f"ensemble{'_tta' if tta else ''}_calibrated"
    return {"n": len(order), "tta": tta, "members": [str(m.path) for m in models], **variants, "final": name,
            "final_at_threshold": figures_of(read_predictions(path, classes)),
            "per_fold": [compute_metrics(labels, p, class_names=classes) for p in final.per_member]}


def summarize(run_dir: Path, fold_dirs: list[Path], prepared=None, tta: bool = True,
              threshold_rule: str = "youden", feature_fusion: bool = False, seed: int = 0,
              progress: bool = True, features_from=None, device: Any = "cpu",
              timing: Callable[[], dict] | None = None) -> dict[str, Any]:
    """Write ``cv_summary.json``, ``oof_predictions.csv`` and (with a test set) ``test_predictions.csv`` of a
    finished cross-validation; returns the summary.

    Args:
        run_dir: the run folder; ``fold_dirs``: its finished folds, in order.
        prepared: the run's :class:`~medvox.data.Prepared` data (None: no test ensemble, no fusion).
        tta: score the test ensemble with test-time augmentation too (the final variant then uses it).
        threshold_rule: the rule the decision is chosen by on the final pooled out-of-fold probabilities.
        feature_fusion: mix a descriptor model into the calibrated probabilities, at the weight chosen on the
            pooled out-of-fold predictions (:mod:`medvox.descriptors`); ``features_from``: the cases on the
            descriptors' grid (None: ``prepared``).
        device: where the test ensemble runs.
        timing: called last, just before the file is written: the run's ``time`` record (the recipe's forecast
            and the minutes the run took, :func:`medvox.cv.crossval.cross_validate`).
    """
    run_dir = Path(run_dir)
    (run_dir / runfiles.CV_SUMMARY).unlink(missing_ok=True)  # being recomputed: never read half-old
    folds = [read_json(Path(d) / runfiles.METRICS) for d in fold_dirs]
    calibration = [calibrate_fold(d) for d in fold_dirs]
    rows, fold_of, calibrated = pooled_oof(fold_dirs, [c["temperature"] for c in calibration])
    classes = rows.classes
    final, probabilities, fusion = calibrated, "calibrated", None
    shutil.rmtree(run_dir / runfiles.FEATURES, ignore_errors=True)  # a former fusion must not be read as this one
    if feature_fusion and prepared is not None:
        from medvox.descriptors import fit_fusion

        fusion = fit_fusion(run_dir, prepared, rows.ids, fold_of, rows.labels, calibrated, progress=progress,
                            seed=seed, features_from=features_from)
        final, probabilities = fusion["oof"], "fused"
    fitted_on = ("the pooled out-of-fold predictions, each fold's calibrated"
                 + (", mixed with the descriptor model" if fusion else ""))
    decision = Decision.fit(rows.labels, final, classes, rule=threshold_rule, probabilities=probabilities,
                            fitted_on=fitted_on)
    oof_path = write_predictions(run_dir / runfiles.OOF_PREDICTIONS, rows.ids, rows.groups, rows.labels, final,
                                 classes, decision, raw=rows.raw, calibrated=calibrated,
                                 extra={"fold": [str(int(k)) for k in fold_of]})
    oof = read_predictions(oof_path, classes)
    summary = {
        "format_version": runfiles.FORMAT_VERSION,
        "model": folds[0]["model"], "folds": len(folds), "classes": classes, "monitor": folds[0]["monitor"],
        "members": [str(Path(d).name + "/" + f["final"]["weights"]) for d, f in zip(fold_dirs, folds, strict=True)],
        "fold_final_weights": [f["final"]["weights"] for f in folds],
        "figures": FIGURES, "probabilities": probabilities,
        "decision": decision.to_json(),
        "calibration": calibration,
        "cv": fold_table([f["final"]["val"] for f in folds]),
        "cv_at_decision": folds_at_decision(oof),
        "oof": figures_of(oof),
    }
    if fusion is not None:
        summary["fusion"] = {k: fusion[k] for k in ("weight", "criterion", "chosen_on", "model", "oof_auc",
                                                    "oof_log_loss", "n_features", "grid")}
    summary["test"] = test_ensemble(run_dir, prepared, decision, tta, fusion, device) if prepared is not None else None
    if timing is not None:
        summary["time"] = timing()
    write_json(run_dir / runfiles.CV_SUMMARY, summary)
    return to_jsonable(summary)


def format_table(summary: dict) -> str:
    """A Markdown table: metric, folds mean +- std [95 % CI], pooled OOF, test ensemble, all at the run's
    decision (AUC and loss do not depend on it), with a line saying which decision and which probabilities."""
    decision = Decision.from_json(summary["decision"])
    test = (summary.get("test") or {}).get("final_at_threshold") or {}
    oof, at_decision = summary["oof"], summary.get("cv_at_decision") or {}
    lines = ["| metric | folds mean +- std [95 % CI] | pooled OOF | test ensemble |", "| --- | --- | --- | --- |"]
    for name, row in summary["cv"].items():
        if name in THRESHOLD_METRICS and at_decision.get(name):
            row = at_decision[name]
        if row["mean"] is None:
            continue
        ci = row["ci95"]
        cell = f"{row['mean']:.3f} +- {row['std'] or 0:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        ov, tv = oof.get(name), test.get(name)
        lines.append(f"| {name} | {cell} | {'' if ov is None else f'{ov:.3f}'} | {'' if tv is None else f'{tv:.3f}'} |")
    lines.append(f"\nAt the run's decision: {decision.describe()}. The folds column's AUC and loss are each fold "
                 "model's on its validation cases; its other metrics are those cases in the pooled out-of-fold "
                 "predictions at the decision (each fold model at the argmax: `cv` in cv_summary.json).")
    fusion = summary.get("fusion")
    if fusion:
        from medvox.descriptors import fusion_scores

        lines.append(f"\nOOF and test ensemble include the descriptor model at weight {fusion['weight']:.2f} (chosen on "
                     f"the pooled OOF {fusion_scores(fusion, features='descriptors')}).")
    return "\n".join(lines)
