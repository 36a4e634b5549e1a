"""``medvox compare``: several cross-validation runs side by side, with paired tests of their AUCs.

One table (one row per run: CV mean +- std of AUC, accuracy, balanced accuracy and F1, pooled out-of-fold
AUC, test-ensemble AUC), ROC curves of every run on one plot (out-of-fold, and test when present), and for
every pair of runs DeLong's test of the two correlated out-of-fold AUCs plus a paired bootstrap CI of their
difference, on the cases both runs predicted (matched by ``case_id``). The numbers go to
``comparison.json`` next to the page.

Runs are only comparable on the same task: different class lists are refused; different out-of-fold case
sets (other data, other folds, a subset) are allowed but the tests use the intersection, with a warning.

Example:
    >>> write_comparison([Path("results/resnet50"), Path("results/mil")], Path("results/comparison"))
"""

from __future__ import annotations

import json
import tempfile
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from medvox.cv.summary import figures_of
from medvox.metrics.stats import delong_test, paired_bootstrap_auc
from medvox.reporting import htmlpage as html
from medvox.reporting.htmlpage import Html, fmt
from medvox.run import Predictions, Run, RunError, require_output_file, require_output_folder

_CV_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def write_comparison(run_dirs: list[Path], out: Path, n_boot: int = 2000, seed: int = 0) -> Path:
    """Compare runs; write ``comparison.html`` and ``comparison.json``.

    Args:
        run_dirs: two or more run folders (``<output>/<run>``) of the same task.
        out: a folder (gets ``comparison.html`` + ``comparison.json``) or an ``.html`` file (the JSON is
            written next to it with the same stem).
        n_boot: paired bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        The path of the HTML page.

    Raises:
        DataError: ``out`` is a file where a folder is meant (or a folder where an ``.html`` file is), or cannot
            be written.
        ValueError: fewer than two runs, runs with different classes, a run without out-of-fold
            predictions, or a case labelled differently in two runs.
    """
    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):  # checked before any run is read
        page_path = require_output_file(out, "--out")
    else:
        page_path = require_output_folder(out, "--out") / "comparison.html"
    runs = [Run(Path(p)) for p in run_dirs]
    result = compare_runs(runs, n_boot=n_boot, seed=seed)
    page_path.parent.mkdir(parents=True, exist_ok=True)
    page_path.with_suffix(".json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="medvox_compare_") as tmp:
        sections = [("table", "Runs", _runs_section(result)),
                    ("roc", "ROC curves", _roc_section(runs, result["names"], Path(tmp))),
                    ("tests", "Paired tests of the AUCs", _tests_section(result)),
                    ("runs", "Run folders", html.table(["run", "folder", "model", "folds"], [
                        [r["name"], r["path"], r["model"], r["folds"]] for r in result["runs"]]))]
    intro = Html(html.notes(result["warnings"], warn=True) + html.notes(result["notes"]))
    page_path.write_text(html.page(f"medvox comparison: {', '.join(result['names'])}", intro, sections),
                         encoding="utf-8")
    return page_path


def compare_runs(runs: list[Run], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The numbers of a comparison (what ``comparison.json`` holds); see :func:`write_comparison`."""
    if len(runs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(runs)}")
    _check_classes(runs)
    preds = {}
    for run in runs:
        if run.is_fold or run.summary is None:
            raise RunError(f"run {run.name} ({run.path}) has no cv_summary.json: compare takes the folders "
                           "`medvox cv` finished")
        oof, test = run.oof(), run.test()
        if oof is None:
            raise RunError(f"run {run.name} ({run.path}) has no oof_predictions.csv: finish its `medvox cv` first")
        preds[id(run)] = {"oof": oof.labelled(), "test": None if test is None else test.labelled()}
    names = _names(runs)
    pairs, warnings = [], []
    for (i, a), (j, b) in combinations(enumerate(runs), 2):
        for split in ("oof", "test"):
            pa, pb = preds[id(a)][split], preds[id(b)][split]
            if pa is None or pb is None:
                continue
            pair = paired_test(pa, pb, names[i], names[j], split, n_boot=n_boot, seed=seed)
            if pair.get("warning"):
                warnings.append(pair["warning"])
            pairs.append(pair)
    _holm([p for p in pairs if p["split"] == "oof"])
    notes = ["DeLong's test compares two correlated AUCs (same cases, two models); the bootstrap CI resamples "
             "cases within each class, pairing both models on every resample."]
    if len(runs) > 2:
        notes.append("With more than two runs, 'Holm p' adjusts the out-of-fold p-values for multiple comparisons.")
    if len(runs[0].classes) > 2:
        notes.append("More than two classes: DeLong's test is for binary AUCs; only the bootstrap of the macro "
                     "one-vs-rest AUC difference is reported.")
    same = [(names[i], names[j]) for (i, a), (j, b) in combinations(enumerate(runs), 2)
            if a.path.resolve() == b.path.resolve()]
    for x, y in same:
        warnings.append(f"{x} and {y} are the same run folder: their tests compare a run with itself (p = 1).")
    return {"names": names, "classes": runs[0].classes,
            "runs": [_run_row(r, n, preds[id(r)]) for r, n in zip(runs, names, strict=True)],
            "pairs": pairs, "warnings": warnings, "notes": notes}


def paired_test(a: Predictions, b: Predictions, name_a: str, name_b: str, split: str, n_boot: int = 2000,
                seed: int = 0) -> dict[str, Any]:
    """DeLong + paired bootstrap on the cases both prediction sets share (by ``case_id``)."""
    ids_b = {cid: k for k, cid in enumerate(b.ids)}
    common = [(k, ids_b[cid]) for k, cid in enumerate(a.ids) if cid in ids_b]
    out: dict[str, Any] = {"a": name_a, "b": name_b, "split": split, "n_common": len(common),
                           "n_only_a": a.n - len(common), "n_only_b": b.n - len(common), "warning": None}
    if out["n_only_a"] or out["n_only_b"]:
        out["warning"] = (f"{split}: {name_a} and {name_b} predicted different case sets ({out['n_only_a']} case(s) "
                          f"only in {name_a}, {out['n_only_b']} only in {name_b}); the paired tests use the "
                          f"{len(common)} common case(s) only.")
    ia, ib = (np.array(x, dtype=int) for x in zip(*common, strict=True)) if common else (np.array([], int),) * 2
    if np.any(a.labels[ia] != b.labels[ib]):
        bad = a.ids[int(ia[np.flatnonzero(a.labels[ia] != b.labels[ib])[0]])]
        raise ValueError(f"case {bad!r} has different labels in {name_a} and {name_b}: the runs are not on the same data")
    y, pa, pb = a.labels[ia], a.probs[ia], b.probs[ib]
    if len(np.unique(y)) < 2:
        out["skipped"] = "fewer than two classes among the common cases"
        return out
    if pa.shape[1] == 2:
        out["delong"] = delong_test(y, pa[:, 1], pb[:, 1])
    out["bootstrap"] = paired_bootstrap_auc(y, pa, pb, n_boot=n_boot, seed=seed)
    return out


def _check_classes(runs: list[Run]) -> None:
    ref = runs[0]
    for run in runs[1:]:
        if list(run.classes) != list(ref.classes):
            raise ValueError(f"runs {ref.name} ({ref.path}) and {run.name} ({run.path}) have different classes "
                             f"({ref.classes} vs {run.classes}): they are not comparable")


def _names(runs: list[Run]) -> list[str]:
    """Folder names, made unique with the parent folder (then an index) where two runs share one."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.path.parent.name}/{r.name}" for r in runs]
    if len(set(names)) < len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def _run_row(run: Run, name: str, preds: dict[str, Predictions | None]) -> dict[str, Any]:
    """One run's row: its fold figures (``cv_summary.json``) and its pooled OOF and test figures, computed by
    :func:`~medvox.cv.summary.figures_of` from its prediction files, as its summary and report compute them."""
    s = run.summary or {}
    cv = {m: {k: (s.get("cv", {}).get(m) or {}).get(k) for k in ("mean", "std", "ci95")} for m in _CV_METRICS}
    oof, test = figures_of(preds["oof"]), figures_of(preds["test"]) if preds["test"] is not None else None
    return {"name": name, "path": str(run.path), "model": s.get("model") or (run.config.get("model") or {}).get("name"),
            "folds": s.get("folds", len(run.folds)), "cv": cv, "decision": preds["oof"].decision.describe(),
            "oof": {k: oof.get(k) for k in ("auc", *_CV_METRICS[1:])}, "oof_auc": oof.get("auc"),
            "oof_n": preds["oof"].n, "test_auc": None if test is None else test.get("auc"),
            "test": None if test is None else {k: test.get(k) for k in ("auc", *_CV_METRICS[1:])},
            "test_variant": s.get("test", {}).get("final") if test is not None else None,
            "test_n": None if test is None else preds["test"].n}


def _holm(pairs: list[dict[str, Any]]) -> None:
    """Holm's step-down adjustment of the DeLong p-values, in place (``p_holm``)."""
    tested = [p for p in pairs if p.get("delong")]
    order = sorted(tested, key=lambda p: p["delong"]["p_value"])
    running = 0.0
    for rank, pair in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pair["delong"]["p_value"]))
        pair["delong"]["p_holm"] = running


def _runs_section(result: dict[str, Any]) -> Html:
    header = ["run", "model", "folds", *[f"CV {m} mean ± std" for m in _CV_METRICS], "pooled OOF AUC",
              "test ensemble AUC"]
    rows = []
    for r in result["runs"]:
        cells = [f"{fmt(r['cv'][m]['mean'])} ± {fmt(r['cv'][m]['std'])}" for m in _CV_METRICS]
        test = f"{fmt(r['test_auc'])} ({r['test_variant']}, n = {r['test_n']})" if r["test_variant"] else "no test set"
        rows.append([r["name"], r["model"], r["folds"], *cells, f"{fmt(r['oof_auc'])} (n = {r['oof_n']})", test])
    return Html(html.para("CV: mean and standard deviation over the folds' final weights on their validation "
                          "fold (raw probabilities, at the argmax). Pooled OOF and test: the run's final "
                          "probabilities (calibrated, fused where the run is), the figures of its cv_summary.json "
                          "and report.") + html.table(header, rows))


def _tests_section(result: dict[str, Any]) -> Html:
    header = ["A", "B", "cases", "AUC A", "AUC B", "A - B", "DeLong 95 % CI", "z", "p", "Holm p",
              "bootstrap 95 % CI"]
    rows = []
    for p in result["pairs"]:
        d, bs = p.get("delong") or {}, p.get("bootstrap") or {}
        rows.append([p["a"], p["b"], f"{p['split']}: {p['n_common']}", fmt(d.get("auc_a")), fmt(d.get("auc_b")),
                     fmt(d.get("diff", bs.get("diff"))), fmt(d.get("ci95_diff")), fmt(d.get("z")),
                     fmt(d.get("p_value"), 4), fmt(d.get("p_holm"), 4), fmt(bs.get("ci")) if bs else p.get("skipped")])
    if not rows:
        return html.note("no pair of runs shares predictions")
    return Html(html.table(header, rows))


def _roc_section(runs: list[Run], names: list[str], tmp: Path) -> Html:
    figs = []
    for split, what in (("oof", "pooled out-of-fold"), ("test", "test ensemble")):
        found = [(n, r.oof() if split == "oof" else r.test()) for r, n in zip(runs, names, strict=True)]
        curves = [(n, p.labelled()) for n, p in found if p is not None]
        if curves:
            png = _plot_roc_overlay(curves, tmp / f"roc_{split}.png", f"ROC, {what}")
            figs.append(html.figure_of(png, f"ROC curves of every run, {what} predictions"))
    if len(figs) == 1:
        figs.append(html.note("no run has a held-out test set: no test ROC"))
    return html.grid(figs)


def _plot_roc_overlay(curves: list[tuple[str, Predictions]], path: Path, title: str) -> Path:
    """One ROC per run (binary: class 1 positive; K > 2: micro-averaged one-vs-rest)."""
    from matplotlib.figure import Figure
    from sklearn import metrics as skm

    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for name, p in curves:
        binary = p.probs.shape[1] == 2
        if binary:
            truth, score = p.labels == 1, p.probs[:, 1]
        else:
            truth, score = (np.eye(p.probs.shape[1])[p.labels] == 1).ravel(), p.probs.ravel()
        if 0 < truth.sum() < len(truth):
            fpr, tpr, _ = skm.roc_curve(truth, score)
            auc = skm.roc_auc_score(truth, score)
            ax.plot(fpr, tpr, lw=2, label=f"{name} ({'AUC' if binary else 'micro AUC'} = {auc:.3f}, n = {p.n})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    fig.clear()
    return path
