"""Does averaging several runs of the default recipe (other CV splits, other seeds) improve the ranking?

A one-off study, not tested: the run folders it reads were removed from the tree (they are in the git
history); ``benchmarks/studies/README.md`` says where, and ``seed_ensemble.json`` beside it holds the figures it
published.

Issue 8's accuracy target needs a better ranking than one run of the default recipe gives (no threshold reaches
ACC >= 0.87 with balanced ACC >= 0.82 on its test predictions, see ``accuracy_notes.md``). If what limits a run
were the variance of its models, more of them would help. This script takes finished, fused ``medvox cv --recipe
auto`` runs on the same data (each run: 5 CNNs with TTA, per-fold calibration, the descriptor model, the fused
OOF and test probabilities it wrote) and averages them per case:

- OOF: every case has an out-of-fold probability in every run (from a model that did not train on it), so the
  mean over runs is still an out-of-fold prediction of the averaged ensemble;
- test: the mean of the runs' final (fused) test probabilities.

Then the recipe's own decision: the Youden threshold on the pooled (averaged) OOF probabilities, and test AUC,
ACC, balanced ACC and F1 at it; each run alone goes through the same steps (and reproduces its own summary).
The ``oracle`` column is the best test ACC over thresholds chosen *on test* with balanced ACC >= 0.82, a
diagnosis of the ranking only. The averaged ensemble costs one recipe's time per run (72-128 min each here), so
it is a diagnosis, not a candidate for the 2-hour recipe.

Usage::

    python benchmarks/studies/seed_ensemble.py benchmarks/accuracy_runs/cpu_2026-11-26-auto64aa/kept/auto64aa_s0 \\
        benchmarks/accuracy_runs/cpu_2026-11-27-auto64aa1/kept/auto64aa_s1 \\
        benchmarks/accuracy_runs/cpu_2026-11-27-auto64aa2/kept/auto64aa_s2 \\
        benchmarks/accuracy_runs/cpu_2026-11-27-auto64aa3/kept/auto64aa_s3 \\
        --out benchmarks/accuracy_runs/cpu_2026-11-27-auto64aa3/seed_ensemble.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.studies import cnn64_fusion as cf  # noqa: E402


def fused_run(kept: Path) -> tuple[dict[str, tuple[int, np.ndarray]], dict[str, tuple[int, np.ndarray]]]:
    """A fused run's final OOF and test probabilities: ``{case_id: (label, probabilities)}`` each."""
    from medvox.cv.summary import load_predictions

    out = []
    for name in ("oof_fused_predictions.csv", "test_predictions.csv"):
        y, p, _, rows = load_predictions(kept / name)
        out.append({r["case_id"]: (int(yi), pi) for r, yi, pi in zip(rows, y, p, strict=True)})
    return out[0], out[1]


def average(runs: list[dict[str, tuple[int, np.ndarray]]], what: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(case ids, labels, mean probabilities) over runs; refuses runs on different cases or labels."""
    ids = sorted(runs[0])
    for i, r in enumerate(runs[1:], 1):
        if sorted(r) != ids:
            raise ValueError(f"run {i} has other {what} cases than run 0: not the same data")
        if any(r[c][0] != runs[0][c][0] for c in ids):
            raise ValueError(f"run {i} labels some {what} cases differently from run 0: not the same data")
    y = np.array([runs[0][c][0] for c in ids])
    return ids, y, np.mean([np.stack([r[c][1] for c in ids]) for r in runs], axis=0)


def evaluate(runs: list[tuple[dict, dict]]) -> dict:
    """The recipe's decision on the averaged OOF, applied to the averaged test probabilities."""
    from sklearn.metrics import roc_auc_score

    from medvox.metrics.classification import best_threshold, compute_metrics

    _, y, oof = average([r[0] for r in runs], "OOF")
    _, yt, test = average([r[1] for r in runs], "test")
    threshold = best_threshold(y, oof, "youden")
    m = compute_metrics(yt, test, threshold=threshold)
    return {"runs": len(runs), "oof_auc": float(roc_auc_score(y, oof[:, 1])), "threshold": threshold,
            "test": {k: m[k] for k in ("auc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")},
            "oracle_accuracy_at_ba": cf.oracle_accuracy(yt, test)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="kept, fused `medvox cv --recipe auto` runs on the same data")
    ap.add_argument("--out", type=Path, required=True, help="JSON of the results")
    args = ap.parse_args(argv)

    loaded = [fused_run(r) for r in args.runs]
    results = {r.name: evaluate([one]) for r, one in zip(args.runs, loaded, strict=True)}
    results[f"mean of the {len(loaded)} runs"] = evaluate(loaded)
    args.out.write_text(json.dumps({"runs": [str(r) for r in args.runs], "results": results}, indent=2) + "\n")
    print(cf.results_table(results, "ensemble", ("OOF threshold", "threshold", ".3f")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
