"""What the descriptor fusion costs on data whose descriptors say nothing about the label.

A one-off study, not tested: the run folders it reads were removed from the tree (they are in the git
history); ``benchmarks/studies/README.md`` says where, and ``fusion_noise.json`` beside it holds the figures it
published.

``medvox cv --recipe auto`` mixes a descriptor model into the CNN at the weight with the best pooled OOF AUC
(``medvox.descriptors.choose_weight``). On AdrenalMNIST3D the descriptors carry the thickness the CNN's
28^3 input blurs (+0.03 test AUC), but the recipe is meant for any dataset, where they may be noise. This
script takes finished runs of the default recipe (their calibrated OOF and CNN test ensembles, as
``benchmarks/studies/cnn64_fusion.py`` reads them), replaces the descriptors by those of randomly permuted cases (same
distribution, no relation to the labels), refits the descriptor model on the same folds, lets the recipe choose
its weight on OOF, and reports the weight chosen and the change in test AUC against the CNN alone.

Usage::

    python benchmarks/studies/fusion_noise.py benchmarks/accuracy_runs/cpu_2026-11-26-auto64aa/kept/auto64aa_s0 \
        benchmarks/accuracy_runs/cpu_2026-11-27-auto64aa1/kept/auto64aa_s1 \
        benchmarks/accuracy_runs/cpu_2026-11-27-auto64aa2/kept/auto64aa_s2 \
        --trials 10 --out benchmarks/accuracy_runs/cpu_2026-11-27-auto64aa2/fusion_noise.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.studies import cnn64_fusion as cf  # noqa: E402


def permuted_trial(y, folds, oof, yt, test, x, xt, seed: int) -> dict:
    """One trial: descriptors of permuted cases, the descriptor model per fold, the OOF-chosen weight."""
    from sklearn.metrics import roc_auc_score

    from medvox.descriptors import choose_weight

    rng = np.random.default_rng(seed)
    pf, pft = cf.descriptor_probs(y, folds, x[rng.permutation(len(x))], xt[rng.permutation(len(xt))])
    w, curve = choose_weight(y, oof, pf)
    fused = (1 - w) * test + w * pft
    chosen = next(c for c in curve if c["weight"] == w)
    return {"seed": seed, "weight": w, "oof_auc_gain": chosen["auc"] - curve[0]["auc"],
            "test_auc_change": float(roc_auc_score(yt, fused[:, 1]) - roc_auc_score(yt, test[:, 1]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="kept, fused `medvox cv --recipe auto` runs")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--features-data", type=Path, default=cf.DATA / "adrenalmnist3d_64.npz")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    table = cf.descriptor_table(args.runs[0], args.features_data)  # the same cases in every run (other splits)
    results = {}
    for run in args.runs:
        ids, y, folds, oof, test_ids, yt, test = cf.cpu_run(run)
        x, xt = cf.descriptors(table, ids, test_ids)
        trials = [permuted_trial(y, folds, oof, yt, test, x, xt, seed) for seed in range(args.trials)]
        results[run.name] = trials
        ws, dt = [t["weight"] for t in trials], [t["test_auc_change"] for t in trials]
        print(f"{run.name}: weights {' '.join(f'{w:.2f}' for w in ws)}; test AUC change mean {np.mean(dt):+.4f}, "
              f"worst {min(dt):+.4f}", file=sys.stderr)
    every = [t for trials in results.values() for t in trials]
    summary = {"trials": len(every), "weight_zero": sum(t["weight"] == 0 for t in every),
               "weight_max": max(t["weight"] for t in every),
               "test_auc_change_mean": float(np.mean([t["test_auc_change"] for t in every])),
               "test_auc_change_worst": min(t["test_auc_change"] for t in every)}
    args.out.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
