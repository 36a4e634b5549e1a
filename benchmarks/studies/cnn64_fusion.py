"""What a full-size (64^3) CNN adds to the default recipe once the descriptor model is fused, post hoc.

A one-off study, not tested: the run folders it reads were removed from the tree (they are in the git
history); ``benchmarks/studies/README.md`` says where, and ``cnn64_fusion.json`` beside it holds the figures it
published.

The default recipe on a CPU trains its CNN on the volume resized to 28^3 and fits the descriptor model on the
native 64^3 grid (``medvox cv --recipe auto``). On a GPU the plan trains the CNN at 64^3. A GPU sweep
kept the fold predictions of a ResNet-18 trained at 64^3 on the same CV split as the CPU recipe's
seed 0 (``accuracy_runs/h100_2026-11-26/folds/r18_64_s0``: validation and test predictions and each fold's
temperature; no TTA ensemble or fusion, see ``accuracy_notes.md``). This script puts the three CNNs (28^3, 64^3,
their mean) through the recipe's own last steps, each on the same footing:

1. per-fold temperature-scaled OOF probabilities (``calibration.json`` of each fold) and the test ensemble
   (mean of the folds' temperature-scaled test probabilities; the CPU run's is its TTA ensemble, recovered from
   its fused ``test_predictions.csv`` and its descriptor model's);
2. the descriptor model (``medvox.descriptors``: 46 descriptors on the 64^3 grid, ``StandardScaler`` +
   logistic regression per fold on the same folds), mixed in at the weight with the best pooled OOF AUC;
3. the Youden threshold on the pooled OOF probabilities, then test AUC, ACC, balanced ACC and F1 at it.

Every choice is made on OOF data. The ``oracle`` column (the best test ACC over thresholds chosen *on test*
with balanced ACC >= 0.82) is a diagnosis of the ranking only: could any threshold reach issue 8's target?

Usage::

    python benchmarks/studies/cnn64_fusion.py --cpu-run benchmarks/accuracy_runs/cpu_2026-11-26-auto64aa/kept/auto64aa_s0 \
        --gpu-folds benchmarks/accuracy_runs/h100_2026-11-26/folds/r18_64_s0 \
        --out benchmarks/accuracy_runs/h100_2026-11-26/cnn64_fusion.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
DATA = Path(os.environ.get("MEDVOX_MEDMNIST_DIR", REPO.parent / "shared" / "data" / "medmnist"))
TARGET_BA = 0.82  # issue 8's balanced-accuracy target, for the oracle diagnosis


@dataclasses.dataclass
class CNN:
    """A CNN's pooled calibrated OOF and calibrated test ensemble, in the CPU run's case order."""

    oof: np.ndarray
    test: np.ndarray


def cpu_run(kept: Path):
    """(ids, labels, folds, calibrated OOF, test ids, test labels, CNN test ensemble) of a fused ``medvox cv`` run."""
    from medvox.cv.summary import calibrated_oof, load_predictions

    summary = json.loads((kept / "cv_summary.json").read_text())
    y, p = calibrated_oof(kept, summary["calibration"])
    _, _, _, rows = load_predictions(kept / "oof_predictions.csv")
    yt, fused, _, trows = load_predictions(kept / "test_predictions.csv")
    w = summary["fusion"]["weight"]
    _, features, _, frows = load_predictions(kept / "features" / "test_predictions.csv")
    if [r["case_id"] for r in frows] != [r["case_id"] for r in trows]:
        raise ValueError(f"{kept}: the descriptor model's test rows are not the ensemble's")
    cnn_test = (fused - w * features) / (1 - w)  # undo the run's own mixture: its calibrated TTA ensemble
    return ([r["case_id"] for r in rows], y, np.array([int(r["fold"]) for r in rows]), p,
            [r["case_id"] for r in trows], yt, cnn_test)


def fold_folders(folds_dir: Path, ids: list[str], labels: np.ndarray, folds: np.ndarray, test_ids: list[str]) -> CNN:
    """The fold folders' calibrated OOF and test ensemble, reordered to ``ids`` / ``test_ids``; refuses another split."""
    from medvox.cv.summary import load_predictions, rescale

    oof, fold_of, label_of, test = {}, {}, {}, []
    for k in range(int(folds.max()) + 1):
        fold = folds_dir / f"fold_{k}"
        t = json.loads((fold / "calibration.json").read_text())["temperature"]
        y, p, _, rows = load_predictions(fold / "val_predictions.csv")
        for r, yi, pi in zip(rows, y, rescale(p, t), strict=True):
            oof[r["case_id"]], fold_of[r["case_id"]], label_of[r["case_id"]] = pi, k, yi
        _, pt, _, trows = load_predictions(fold / "test_predictions.csv")
        order = {r["case_id"]: i for i, r in enumerate(trows)}
        test.append(rescale(pt, t)[[order[c] for c in test_ids]])
    same = sorted(oof) == sorted(ids) and all(
        fold_of[c] == f and label_of[c] == y for c, f, y in zip(ids, folds, labels, strict=True))
    if not same:
        raise ValueError(f"{folds_dir}: not the same CV split (cases, folds, labels) as the CPU run")
    return CNN(np.stack([oof[c] for c in ids]), np.mean(test, axis=0))


def descriptor_table(kept: Path, npz: Path) -> tuple[dict[str, int], np.ndarray]:
    """The 46 descriptors of every case of ``npz`` on its own grid (as ``medvox cv`` computes them), prepared
    with ``kept``'s data settings: (case id -> row, matrix)."""
    from medvox.config import from_dict
    from medvox.data import prepare
    from medvox.descriptors import feature_matrix

    cfg = from_dict(json.loads((kept / "fold_0" / "config.json").read_text()))
    data = dataclasses.replace(cfg.data, path=str(npz), target_shape=None, target_spacing=None, cache_dir=None)
    prepared = prepare(data, progress=False)
    _, x = feature_matrix(prepared.images, progress=True)
    return {c.id: i for i, c in enumerate(prepared.cases)}, x


def descriptors(table: tuple[dict[str, int], np.ndarray], ids: list[str], test_ids: list[str]):
    """The rows of :func:`descriptor_table` for the OOF and the test cases."""
    index, x = table
    return x[[index[c] for c in ids]], x[[index[c] for c in test_ids]]


def descriptor_probs(y, folds, x, xt) -> tuple[np.ndarray, np.ndarray]:
    """The descriptor model per fold, as ``medvox cv`` fits it: (OOF probabilities, mean of the folds' on test)."""
    from medvox.descriptors import fit_fold_models

    classes = [str(c) for c in range(int(np.max(y)) + 1)]
    p_oof, p_test, _ = fit_fold_models(x, y, folds, xt, [f"x{i}" for i in range(x.shape[1])], classes)
    return p_oof, p_test


def recipe_tail(y, folds, oof, yt, test, x, xt, fuse: bool) -> dict:
    """Steps 2-3 of the module docstring for one CNN: the fusion (when ``fuse``), the OOF threshold, test metrics."""
    from sklearn.metrics import roc_auc_score

    from medvox.descriptors import choose_weight
    from medvox.metrics.classification import best_threshold, compute_metrics

    w = 0.0
    if fuse:
        pf, pft = descriptor_probs(y, folds, x, xt)
        w, _ = choose_weight(y, oof, pf)
        oof, test = (1 - w) * oof + w * pf, (1 - w) * test + w * pft
    threshold = best_threshold(y, oof, "youden")
    m = compute_metrics(yt, test, threshold=threshold)
    return {"fusion_weight": w, "oof_auc": float(roc_auc_score(y, oof[:, 1])), "threshold": threshold,
            "test": {k: m[k] for k in ("auc", "accuracy", "balanced_accuracy", "f1")},
            "oracle_accuracy_at_ba": oracle_accuracy(yt, test)}


def oracle_accuracy(yt, test) -> float | None:
    """The best test ACC over thresholds chosen *on test* with balanced ACC >= ``TARGET_BA`` (a diagnosis only)."""
    from medvox.metrics.classification import compute_metrics

    at = [compute_metrics(yt, test, threshold=float(t)) for t in np.unique(test[:, 1])]
    ok = [a["accuracy"] for a in at if a["balanced_accuracy"] >= TARGET_BA]
    return max(ok) if ok else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-run", type=Path, required=True, help="a kept, fused `medvox cv --recipe auto` run (28^3 CNN)")
    ap.add_argument("--gpu-folds", type=Path, required=True, help="fold folders of the 64^3 CNN on the same split")
    ap.add_argument("--features-data", type=Path, default=DATA / "adrenalmnist3d_64.npz")
    ap.add_argument("--out", type=Path, required=True, help="JSON of the results")
    args = ap.parse_args(argv)

    ids, y, folds, cnn28, test_ids, yt, test28 = cpu_run(args.cpu_run)
    cnn64 = fold_folders(args.gpu_folds, ids, y, folds, test_ids)
    x, xt = descriptors(descriptor_table(args.cpu_run, args.features_data), ids, test_ids)
    cnns = {"28^3 CNN (the CPU recipe's)": CNN(cnn28, test28), "64^3 CNN (GPU, no TTA)": cnn64,
            "mean of the two": CNN((cnn28 + cnn64.oof) / 2, (test28 + cnn64.test) / 2)}
    results = {f"{name}{' + descriptors' if fuse else ''}": recipe_tail(y, folds, c.oof, yt, c.test, x, xt, fuse)
               for name, c in cnns.items() for fuse in (False, True)}
    doc = {"cpu_run": str(args.cpu_run), "gpu_folds": str(args.gpu_folds), "features_data": args.features_data.name,
           "n_oof": len(y), "n_test": len(yt), "results": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(results_table(results, "CNN", ("fusion weight", "fusion_weight", ".2f")))
    return 0


def results_table(results: dict[str, dict], first: str, extra: tuple[str, str, str]) -> str:
    """The Markdown table these diagnoses print: ``first`` (the row name), the ``extra`` column (header, key,
    format), OOF AUC, the test metrics at the OOF threshold and the oracle column."""
    header, key, spec = extra
    lines = [f"| {first} | {header} | OOF AUC | test AUC | ACC | balanced ACC | F1 | oracle ACC at balanced ACC "
             f">= {TARGET_BA} |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        t, oracle = r["test"], r["oracle_accuracy_at_ba"]
        lines.append(f"| {name} | {r[key]:{spec}} | {r['oof_auc']:.3f} | {t['auc']:.3f} | {t['accuracy']:.3f} | "
                     f"{t['balanced_accuracy']:.3f} | {t['f1']:.3f} | {'-' if oracle is None else f'{oracle:.3f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
