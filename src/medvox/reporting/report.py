"""``medvox report``: one self-contained HTML page for a cross-validation run.

The page holds everything a reader needs offline: configuration, data and preprocessing plan, the
cross-validation table (mean +- std [95 % CI] over folds, pooled out-of-fold, test ensemble), learning
curves, ROC / precision-recall curves and confusion matrices of the pooled out-of-fold and the test
predictions, calibration before/after temperature scaling, and per-fold tables. Every image is an
embedded ``data:image/png;base64`` URI and the CSS is inline: no network, no external file.

Two sections show cases: a few sample slices per class (the most confidently correct out-of-fold cases) and
a gallery of the most confident out-of-fold errors, each with the Grad-CAM (or MIL attention) map of the
fold model that did not see it. Their volumes are read from the run's data source and preprocessed with its
plan, as the cache was built (:func:`~medvox.data.preprocess.preprocess_case`, the Predictor's preprocessing);
the gallery's maps come from :func:`~medvox.inference.explain.explain_preprocessed`, one forward and backward
pass per case for at most ``GALLERY_SIZE`` cases (``gallery=False`` leaves them out).

Curves are drawn from the prediction CSVs (``oof_predictions.csv``, ``test_predictions.csv``), the numbers
come from ``cv_summary.json`` and the folds' ``metrics.json``; all text is HTML-escaped. A missing piece (no
test set, EMA off, one fold, a deleted plot) becomes a note in the page, never an error.

Example:
    >>> write_report(Path("results/resnet50"))  # -> results/resnet50/report.html
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medvox.cv.summary import THRESHOLD_METRICS, figures_of
from medvox.metrics.decision import Decision
from medvox.reporting import htmlpage as html
from medvox.reporting.htmlpage import Html, fmt
from medvox.run import Run, require_output_file

_FOLD_COLS = ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "loss")
_TEST_VARIANTS = (("ensemble", "fold ensemble"), ("ensemble_calibrated", "ensemble + temperature scaling"),
                  ("ensemble_tta", "ensemble + TTA"),
                  ("ensemble_tta_calibrated", "ensemble + TTA + temperature scaling"),
                  ("fused", "+ descriptor model (feature fusion)"))


GALLERY_SIZE = 6  # errors shown: one fold model's forward and backward pass each
SAMPLES_PER_CLASS = 3


def write_report(run_dir: Path, out: Path | None = None, gallery: bool = True) -> Path:
    """Write the HTML report of a cross-validation run.

    Args:
        run_dir: ``<output>/<run>`` with ``cv_summary.json`` and ``fold_<k>/`` folders (a run whose
            summary is missing still gets a page from its folds).
        out: the HTML file (default ``run_dir/report.html``); checked before the page is made (not a folder,
            writable).
        gallery: draw the Grad-CAM gallery of the most confident out-of-fold errors (loads each fold model
            an error belongs to; ``medvox report --no-gallery`` is False).

    Returns:
        The path of the written page.

    Raises:
        DataError: ``out`` is a folder or cannot be written.
        FileNotFoundError: ``run_dir`` holds neither ``cv_summary.json`` nor any ``fold_<k>``.
    """
    run = Run(Path(run_dir))
    if run.is_fold:
        from medvox.run import RunError

        raise RunError(f"{run.path} is a fold folder; `medvox report` takes the run folder above it ({run.path.parent})")
    out = require_output_file(Path(out) if out is not None else run.path / "report.html", "--out")
    cases = functools.cache(lambda: _source_cases(run))
    with tempfile.TemporaryDirectory(prefix="medvox_report_") as tmp:
        sections = [
            ("summary", "Cross-validation summary", _summary_section(run)),
            ("folds", "Per-fold results", _folds_section(run)),
            ("curves", "Learning curves", _curves_section(run)),
            ("oof", "Pooled out-of-fold predictions", _predictions_section(run, "oof", Path(tmp))),
            ("samples", "Sample cases", _samples_section(run, cases, Path(tmp))),
            ("gallery", "Most confident errors", _gallery_section(run, cases, Path(tmp)) if gallery else
             html.note("The gallery of the most confident errors was left out (gallery=False, `medvox report "
                       "--no-gallery`).")),
            ("test", "Held-out test set", _test_section(run, Path(tmp))),
            ("calibration", "Calibration", _calibration_section(run, Path(tmp))),
            ("data", "Data and preprocessing", _data_section(run)),
            ("config", "Configuration and environment", _config_section(run)),
        ]
    title = f"medvox report: {run.name}"
    intro = _intro(run)
    page = html.page(title, intro, sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _intro(run: Run) -> Html:
    s = run.summary or {}
    facts = {"model": s.get("model") or run.config.get("model", {}).get("name"),
             "folds": s.get("folds", len(run.folds)), "classes": ", ".join(run.classes),
             "monitored metric": s.get("monitor"), "run folder": str(run.path),
             "medvox": run.run_info.get("versions", {}).get("medvox")}
    notes = html.notes(run.notes)
    return Html(html.kv_table(facts) + notes)


def _summary_section(run: Run) -> Html:
    s = run.summary
    if not s:
        return html.note("cv_summary.json is missing: the cross-validation did not finish (run `medvox cv` "
                         "again to resume it); the per-fold sections below show what the folds wrote.")
    test = s.get("test") or {}
    variants = [(k, label) for k, label in _TEST_VARIANTS if test.get(k)]
    header = ["metric", "folds: mean ± std [95 % CI]", *[f"test: {label}" for _, label in variants]]
    rows = []
    for name, row in s.get("cv", {}).items():
        if row.get("mean") is None:
            continue
        rows.append([name, _mean_cell(row), *[fmt(test[k].get(name)) for k, _ in variants]])
    text = ("Each fold model's final weights on its validation cases, raw probabilities, at the argmax: mean and "
            "sample standard deviation over folds, the 95 % interval a percentile bootstrap over folds (wide with "
            "few folds); the test columns score each variant of the fold ensemble at the argmax. The run's own "
            "figures, at its decision, follow the table.")
    if not variants:
        text += " No held-out test set: no test columns."
    return Html(html.para(text) + html.table(header, rows) + _decision_table(s))


def _decision_table(s: dict) -> str:
    """Every metric at the run's decision: each fold's validation cases, the pooled OOF, the final test ensemble;
    the figures ``cv_table.md`` shows (from ``cv_summary.json``)."""
    decision = Decision.from_json(s["decision"])
    folds, test, oof = s.get("cv_at_decision") or {}, (s.get("test") or {}).get("final_at_threshold") or {}, s["oof"]
    header = ["metric", "folds: mean ± std [95 % CI]", "pooled OOF", *(["test: final ensemble"] if test else [])]
    rows = []
    for name in ("auc", *THRESHOLD_METRICS, "loss"):
        fold_row = (folds if name in THRESHOLD_METRICS else s.get("cv") or {}).get(name)
        if oof.get(name) is None and not fold_row:
            continue
        rows.append([name, _mean_cell(fold_row) if fold_row and fold_row.get("mean") is not None else "",
                     fmt(oof.get(name)), *([fmt(test.get(name))] if test else [])])
    text = (f"The run's figures at its decision: {decision.describe()}. Pooled OOF: every case's out-of-fold "
            f"prediction scored at once ({s.get('probabilities', 'calibrated')} probabilities); AUC and loss do not "
            "depend on the decision (the folds' AUC and loss are each fold model's).")
    return html.h3("At the run's decision") + html.para(text) + html.table(header, rows)


def _mean_cell(row: dict) -> str:
    cell = f"{fmt(row['mean'])} ± {fmt(row.get('std') or 0.0)}"
    ci = row.get("ci95")
    return cell + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _folds_section(run: Run) -> Html:
    if not run.folds:
        return html.note("no fold folders found")
    header = ["fold", "status", "epochs", "final weights", "best epoch",
              *[f"val {c}" for c in _FOLD_COLS], "test auc", "test accuracy"]
    rows = []
    for fold in run.folds:
        m = fold.metrics or {}
        final = m.get("final") or {}
        val, test = final.get("val") or {}, final.get("test") or {}
        rows.append([fold.name, m.get("status", "missing metrics.json"), m.get("epochs_run"), final.get("weights"),
                     final.get("epoch"), *[fmt(val.get(c)) for c in _FOLD_COLS], fmt(test.get("auc")),
                     fmt(test.get("accuracy"))])
    text = ("Final weights: the checkpoint each fold's final evaluation used (metrics.json). Validation and test "
            "columns: that fold model alone, raw probabilities, at the argmax.")
    return Html(html.para(text) + html.table(header, rows) + _best_table(run))


def _best_table(run: Run) -> str:
    rows = []
    for fold in run.folds:
        best = (fold.metrics or {}).get("best") or {}
        for kind in ("raw", "ema"):
            b = best.get(kind) or {}
            if b.get("epoch") is not None:
                rows.append([fold.name, kind, b.get("epoch"), fmt(b.get("value"))])
    if not rows:
        return ""
    monitor = (run.summary or {}).get("monitor") or "monitored metric"
    return html.details(f"Best epochs by {monitor} (raw and EMA weights)",
                        html.table(["fold", "weights", "epoch", monitor], rows))


def _curves_section(run: Run) -> Html:
    parts = []
    for fold in run.folds:
        png = next((fold.path / n for n in ("learning_curves.png", "loss_curve.png") if (fold.path / n).is_file()),
                   None)
        if png is None:
            parts.append(html.figure(None, f"{fold.name}: no learning-curve image (learning_curves.png)"))
        else:
            parts.append(html.figure(png.read_bytes(), f"{fold.name}: {png.name}"))
    if not parts:
        return html.note("no fold folders found")
    return html.grid(parts, wide=True)


def _predictions_section(run: Run, which: str, tmp: Path) -> Html:
    """ROC, precision-recall and confusion matrix of the pooled OOF (or test) predictions, at the decision the
    file records; the figures are :func:`~medvox.cv.summary.figures_of` the file, as in cv_summary.json."""
    preds = run.oof() if which == "oof" else run.test()
    name = "oof_predictions.csv" if which == "oof" else "test_predictions.csv"
    if preds is None:
        return html.note(f"{name} is missing: no curves for these predictions")
    from medvox import plots

    preds = preds.labelled()
    what = "pooled out-of-fold" if which == "oof" else "test ensemble"
    kind = preds.decision.probabilities
    metrics = figures_of(preds)
    figs = [
        html.figure_of(plots.plot_roc(preds.labels, preds.probs, run.classes, tmp / f"{which}_roc.png",
                                      title=f"ROC, {what}"),
                       f"ROC of the {what} predictions ({kind}; n = {preds.n}, AUC {fmt(metrics.get('auc'))})"),
        html.figure_of(plots.plot_pr(preds.labels, preds.probs, run.classes, tmp / f"{which}_pr.png",
                                     title=f"Precision-recall, {what}"), f"Precision-recall, {what} ({kind})"),
        html.figure_of(plots.plot_confusion_matrix(metrics["confusion_matrix"], run.classes, tmp / f"{which}_cm.png",
                                                   title=f"Confusion matrix, {what}"),
                       f"Confusion matrix at {preds.decision.text()}, {what}"),
    ]
    return Html(html.grid(figs) + _errors_table(preds, run.classes, which))


def _confident_errors(preds) -> tuple[np.ndarray, np.ndarray]:
    """``(decided class per row, the misclassified rows)`` at the file's decision, most confident first: by the
    probability the decision applies to of the (wrongly) predicted class, ties in file order."""
    pred = preds.decision.apply(preds.probs)
    wrong = np.flatnonzero(pred != preds.labels)
    return pred, wrong[np.argsort(-preds.probs[wrong, pred[wrong]], kind="stable")]


def _errors_table(preds, classes: list[str], which: str, k: int = 10) -> str:
    """The most confident wrong predictions (at the file's decision): the cases worth a second look."""
    pred, wrong = _confident_errors(preds)
    if len(wrong) == 0:
        return html.para("No misclassified case.")
    order = wrong[:k]
    extra = "fold" if which == "oof" else "spread"
    values = preds.extra.get(extra) or [""] * preds.n
    rows = [[preds.ids[i], classes[preds.labels[i]], classes[pred[i]], fmt(preds.probs[i, pred[i]]), values[i]]
            for i in order]
    return html.details(f"{len(order)} most confident errors of {len(wrong)}",
                        html.table(["case", "true", "predicted", "probability", extra], rows))


def _source_cases(run: Run) -> tuple[dict[str, Any], str | None]:
    """The run's cases by id, from the data source its ``config.json`` names (as ``medvox cv`` read it), or
    ``({}, why not)``."""
    from medvox.data.sources import load_source
    from medvox.errors import MedvoxError

    try:
        caseset = load_source(run.experiment_config().data)
    except MedvoxError as exc:
        return {}, str(exc).splitlines()[0]
    return {c.id: c for c in caseset.cases}, None


def _sample_rows(preds) -> list[list[int]]:
    """Per class, up to ``SAMPLES_PER_CLASS`` of its cases: the correctly decided ones with the highest probability
    of the class first, then (when too few) its misclassified ones by the same probability; ties in file order."""
    pred = preds.decision.apply(preds.probs)
    return [sorted(np.flatnonzero(preds.labels == c).tolist(),
                   key=lambda i, c=c: (bool(pred[i] != c), -float(preds.probs[i, c]), i))[:SAMPLES_PER_CLASS]
            for c in range(len(preds.classes))]


def _samples_section(run: Run, cases_of, tmp: Path) -> Html:
    """The central slices of the most confidently correct out-of-fold cases of each class, preprocessed as the
    model saw them."""
    from medvox.data.preprocess import preprocess_case
    from medvox.errors import MedvoxError
    from medvox.plots import plot_sample_slices

    preds = run.oof()
    if preds is None:
        return html.note("oof_predictions.csv is missing: no out-of-fold cases to show")
    if not run.plan:
        return html.note("plan.json is missing in the fold folders: the cases cannot be preprocessed as the model "
                         "saw them")
    preds = preds.labelled()
    cases, problem = cases_of()
    if problem:
        return html.note(f"The run's data source cannot be read ({problem}): no sample slices")
    kind, classes, folds = preds.decision.probabilities, preds.classes, preds.extra.get("fold")
    groups, rows, missing = [], [], []
    for c, picked in enumerate(_sample_rows(preds)):
        shown = []
        for i in picked:
            case_id, p = preds.ids[i], float(preds.probs[i, c])
            correct = preds.decision.apply(preds.probs[i:i + 1])[0] == c
            try:
                x = preprocess_case(cases[case_id], run.plan)
            except KeyError:
                missing.append(f"{case_id} is not in the data source")
                continue
            except (MedvoxError, OSError, ValueError) as exc:
                missing.append(f"{case_id}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                continue
            shown.append((f"{case_id}: p({classes[c]}) = {fmt(p)}" + ("" if correct else " (misclassified)"), x[0]))
            rows.append([classes[c], case_id, folds[i] if folds else "", fmt(p),
                         "yes" if correct else "no, misclassified"])
        groups.append((f"class {classes[c]}", shown))
    if not rows:
        return html.note("No sample case could be read: " + "; ".join(missing))
    png = plot_sample_slices(groups, run.plan["target_spacing"], tmp / "samples.png",
                             title="Sample cases, preprocessed (central slices)")
    channels = int(run.plan.get("in_channels") or 1)
    text = (f"Up to {SAMPLES_PER_CLASS} cases per class: the correctly decided out-of-fold cases with the highest "
            f"{kind} probability of their class (misclassified ones only where a class has too few), each as the "
            "model saw it (the run's plan: resampled, normalised, cropped / padded), through the centre of the "
            "volume: axial, coronal, sagittal" + (f"; channel 0 of {channels}" if channels > 1 else "") + ".")
    body = html.para(text) + html.figure_of(png, f"Sample cases per class, with their out-of-fold {kind} probability "
                                                 "of the true class")
    body += html.table(["class", "case", "fold", f"{kind} p(class)", f"correct at {preds.decision.text()}"], rows)
    return Html(body + (html.notes(missing, warn=True) if missing else ""))


def _gallery_section(run: Run, cases_of, tmp: Path) -> Html:
    """The most confident out-of-fold errors, each with its map from the fold model that did not see it."""
    from medvox.data.preprocess import read_case
    from medvox.errors import MedvoxError
    from medvox.inference.explain import explain_preprocessed, save_overlay
    from medvox.inference.predictor import Predictor

    preds = run.oof()
    if preds is None:
        return html.note("oof_predictions.csv is missing: no out-of-fold errors to show")
    preds = preds.labelled()
    decision, kind, classes = preds.decision, preds.decision.probabilities, preds.classes
    pred, ranked = _confident_errors(preds)
    if len(ranked) == 0:
        return html.para(f"No misclassified out-of-fold case at the run's decision ({decision.text()}): no error "
                         "to show.")
    if preds.folds is None:
        return html.note("oof_predictions.csv has no fold column: which fold model did not see a case is unknown, "
                         "so no out-of-fold map can be drawn")
    shown = ranked[:GALLERY_SIZE]
    cases, problem = cases_of()
    if problem:
        return html.note(f"The run's data source cannot be read ({problem}): no gallery")
    predictors: dict[int, Any] = {}
    figs, rows, remarks = [], [], []
    for n, i in enumerate(shown):
        case_id, k, p = preds.ids[i], int(preds.folds[i]), float(preds.probs[i, pred[i]])
        true, predicted = classes[preds.labels[i]], classes[pred[i]]
        caption = (f"{n + 1}. {case_id}: true {true}, predicted {predicted}, {kind} p({predicted}) = {fmt(p)}; "
                   f"map of fold {k}'s model (the case was in its validation set)")
        if k not in predictors:
            try:
                predictors[k] = Predictor.from_run(run.path, fold=k)
            except MedvoxError as exc:
                predictors[k] = str(exc).splitlines()[0]
        predictor = predictors[k]
        method = ""
        try:
            if isinstance(predictor, str):
                raise LookupError(predictor)
            if case_id not in cases:
                raise LookupError(f"{case_id} is not in the run's data source")
            x, features = predictor.preprocess(*read_case(cases[case_id]))
            explained = explain_preprocessed(predictor, x, int(pred[i]), features=features)
        except (LookupError, MedvoxError, OSError, ValueError) as exc:
            figs.append(html.note(f"{caption}: no map ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"))
        else:
            method = "Grad-CAM" if explained["method"] == "gradcam" else "attention"
            if explained["method"] == "gradcam":
                method += f" at {explained['cam_layer']}"
            remarks += [r for r in (explained["note"], explained["warning"]) if r and r not in remarks]
            title = f"{case_id}: true {true}, predicted {predicted} ({kind} p({predicted}) = {fmt(p)}), {method}"
            png = save_overlay(x[0], explained["map"], predictor.plan["target_spacing"], title,
                               tmp / f"gallery_{n}.png", value_range=explained["value_range"])
            figs.append(html.figure_of(png, caption))
        rows.append([n + 1, case_id, k, true, predicted, fmt(p), method or "–"])
    text = (f"The {len(shown)} most confident of the {len(ranked)} pooled out-of-fold cases misclassified at the "
            f"run's decision ({decision.text()}), ranked by the {kind} probability of the predicted class (the "
            "probability the decision applies to, as in oof_predictions.csv). Each map comes from the fold model "
            "that did not see the case in training (it was in that fold's validation set): Grad-CAM for the "
            "predicted class (the attention weights for a MIL model), computed on the preprocessed volume and "
            "shown through its maximum (axial, coronal, sagittal), the map in colour over the image.")
    body = html.para(text) + html.table(["rank", "case", "fold", "true", "predicted", f"{kind} p(predicted)", "map"],
                                        rows)
    return Html(body + html.notes(remarks) + html.grid(figs, wide=True))


def _test_section(run: Run, tmp: Path) -> Html:
    test = (run.summary or {}).get("test")
    if not test:
        return html.note("No held-out test set in this run (the data source has no test subset), "
                         "so there is no test ensemble.")
    variants = [(k, label) for k, label in _TEST_VARIANTS if test.get(k)]
    cols = ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "precision")
    rows = [[label, *[fmt(test[k].get(c)) for c in cols]] for k, label in variants]
    rows += [[f"fold {i} alone", *[fmt(m.get(c)) for c in cols]] for i, m in enumerate(test.get("per_fold") or [])]
    text = (f"{test.get('n')} held-out cases, never seen in training or model selection. The fold models' "
            f"probabilities are averaged; TTA {'on' if test.get('tta') else 'off'}. "
            "Per-fold rows score each member alone (with the ensemble's best setting).")
    body = _intervals_table(run) + html.para(text) + html.table(["predictor", *cols], rows)
    if "ensemble_tta" not in test:
        body += html.note("TTA was off for this run (--no-tta): only the plain ensemble was scored.")
    return Html(body + _predictions_section(run, "test", tmp))


SMALL_TEST_N, SMALL_TEST_POSITIVES, FEW_FOLDS = 50, 10, 5


def _intervals_table(run: Run) -> str:
    """The final test ensemble's figures at the run's decision with 95 % intervals and the counts they rest
    on (:func:`~medvox.metrics.stats.metric_intervals`), and warnings where they are too few to read much."""
    from medvox.metrics.stats import metric_intervals

    preds = run.test()
    if preds is None:
        return ""
    preds = preds.labelled()
    found = metric_intervals(preds.labels, preds.probs, preds.decision.apply(preds.probs))
    rows = [[name, fmt(v["value"]), f"[{fmt(v['ci'][0])}, {fmt(v['ci'][1])}]" if v["ci"] else "–",
             f"{v['k']} / {v['n']}" if name != "auc" else f"n = {v['n']}, {v['k']} positive", v["method"]]
            for name, v in found.items()]
    warnings = []
    positives = int((preds.labels == 1).sum()) if len(preds.classes) == 2 else None
    if preds.n < SMALL_TEST_N or (positives is not None and min(positives, preds.n - positives) < SMALL_TEST_POSITIVES):
        warnings.append(f"Small test set: n = {preds.n}" + (f" with {positives} positive" if positives is not None
                                                               else "") + ": the intervals are wide; read the "
                        "figures with them.")
    if len(run.folds) < FEW_FOLDS:
        warnings.append(f"{len(run.folds)} folds: the fold spread and its bootstrap interval rest on few values.")
    text = (f"The final test ensemble at the run's decision ({preds.decision.text()}), {preds.n} cases, with 95 % "
            "intervals: DeLong for the AUC, Wilson for proportions (the counts beside them).")
    return (html.notes(warnings, warn=True) + html.para(text)
            + html.table(["metric", "value", "95 % CI", "counts", "interval"], rows))


def _calibration_section(run: Run, tmp: Path) -> Html:
    calib = (run.summary or {}).get("calibration") or [f.calibration for f in run.folds if f.calibration]
    if not calib:
        return html.note("no calibration.json in the folds: temperature scaling was not fitted")
    cols = ("temperature", "ece_before", "ece_after", "brier_before", "brier_after")
    rows = [[f"fold {i}", *[fmt(c.get(k)) for k in cols]] for i, c in enumerate(calib)]
    text = ("One temperature per fold, fitted on that fold's validation predictions and applied to the test "
            "ensemble. ECE/Brier before and after are measured on the same validation predictions the "
            "temperature was fitted on, so 'after' is optimistic.")
    body = html.para(text) + html.table(["fold", *cols], rows)
    clipped = [i for i, c in enumerate(calib) if c.get("clipped")]
    if clipped:
        body += html.note(f"The temperature of fold(s) {', '.join(map(str, clipped))} hit its bound "
                          f"({calib[clipped[0]].get('bounds')}): the fit wanted more (a model close to chance); "
                          "those folds' calibrated probabilities are nearly flat.", warn=True)
    oof = run.oof()
    if oof is not None and oof.raw is not None and oof.calibrated is not None:
        from medvox.metrics.calibration import expected_calibration_error
        from medvox.plots import plot_reliability

        oof = oof.labelled()
        before, after = (expected_calibration_error(oof.labels, p) for p in (oof.raw, oof.calibrated))
        body += html.para(f"Pooled out-of-fold ECE (15 bins, top-label): raw {fmt(before, 4)}, each fold at its "
                          f"temperature {fmt(after, 4)}.")
        png = plot_reliability(oof.labels, oof.raw, oof.calibrated, tmp / "reliability.png",
                               title="Reliability, pooled OOF (raw / each fold's temperature)")
        body += html.figure_of(png, "Reliability diagram of the pooled out-of-fold predictions: before = the fold "
                                    "models' raw probabilities, after = each at its fold's temperature")
    return Html(body)


def _data_section(run: Run) -> Html:
    parts = []
    if run.plan:
        parts.append(html.h3("Preprocessing plan (plan.json)") + html.kv_table(run.plan))
    else:
        parts.append(html.note("plan.json is missing in the fold folders"))
    if run.fingerprint:
        parts.append(html.h3("Dataset fingerprint (from the preprocessing cache)") +
                     html.kv_table(_fingerprint_summary(run.fingerprint), formatter=html.fmt))
    else:
        parts.append(html.note("dataset fingerprint not found (the preprocessing cache was moved or cleared); "
                               "the plan above holds the class counts and the preprocessing"))
    parts.append(_splits_table(run))
    return Html("".join(parts))


def _fingerprint_summary(fp: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint without its per-case lists (ranges instead)."""
    out = {k: _summarised(v) for k, v in fp.items() if k not in ("spacings", "shapes")}
    for key in ("spacings", "shapes"):
        values = np.asarray(fp.get(key) or [], dtype=float)
        if values.ndim == 2 and len(values):
            out[f"{key} min"] = values.min(0).round(4).tolist()
            out[f"{key} max"] = values.max(0).round(4).tolist()
    return out


def _summarised(value: Any) -> Any:
    """A fingerprint value for a page: long lists of numbers (per-case values, intensity samples) as their
    range and count, dicts recursively."""
    if isinstance(value, dict):
        return {k: _summarised(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_summarised(v) for v in value]
    if isinstance(value, list) and len(value) > 12:
        values = np.asarray([v for v in value if isinstance(v, (int, float))], dtype=float)
        if len(values):
            return (f"{len(value)} values: min {fmt(float(values.min()))}, median {fmt(float(np.median(values)))}, "
                    f"max {fmt(float(values.max()))}")
        return f"{len(value)} values"
    return value


def _splits_table(run: Run) -> str:
    splits = run.splits
    if not splits or not splits.get("folds"):
        return html.note("splits.json is missing")
    rows = [[f"fold {i}", len(f.get("train", [])), len(f.get("val", []))] for i, f in enumerate(splits["folds"])]
    text = (f"{splits.get('method', 'k-fold')} with k = {splits.get('k')}, seed {splits.get('seed')}; "
            f"{len(splits.get('test') or [])} held-out test case(s). Patients never straddle folds.")
    return html.h3("Splits (splits.json)") + html.para(text) + html.table(["fold", "train cases", "val cases"], rows)


def _config_section(run: Run) -> Html:
    parts = []
    if run.config:
        blocks = [html.h3(key) + (html.kv_table(value) if isinstance(value, dict) else html.para(str(value)))
                  for key, value in run.config.items()]
        parts.append(html.details("Resolved configuration (fold_0/config.json)", html.grid(blocks), True))
    else:
        parts.append(html.note("config.json is missing"))
    info = run.run_info
    if info:
        env = {"started": info.get("started"), "command": " ".join(map(str, info.get("command") or [])),
               "git commit": info.get("git_commit"), "data hash": info.get("data_hash"),
               **{f"version: {k}": v for k, v in (info.get("versions") or {}).items()},
               **{f"hardware: {k}": v for k, v in (info.get("hardware") or {}).items()}}
        parts.append(html.details("Environment (fold_0/run_info.json)", html.kv_table(env)))
    pretrained = run.path / "fold_0" / "pretrained_report.json"
    if pretrained.is_file():
        parts.append(html.details("Pretrained weights (fold_0/pretrained_report.json)",
                                  html.kv_table(json.loads(pretrained.read_text(encoding="utf-8")))))
    return Html("".join(parts))

