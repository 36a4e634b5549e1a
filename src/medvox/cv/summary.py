"""Cross-validation summary: per-fold statistics with bootstrap CIs, pooled out-of-fold predictions,
per-fold temperature calibration, and the fold ensemble (with TTA) on the held-out test set."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from medvox.engine.artifacts import write_json, write_predictions
from medvox.metrics.classification import compute_metrics, decision_cut, to_jsonable

T_BOUNDS = (0.05, 20.0)
SUMMARY_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "precision", "loss")
THRESHOLD_METRICS = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "precision")


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


def read_predictions(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a predictions CSV and its class names (from the ``prob_<class>`` columns)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    classes = [c[len("prob_"):] for c in (rows[0].keys() if rows else []) if c.startswith("prob_")]
    return rows, classes


def _labels_probs(rows: list[dict], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows], dtype=np.float64)
    return labels, probs


def load_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[dict]]:
    """(labels, probabilities, class names, rows) of a predictions CSV."""
    rows, classes = read_predictions(path)
    labels, probs = _labels_probs(rows, classes)
    return labels, probs, classes, rows


def rescale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities after temperature scaling: softmax(log p / T) (log-probabilities are valid logits)."""
    from medvox.metrics.calibration import apply_temperature

    z = apply_temperature(np.log(np.clip(probs, 1e-12, 1.0)), temperature)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fit_fold_calibration(fold_dir: Path) -> dict[str, Any]:
    """Temperature scaling fitted on the fold's validation predictions; written to calibration.json.

    Log-probabilities are valid logits (softmax is shift-invariant), so the saved probabilities suffice.
    """
    from medvox.metrics.calibration import brier_score, expected_calibration_error, fit_temperature

    labels, probs, _, _ = load_predictions(fold_dir / "val_predictions.csv")
    logits = np.log(np.clip(probs, 1e-12, 1.0))
    fitted = float(fit_temperature(logits, labels))
    # A near-useless model (early epochs) drives T towards infinity: every probability ~1/K and, written
    # to CSV, the ranking is lost. Bounded T keeps the ranking; the bound is recorded.
    t = min(max(fitted, T_BOUNDS[0]), T_BOUNDS[1])
    after = rescale(probs, t)
    doc = {"temperature": t, "fitted_temperature": fitted, "bounds": list(T_BOUNDS), "fitted_on": "validation",
           "n": len(labels),
           "ece_before": expected_calibration_error(labels, probs), "ece_after": expected_calibration_error(labels, after),
           "brier_before": brier_score(labels, probs), "brier_after": brier_score(labels, after)}
    write_json(doc, fold_dir / "calibration.json")
    return doc


def write_oof(run_dir: Path, fold_dirs: list[Path]) -> tuple[dict, np.ndarray, np.ndarray, list[str]]:
    """Concatenate every fold's validation predictions into ``oof_predictions.csv``; pooled metrics."""
    all_rows, classes = [], []
    for k, fold_dir in enumerate(fold_dirs):
        rows, classes = read_predictions(fold_dir / "val_predictions.csv")
        for r in rows:
            r["fold"] = str(k)
        all_rows += rows
    with open(run_dir / "oof_predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(all_rows[0].keys()))
        writer.writeheader()
        writer.writerows(all_rows)
    labels, probs = _labels_probs(all_rows, classes)
    return compute_metrics(labels, probs, class_names=classes), labels, probs, classes


def fuse_oof(run_dir: Path, prepared, labels: np.ndarray, probs: np.ndarray, progress: bool = True,
             seed: int = 0, features_from=None) -> dict[str, Any]:
    """:func:`~medvox.descriptors.fit_fusion` on the run's pooled OOF cases (ids and folds from
    ``oof_predictions.csv``, whose rows it keeps as ``oof_rows``); ``labels``, ``probs``: the calibrated OOF;
    ``features_from``: the dataset on the descriptors' grid (None: ``prepared``)."""
    from medvox.descriptors import fit_fusion

    rows, _ = read_predictions(run_dir / "oof_predictions.csv")
    fusion = fit_fusion(run_dir, prepared, [r["case_id"] for r in rows], np.array([int(r["fold"]) for r in rows]),
                        labels, probs, progress=progress, seed=seed, features_from=features_from)
    return {**fusion, "oof_rows": rows}


def fuse_test(test: dict[str, Any], labels: np.ndarray, probs: np.ndarray, fusion: dict[str, Any],
              classes: list[str]) -> np.ndarray:
    """Mix the test ensemble's ``probs`` with the feature model's at the fusion weight; records the variant
    ``fused`` (now ``final``) in ``test``; returns the mixture."""
    w = fusion["weight"]
    fused = (1 - w) * probs + w * fusion["test_features"]
    test["fused"] = compute_metrics(labels, fused, class_names=classes)
    test["final"], test["fusion_weight"] = "fused", w
    return fused


def record_fusion(run_dir: Path, summary: dict[str, Any], fusion: dict[str, Any], labels: np.ndarray,
                  classes: list[str], threshold: float | list[float] | None = None) -> None:
    """``fusion`` and ``oof_fused`` in the summary, and ``oof_fused_predictions.csv`` (its ``predicted`` at the
    run's OOF-chosen ``threshold`` when there is one)."""
    summary["fusion"] = {k: fusion[k] for k in ("weight", "criterion", "chosen_on", "model", "oof_auc", "oof_log_loss",
                                                "n_features", "grid")}
    summary["oof_fused"] = compute_metrics(labels, fusion["oof"], class_names=classes)
    write_fused_oof(run_dir, fusion["oof_rows"], fusion["oof"], classes, threshold)


def write_fused_oof(run_dir: Path, rows: list[dict], probs: np.ndarray, classes: list[str],
                    threshold: float | list[float] | None = None) -> Path:
    """``oof_fused_predictions.csv``: the rows of ``oof_predictions.csv`` with the final (calibrated, fused)
    probabilities, which ``medvox compare`` and ``medvox report`` then use for the run, and ``predicted`` at
    ``threshold`` (binary; class weights for more classes; None: the argmax)."""
    from medvox.metrics.classification import decide

    rows = [dict(r) for r in rows]
    for r, p, k in zip(rows, probs, decide(probs, threshold), strict=True):
        r.update({f"prob_{c}": f"{v:.8g}" for c, v in zip(classes, p, strict=True)})
        r["predicted"] = classes[int(k)]
    path = run_dir / "oof_fused_predictions.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return path


def final_oof(run_dir: Path, summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The pooled OOF (labels, probabilities) the decision threshold rests on: per-fold calibrated, and mixed
    with the feature model where the run was fused; read the way ``medvox compare`` reads them
    (:func:`~medvox.run.read_final_oof`)."""
    from medvox.run import read_final_oof

    if not summary.get("calibration"):
        raise ValueError(f"{run_dir}: cv_summary.json has no calibration (an unfinished cross-validation)")
    oof = read_final_oof(run_dir, summary, summary.get("classes"))
    if oof is None:
        raise FileNotFoundError(f"{run_dir}: no oof_predictions.csv")
    return oof.labels, oof.probs


def calibrated_oof(run_dir: Path, calibration: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled out-of-fold (labels, probabilities), each fold's rescaled by its own temperature, so that the
    folds' scores are on one scale (raw fold models are not: pooled raw OOF AUC is below the fold mean)."""
    labels, probs, _, rows = load_predictions(run_dir / "oof_predictions.csv")
    return labels, rescale_folds(probs, np.array([int(r["fold"]) for r in rows]), calibration)


def rescale_folds(probs: np.ndarray, folds: np.ndarray, calibration: list[dict]) -> np.ndarray:
    """``probs`` with the rows of fold ``k`` (``folds == k``) rescaled by ``calibration[k]``'s temperature."""
    out = probs.copy()
    for k, cal in enumerate(calibration):
        out[folds == k] = rescale(probs[folds == k], cal["temperature"])
    return out


def oof_decision(labels: np.ndarray, probs: np.ndarray, rule: str) -> dict[str, Any] | None:
    """The decision chosen on calibrated OOF predictions: a threshold on ``p1`` for two classes
    (:func:`~medvox.metrics.classification.best_threshold`), class weights for more
    (:func:`~medvox.metrics.classification.best_class_weights`); None when the OOF labels hold one class."""
    from medvox.metrics.classification import best_cut, decision_fields

    if len(np.unique(labels)) < 2:
        return None
    cut = best_cut(labels, probs, rule=rule)
    return {"rule": rule, **decision_fields(cut), "fitted_on": "pooled out-of-fold predictions, per-fold calibrated",
            "oof": compute_metrics(labels, probs, threshold=cut)}


def folds_at_decision(run_dir: Path, labels: np.ndarray, probs: np.ndarray, cut: float | list[float]) -> dict:
    """:func:`fold_table` of each fold's validation cases at the run's decision: the final OOF probabilities
    (per-fold calibrated, fused where the run is) the decision was chosen on, split by fold. The fold models'
    own figures (``cv``) are at the argmax, where an imbalanced task's models often predict the majority class
    only; these are what the pooled OOF figures at the decision are made of."""
    _, _, _, rows = load_predictions(run_dir / "oof_predictions.csv")
    folds = np.array([int(r["fold"]) for r in rows])
    return fold_table([compute_metrics(labels[folds == k], probs[folds == k], threshold=cut)
                       for k in sorted(np.unique(folds))])


def test_ensemble(run_dir: Path, fold_dirs: list[Path], prepared, tta: bool,
                  threshold: float | list[float] | None = None, fusion: dict[str, Any] | None = None,
                  device: str | Any = "cpu") -> dict[str, Any] | None:
    """Average the fold models' (calibrated) probabilities on the held-out test set (the models on ``device``).

    ``threshold`` (chosen on OOF data) adds ``final_at_threshold``: the final variant's metrics at it.
    ``fusion`` (from :func:`~medvox.descriptors.fit_fusion`) adds the variant ``fused``: the
    calibrated ensemble mixed with the feature model's test probabilities at the OOF-chosen weight."""
    from medvox.inference.models import ensemble_predict, final_checkpoint, load_model

    test_idx = prepared.test_idx
    if len(test_idx) == 0:
        return None
    models = [load_model(final_checkpoint(d), device) for d in fold_dirs]
    images = prepared.images[np.sort(test_idx)]
    order = np.sort(test_idx)
    labels = prepared.labels[order]
    out: dict[str, Any] = {"n": len(order), "tta": tta, "members": [str(m.path) for m in models]}
    variants = (("ensemble", False, False), ("ensemble_tta", True, False), ("ensemble_tta_calibrated", True, True))
    if not tta:
        variants = (("ensemble", False, False), ("ensemble_calibrated", False, True))
    for name, use_tta, calibrated in variants:
        mean, per = ensemble_predict(models, images, tta=use_tta, calibrated=calibrated)
        out[name] = compute_metrics(labels, mean, class_names=prepared.classes)
        best, best_per, out["final"] = mean, per, name  # the last variant (calibrated) is the final one
    if fusion is not None and fusion.get("test_features") is not None:
        best = fuse_test(out, labels, best, fusion, prepared.classes)
    if threshold is not None:
        out["final_at_threshold"] = compute_metrics(labels, best, threshold=threshold, class_names=prepared.classes)
    out["per_fold"] = [compute_metrics(labels, p, class_names=prepared.classes) for p in best_per]
    cases = [prepared.cases[i] for i in order]
    write_predictions(run_dir / "test_predictions.csv", [c.id for c in cases], [c.group for c in cases], labels,
                      best, prepared.classes, threshold=threshold)
    _add_spread(run_dir / "test_predictions.csv", best_per)
    return out


def _add_spread(path: Path, per_model: np.ndarray) -> None:
    """Append the ensemble spread (std over members of the predicted class's probability) to a CSV."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    mean = per_model.mean(0)
    pred = mean.argmax(1)
    spread = per_model[:, np.arange(len(pred)), pred].std(0)
    rows[0].append("spread")
    for i, row in enumerate(rows[1:]):
        row.append(f"{spread[i]:.6f}")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


def summarize(run_dir: Path, fold_dirs: list[Path], prepared=None, tta: bool = True,
              threshold_rule: str = "youden", feature_fusion: bool = False, seed: int = 0,
              progress: bool = True, features_from=None, device: str | Any = "cpu") -> dict[str, Any]:
    """Write ``cv_summary.json`` (+ ``oof_predictions.csv``, ``test_predictions.csv``) for a finished CV.

    ``decision``: a threshold (binary) or class weights (more classes) chosen by ``threshold_rule`` on the
    pooled, calibrated OOF predictions, and the test ensemble's metrics at it (``test.final_at_threshold``): at
    the argmax an imbalanced task's models often predict the majority class only.

    ``feature_fusion`` (needs ``prepared``): a descriptor model on the same folds, mixed in at the weight
    with the best pooled OOF AUC, or log-loss for more than two classes (:mod:`medvox.descriptors`); the threshold, ``oof_fused`` and the
    test variant ``fused`` then use the mixture, and ``fusion`` records the weight; ``features_from``: the
    same cases on the descriptors' grid (:func:`~medvox.descriptors.feature_data`; None: ``prepared``);
    ``device``: where the test ensemble runs (``medvox cv --gpu``: the GPU it trained on)."""
    folds = [json.loads((d / "metrics.json").read_text()) for d in fold_dirs]
    fold_val = [f["final"]["val"] for f in folds]
    oof_metrics, _, _, classes = write_oof(run_dir, fold_dirs)
    calibration = [fit_fold_calibration(d) for d in fold_dirs]
    oof_labels, oof_probs = calibrated_oof(run_dir, calibration)
    fusion = None
    if feature_fusion and prepared is not None:
        fusion = fuse_oof(run_dir, prepared, oof_labels, oof_probs, progress=progress, seed=seed,
                          features_from=features_from)
        oof_probs = fusion["oof"]
    else:  # summarised again without fusion: a former fusion's files must not be read as this run's
        import shutil

        shutil.rmtree(run_dir / "features", ignore_errors=True)
        (run_dir / "oof_fused_predictions.csv").unlink(missing_ok=True)
    decision = oof_decision(oof_labels, oof_probs, rule=threshold_rule)
    threshold = decision_cut(decision)  # a threshold (binary) or class weights
    summary = {
        "model": folds[0]["model"], "folds": len(folds), "classes": classes, "monitor": folds[0]["monitor"],
        "fold_final_weights": [f["final"]["weights"] for f in folds],
        "cv": fold_table(fold_val),
        "cv_at_decision": folds_at_decision(run_dir, oof_labels, oof_probs, threshold) if decision else None,
        "oof": oof_metrics, "calibration": calibration, "decision": decision,
        "test": test_ensemble(run_dir, fold_dirs, prepared, tta, threshold, fusion, device) if prepared is not None else None,
    }
    if fusion is not None:
        record_fusion(run_dir, summary, fusion, oof_labels, classes, threshold)
    write_json(summary, run_dir / "cv_summary.json")
    return to_jsonable(summary)


def format_table(summary: dict) -> str:
    """A Markdown table: metric, mean +- std [95 % CI] over folds, pooled OOF, test ensemble.

    Threshold-dependent metrics of OOF and test are at the OOF-chosen threshold where there is one."""
    test = (summary.get("test") or {})
    test_best = test.get("final_at_threshold") or test.get(test.get("final", "")) or test.get("ensemble") or {}
    decision = summary.get("decision") or {}
    base = summary.get("oof_fused") or summary["oof"]  # a fused run's pooled OOF is the calibrated mixture
    oof = {**base, **{k: v for k, v in (decision.get("oof") or {}).items() if k not in ("auc", "loss")}}
    at_decision = summary.get("cv_at_decision") or {}
    lines = ["| metric | folds mean +- std [95 % CI] | pooled OOF | test ensemble |", "| --- | --- | --- | --- |"]
    for name, row in summary["cv"].items():
        if name in THRESHOLD_METRICS and at_decision.get(name):
            row = at_decision[name]  # each fold's validation cases at the decision, like the pooled OOF column
        if row["mean"] is None:
            continue
        ci = row["ci95"]
        cell = f"{row['mean']:.3f} +- {row['std'] or 0:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        ov = oof.get(name)
        tv = test_best.get(name)
        lines.append(f"| {name} | {cell} | {'' if ov is None else f'{ov:.3f}'} | {'' if tv is None else f'{tv:.3f}'} |")
    if decision:
        from medvox.metrics.classification import decision_text

        cut = decision_cut(decision)
        lines.append(f"\nOOF and test ensemble {'at the threshold ' if np.ndim(cut) == 0 else 'decided by '}"
                     f"{decision_text(cut, summary['classes'])} "
                     f"({decision['rule']} on the pooled calibrated out-of-fold predictions; AUC and loss do not "
                     "depend on it); " + ("the folds column too, each fold's validation cases at it (at the argmax: "
                                          "`cv` in cv_summary.json)." if at_decision else
                                          "the folds column is at the argmax."))
    fusion = summary.get("fusion")
    if fusion:
        from medvox.descriptors import fusion_scores

        lines.append(f"\nOOF and test ensemble include the descriptor model at weight {fusion['weight']:.2f} (chosen on "
                     f"the pooled OOF {fusion_scores(fusion, features='descriptors')}); the folds column's AUC and loss "
                     "are the CNN fold models'.")
    return "\n".join(lines)
