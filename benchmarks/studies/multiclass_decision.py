"""The multi-class decision (class weights chosen on out-of-fold predictions) on real volumes.

A one-off study, not tested: the run folders it reads were removed from the tree (they are in the git
history); ``benchmarks/studies/README.md`` says where, and ``multiclass_decision.json`` beside it holds the figures it
published.

No three-class 3D dataset is stored here, so this makes one from AdrenalMNIST3D's official splits: normal
(label 0, ~77 %), and the abnormal cases split at the median foreground size of the training split's abnormal
ones (small / large, ~11.5 % each). Then ``medvox cv --recipe auto`` (the default recipe: weighted CE, EMA, fold
ensemble with TTA and calibration, descriptor fusion) and a comparison on the test split of the decision the run
chose on its out-of-fold predictions (rule ``youden``: balanced accuracy) with the argmax of the same
probabilities, and with the weights the other rules (``f1``: macro F1, ``accuracy``) choose on the same
out-of-fold predictions. Nothing is chosen on test.

    python benchmarks/studies/multiclass_decision.py --out /tmp/mc [--epochs 12 --folds 3 --seed 0] [--reuse]

(``--epochs 0``: the recipe's own length instead of the shortened 12 epochs)

writes ``<out>/graded.npz``, the run under ``<out>/runs`` and ``<out>/multiclass_decision.json``; prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_NPZ = REPO.parent / "shared" / "data" / "medmnist" / "adrenalmnist3d.npz"
CLASSES = ("normal", "abnormal_small", "abnormal_large")


def make_graded(src: Path, out: Path) -> dict[str, list[int]]:
    """The three-class npz (labels 0/1/2 as above); returns the class counts per split."""
    data = np.load(src)
    size = {s: (data[f"{s}_images"] > 0).reshape(len(data[f"{s}_images"]), -1).sum(1) for s in ("train", "val", "test")}
    label = {s: data[f"{s}_labels"].reshape(-1) for s in size}
    cut = float(np.median(size["train"][label["train"] == 1]))
    graded = {s: np.where(label[s] == 0, 0, np.where(size[s] <= cut, 1, 2)) for s in size}
    np.savez(out, **{f"{s}_images": data[f"{s}_images"] for s in size},
             **{f"{s}_labels": graded[s][:, None] for s in size})
    return {s: np.bincount(graded[s], minlength=3).tolist() for s in size}


def scores(y: np.ndarray, probs: np.ndarray, cut) -> dict[str, float]:
    from medvox.metrics.classification import compute_metrics

    m = compute_metrics(y, probs, threshold=cut)
    return {k: round(float(m[k]), 4) for k in ("accuracy", "balanced_accuracy", "f1")} | {
        "recall": [round(float(m["per_class"][c]["sensitivity"]), 4) for c in m["class_names"]]}


def cv_command(npz: Path, runs: Path, epochs: int, folds: int, seed: int, threads: int) -> list[str]:
    """The ``medvox cv`` arguments of the study (``epochs`` 0: the recipe's own length)."""
    return ["cv", "--data", str(npz), "--output", str(runs), "--recipe", "auto", "--amp",
            *(["--epochs", str(epochs)] if epochs else []), "--folds", str(folds), "--seed", str(seed),
            "--threads", str(threads), "--plots", "final", "--set", "train.keep_last=false"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", type=Path, default=DEFAULT_NPZ, help="AdrenalMNIST3D (28^3 release)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=12,
                    help="per fold; 0: the recipe's own length (~2,600 optimizer steps: 40 epochs with 3 folds)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="analyse a finished run in --out again without training")
    args = ap.parse_args(argv)

    from medvox.cli import main as medvox
    from medvox.cv.summary import load_predictions
    from medvox.metrics.classification import best_class_weights

    args.out.mkdir(parents=True, exist_ok=True)
    npz = args.out / "graded.npz"
    counts = make_graded(args.npz, npz)
    print(f"classes {CLASSES}: counts per split {counts}", file=sys.stderr)
    start = time.perf_counter()
    command = cv_command(npz, args.out / "runs", args.epochs, args.folds, args.seed, args.threads)
    run = args.out / "runs" / "resnet18"
    if not (args.reuse and (run / "cv_summary.json").exists()) and medvox(command) != 0:
        return 1
    minutes = (time.perf_counter() - start) / 60
    previous = args.out / "multiclass_decision.json"
    if args.reuse and previous.exists():  # the training time of the run analysed
        minutes = json.loads(previous.read_text())["minutes"]
    summary = json.loads((run / "cv_summary.json").read_text())
    y, probs, _, _ = load_predictions(run / "test_predictions.csv")
    y_oof, p_oof, _, _ = load_predictions(run / "oof_fused_predictions.csv")  # calibrated, fused: what it chose on
    decisions = {"argmax": None, "youden (the run's)": summary["decision"]["class_weights"]}
    for rule in ("f1", "accuracy"):
        decisions[rule] = best_class_weights(y_oof, p_oof, rule=rule)
    result = {"command": "medvox " + " ".join(command), "counts": counts, "minutes": round(minutes, 1),
              "fusion_weight": (summary.get("fusion") or {}).get("weight"),
              "class_weights": decisions,
              "oof": {name: scores(y_oof, p_oof, cut) for name, cut in decisions.items()},
              "test": {name: scores(y, probs, cut) for name, cut in decisions.items()}}
    (args.out / "multiclass_decision.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| decision (weights chosen on OOF) | class weights | OOF balanced ACC | test ACC | test balanced ACC | "
          "test macro F1 | test recall per class |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, m in result["test"].items():
        w = decisions[name]
        print(f"| {name} | {'1 / 1 / 1' if w is None else ' / '.join(f'{v:.2f}' for v in w)} | "
              f"{result['oof'][name]['balanced_accuracy']:.3f} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | "
              f"{m['f1']:.3f} | {' / '.join(f'{r:.3f}' for r in m['recall'])} |")
    print(f"the run took {minutes:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
