"""A radiomics-style companion model and its late fusion with the CNN fold ensemble.

Small 3D datasets are where a handful of hand-made descriptors can rival a CNN: on AdrenalMNIST3D
(shape masks) a logistic regression on the descriptors below reaches the CNN's test AUC, and the two err
on different cases. :func:`volume_features` describes one preprocessed volume (one grid for every case, so
voxel units agree), per channel:

* first-order intensity statistics of the whole volume: mean, std, 5/25/50/75/95th percentiles,
  skewness, kurtosis;
* the foreground, ``x > t`` with ``t`` Otsu's threshold (for a binary mask: the mask itself): its
  fraction of the volume, mean and std of intensity, number of 26-connected components and the largest
  one's share, log voxel count, surface faces / volume^(2/3) (a sphericity measure), the principal-axis
  variances and their ratios, solidity (voxels / volume of the voxel centres' convex hull, capped at 1:
  compact shapes saturate, concave ones fall below), extent (volume / bounding box) and the
  box's sides, the share left after 1, 2 and 3 erosions, the Euclidean distance to the background (mean,
  std, 90th percentile, max, and the shares of voxels 1, 2, 3 and >= 4 voxels deep) and the mean chord
  length along each axis (also sorted, orientation-free): thickness, which a strided CNN stem sees poorly
  at 28^3;
  the centroid (fractions of the grid).

Which grid (:func:`feature_data`): by default (``train.feature_grid = "native"``) the plan's own grid, the
one the fingerprint picks when the user sets no ``data.target_shape`` / ``target_spacing``. The CNN's input
is often made coarser than that to save compute (28^3 from the 64^3 AdrenalMNIST3D release on a CPU), but
descriptors cost milliseconds per case and measure thickness and surface far better on the finer grid
(pooled OOF AUC of the mixture 0.866 at 28^3 vs 0.882 at 64^3 over 3 seeds). ``"input"`` uses the CNN's own
volumes. A native grid that differs from the CNN's is a second store in the cache; its plan is written to
``features/plan.json`` so that ``medvox predict`` preprocesses new cases for the descriptors the same way.

:func:`fit_fusion` fits ``StandardScaler + LogisticRegression`` on the same folds as the CNN (each fold's
model on the other folds' cases), so its out-of-fold predictions pair case by case with the CNN's; then
chooses the weight ``w`` of ``(1 - w) * p_cnn + w * p_features`` on the pooled, calibrated out-of-fold
predictions (on a grid of 0 to 1 by 0.05, the best AUC for two classes and the lowest log-loss for more, see
:func:`weight_criterion`; ``w = 0`` keeps the CNN alone) and applies it to
the test ensemble. The fitted models are written as JSON (scaler and coefficients, no pickle).

Example:
    >>> import numpy as np
    >>> cube = np.zeros((1, 12, 12, 12), np.float32); cube[0, 2:8, 2:8, 2:8] = 1
    >>> f = dict(zip(*volume_features(cube)))
    >>> round(float(np.exp(f["c0_fg_log_voxels"]))), float(f["c0_fg_components"]), float(f["c0_fg_solidity"])
    (216, 1.0, 1.0)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medvox.config import CHOICES
from medvox.machine import available_cpus

log = logging.getLogger("medvox")

WEIGHT_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)
FEATURE_C = 1.0  # inverse L2 strength of the logistic regression (standardised features)


def otsu_threshold(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``x`` (the cut that maximises the between-class variance of a histogram).

    Returns the upper edge of the chosen bin, so ``x > t`` splits, in the middle of the run of equally good
    cuts (for two separated modes: midway across the gap, not at the lower mode's edge); ``x.max()`` for a
    constant array.

    Example:
        >>> x = np.array([0.0] * 90 + [1.0] * 10)
        >>> t = otsu_threshold(x); 0.0 <= t < 1.0
        True
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return hi
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1]
    w1 = counts.sum() - w0
    m0 = np.cumsum(counts * centers)[:-1]
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (np.sum(counts * centers) - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    run = best[: np.argmax(np.diff(np.append(best, best[-1] + 2)) > 1) + 1]  # the first run of best cuts
    return float(edges[1:-1][run[len(run) // 2]])


def _first_order(x: np.ndarray) -> dict[str, float]:
    from scipy import stats

    x = x.ravel()
    p = np.percentile(x, [5, 25, 50, 75, 95])
    flat = x.std() == 0
    return {"mean": float(x.mean()), "std": float(x.std()), "p05": p[0], "p25": p[1], "p50": p[2], "p75": p[3],
            "p95": p[4], "skew": 0.0 if flat else float(stats.skew(x)), "kurtosis": 0.0 if flat else float(stats.kurtosis(x))}


SHAPE_NAMES = ("fraction", "mean", "std", "components", "largest_share", "log_voxels", "surface_ratio", "axis0",
               "axis1", "axis2", "axis_ratio_10", "axis_ratio_20", "solidity", "extent", "box0", "box1", "box2",
               "eroded1", "eroded2", "eroded3", "dist_mean", "dist_std", "dist_p90", "dist_max", "dist_share1",
               "dist_share2", "dist_share3", "dist_share4plus", "chord0", "chord1", "chord2", "chord_min",
               "chord_mid", "chord_max", "centroid0", "centroid1", "centroid2")


def _shape(x: np.ndarray) -> dict[str, float]:
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    m = x > otsu_threshold(x)
    n = int(m.sum())
    if n < 4:  # nothing to describe: an empty (or near-empty) foreground
        return dict.fromkeys(SHAPE_NAMES, 0.0)
    fg = x[m]
    lab, ncomp = ndimage.label(m, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(lab.ravel())[1:]
    idx = np.argwhere(m).astype(np.float64)
    centroid = idx.mean(0)
    ev = np.sort(np.linalg.eigvalsh(np.cov((idx - centroid).T)))[::-1]
    padded = np.pad(m, 1).astype(np.int8)
    faces = sum(int(np.abs(np.diff(padded, axis=a)).sum()) for a in range(3))
    peeled = [m]  # the mask eroded 0, 1, 2, 3 times (an erosion of the last: iterations=k without repeats)
    for _ in range(3):
        peeled.append(ndimage.binary_erosion(peeled[-1]))
    surface = idx[(m & ~peeled[1])[m]]  # the hull of the boundary voxels is the hull of all
    try:
        hull = ConvexHull(surface).volume
    except (QhullError, ValueError):  # flat or degenerate foreground
        hull = float(n)
    box = idx.max(0) - idx.min(0) + 1
    dist = ndimage.distance_transform_edt(m)[m]
    eroded = [e.sum() / n for e in peeled[1:]]
    layer = np.floor(dist)
    # mean chord length along each axis: foreground voxels / runs of foreground along that axis
    chords = [n / max(int((np.diff(padded, axis=a) == 1).sum()), 1) for a in range(3)]
    return {"fraction": n / m.size, "mean": float(fg.mean()), "std": float(fg.std()), "components": float(ncomp),
            "largest_share": sizes.max() / n, "log_voxels": float(np.log(n)), "surface_ratio": faces / n ** (2 / 3),
            "axis0": ev[0], "axis1": ev[1], "axis2": ev[2], "axis_ratio_10": ev[1] / max(ev[0], 1e-12),
            "axis_ratio_20": ev[2] / max(ev[0], 1e-12), "solidity": min(n / max(hull, 1.0), 1.0),
            "extent": n / float(np.prod(box)), "box0": box[0], "box1": box[1], "box2": box[2],
            "eroded1": eroded[0], "eroded2": eroded[1], "eroded3": eroded[2], "dist_mean": float(dist.mean()),
            "dist_std": float(dist.std()), "dist_p90": float(np.percentile(dist, 90)), "dist_max": float(dist.max()),
            "dist_share1": float(np.mean(layer == 1)), "dist_share2": float(np.mean(layer == 2)),
            "dist_share3": float(np.mean(layer == 3)), "dist_share4plus": float(np.mean(dist >= 4)),
            "chord0": chords[0], "chord1": chords[1], "chord2": chords[2], **dict(zip(
                ("chord_min", "chord_mid", "chord_max"), sorted(chords), strict=True)),
            "centroid0": centroid[0] / m.shape[0], "centroid1": centroid[1] / m.shape[1],
            "centroid2": centroid[2] / m.shape[2]}


def volume_features(volume: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(names, values) of the descriptors of one ``(C, D, H, W)`` (or ``(D, H, W)``) volume."""
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4:
        raise ValueError(f"expected a (C, D, H, W) or (D, H, W) volume, got shape {v.shape}")
    names, values = [], []
    for c in range(v.shape[0]):
        for group, feats in (("", _first_order(v[c])), ("fg_", _shape(v[c]))):
            for k, val in feats.items():
                names.append(f"c{c}_{group}{k}")
                values.append(float(val))
    return names, np.asarray(values, dtype=np.float64)


def feature_matrix(images, progress: bool = True, workers: int | None = None) -> tuple[list[str], np.ndarray]:
    """(names, ``(N, F)`` matrix) of :func:`volume_features` for every volume of ``images``.

    ``workers`` threads (default: one per core) compute the volumes side by side: the descriptors are NumPy /
    SciPy array work that releases the GIL (2.1x on 2 cores for 64^3 volumes, ~67 ms each on one), and
    threads need no copy of a memory-mapped store. The matrix does not depend on ``workers``."""
    from concurrent.futures import ThreadPoolExecutor

    from medvox.data.inspection import progress_bar

    n = len(images)
    workers = max(1, min(workers or available_cpus(), n or 1))
    done = []
    with progress_bar(progress and n > 0) as bar, ThreadPoolExecutor(workers) as pool:
        task = bar.add_task("features", total=n)
        for result in pool.map(lambda i: volume_features(images[i]), range(n)):  # in order
            done.append(result)
            bar.advance(task)
    if not done:
        return [], np.zeros((0, 0))
    return done[0][0], np.stack([vals for _, vals in done])


def make_feature_model(seed: int = 0):
    """``StandardScaler`` + L2 ``LogisticRegression`` (multinomial for more than two classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=FEATURE_C, max_iter=5000, random_state=seed))


def model_to_json(model, names: list[str], classes: list[str]) -> dict[str, Any]:
    """A fitted :func:`make_feature_model` as plain numbers (no pickle)."""
    scaler, lr = model[0], model[-1]
    return {"features": names, "classes": classes, "model_classes": [int(c) for c in lr.classes_],
            "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(),
            "coef": lr.coef_.tolist(), "intercept": lr.intercept_.tolist()}


def predict_json(doc: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """``(N, K)`` class probabilities from a :func:`model_to_json` document (same as the fitted model's)."""
    z = (np.asarray(x, dtype=np.float64) - np.asarray(doc["mean"])) / np.asarray(doc["scale"])
    logits = z @ np.asarray(doc["coef"]).T + np.asarray(doc["intercept"])
    k = len(doc["classes"])
    if logits.shape[1] == 1:  # binary: one decision function for the second class
        p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        part = np.stack([1 - p1, p1], axis=1)
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        part = e / e.sum(axis=1, keepdims=True)
    out = np.zeros((len(z), k))
    out[:, doc["model_classes"]] = part  # a fold that lacked a class gives it probability 0
    return out


def weight_criterion(n_classes: int) -> str:
    """What the fusion weight optimises: the pooled OOF AUC for two classes (the OOF-chosen threshold then
    sets the decisions), the pooled OOF log-loss for more (decisions are the mixture's argmax, and a nearly
    constant CNN barely moves the macro AUC of any mixture: on three size grades with a two-epoch CNN, AUC
    chose w = 0.2, OOF accuracy 0.71; log-loss w = 1.0, accuracy 0.83)."""
    return "auc" if n_classes == 2 else "log_loss"


def choose_weight(labels: np.ndarray, cnn: np.ndarray, features: np.ndarray) -> tuple[float, list[dict]]:
    """The feature model's weight ``w`` in ``(1 - w) * cnn + w * features`` with the best pooled score of
    :func:`weight_criterion` (highest AUC for two classes, lowest log-loss for more; ties: the smaller ``w``),
    and both scores of every weight tried.

    Example:
        >>> y = np.array([0, 1, 2, 0, 1, 2])
        >>> flat = np.full((6, 3), 1 / 3)  # a CNN that has learnt nothing
        >>> sharp = np.eye(3)[y] * 0.8 + 0.2 / 3
        >>> choose_weight(y, flat, sharp)[0]  # macro AUC is 1.0 from w = 0.05 on; log-loss is lowest at w = 1
        1.0
    """
    from medvox.metrics.classification import compute_metrics

    rows = np.arange(len(labels))
    curve = []
    for w in WEIGHT_GRID:
        mixed = mix(cnn, features, w)
        log_loss = float(-np.mean(np.log(np.clip(mixed[rows, labels], 1e-12, None))))
        curve.append({"weight": float(w), "auc": compute_metrics(labels, mixed)["auc"], "log_loss": log_loss})
    if weight_criterion(cnn.shape[1]) == "log_loss":
        best = min(curve, key=lambda c: (round(c["log_loss"], 12), c["weight"]))
        return best["weight"], curve
    scored = [c for c in curve if c["auc"] is not None]
    if not scored:
        return 0.0, curve
    best = max(scored, key=lambda c: (round(c["auc"], 12), -c["weight"]))
    return best["weight"], curve


def fusion_scores(fusion: dict[str, Any], features: str = "features") -> str:
    """The pooled OOF scores of a fusion record, the chosen criterion's first (AUC when it records no
    criterion); ``features`` names the descriptor model.

    Example:
        >>> fusion_scores({"oof_auc": {"cnn": 0.856, "features": 0.85, "fused": 0.878}})
        'AUC: CNN 0.856, features 0.850, fused 0.878'
        >>> fusion_scores({"criterion": "log_loss", "oof_auc": {"cnn": 0.6, "features": 0.9, "fused": 0.9},
        ...                "oof_log_loss": {"cnn": 1.05, "features": 0.4, "fused": 0.35}})
        'log-loss: CNN 1.050, features 0.400, fused 0.350; AUC: CNN 0.600, features 0.900, fused 0.900'
    """
    def part(name: str, scores: dict) -> str:
        return f"{name}: " + ", ".join(f"{label} {float('nan') if scores.get(k) is None else scores[k]:.3f}"
                                       for k, label in (("cnn", "CNN"), ("features", features), ("fused", "fused")))

    auc = part("AUC", fusion["oof_auc"])
    if fusion.get("criterion") == "log_loss":
        return f"{part('log-loss', fusion['oof_log_loss'])}; {auc}"
    return auc


FEATURE_GRIDS = CHOICES["train.feature_grid"]


def feature_data(cfg, prepared, grid: str = "native", progress: bool = True):
    """The prepared dataset the descriptors are computed on: ``prepared`` itself for ``grid="input"`` or when
    the plan's native grid is the CNN's; else the same cases prepared at the native grid (``cfg`` without
    its ``target_shape`` / ``target_spacing``; cached like any plan)."""
    import dataclasses

    from medvox.data import prepare

    if grid not in FEATURE_GRIDS:
        raise ValueError(f"unknown train.feature_grid {grid!r}: use {' or '.join(FEATURE_GRIDS)}")
    if grid == "input" or (not cfg.target_shape and not cfg.target_spacing):
        return prepared
    native = prepare(dataclasses.replace(cfg, target_shape=None, target_spacing=None), progress=progress)
    if native.plan == prepared.plan:
        return prepared
    log.info("descriptors on the native grid %s (%s mm); the CNN's input is %s",
             "x".join(map(str, native.plan["target_shape"])), " x ".join(f"{v:g}" for v in native.plan["target_spacing"]),
             "x".join(map(str, prepared.plan["target_shape"])))
    return native


def fit_fold_models(x_oof: np.ndarray, labels: np.ndarray, folds: np.ndarray, x_test: np.ndarray, names: list[str],
                    classes: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """The feature model of each fold, fitted on the other folds' cases: (OOF probabilities ``(N, K)``, the fold
    models' mean on ``x_test`` ``(M, K)``, ``{fold: model_to_json document}``)."""
    p_oof = np.zeros((len(x_oof), len(classes)))
    p_test = np.zeros((len(x_test), len(classes)))
    ks = sorted(int(f) for f in np.unique(folds))
    docs = {}
    for f in ks:
        train, val = folds != f, folds == f
        docs[f] = model_to_json(make_feature_model(seed).fit(x_oof[train], labels[train]), names, classes)
        p_oof[val] = predict_json(docs[f], x_oof[val])
        if len(x_test):
            p_test += predict_json(docs[f], x_test) / len(ks)
    return p_oof, p_test, docs


def fit_fusion(run_dir: Path, prepared, oof_ids: list[str], oof_folds: np.ndarray, oof_labels: np.ndarray,
               oof_cnn: np.ndarray, progress: bool = True, seed: int = 0, features_from=None) -> dict[str, Any]:
    """Fit the feature model per fold and choose the fusion weight on the out-of-fold predictions.

    Args:
        run_dir: the CV run; writes ``features/`` (``oof_predictions.csv``, ``test_predictions.csv``,
            ``fold_<k>.json`` models, ``fusion.json``).
        prepared: the :class:`~medvox.data.Prepared` dataset of the run.
        oof_ids, oof_folds, oof_labels, oof_cnn: the CNN's pooled OOF cases (ids, fold, label index) and
            calibrated probabilities, in one order.
        features_from: the same cases on the grid the descriptors are computed on (:func:`feature_data`);
            None: ``prepared``.

    Returns:
        ``{"weight", "curve", "oof_auc": {"cnn", "features", "fused"}, "oof": fused OOF (N, K),
        "test_features": (M, K) or None, "test_ids"}``.
    """
    from medvox.metrics.decision import Decision
    from medvox.run import write_json, write_predictions

    out_dir = Path(run_dir) / "features"
    out_dir.mkdir(parents=True, exist_ok=True)
    src = prepared if features_from is None else features_from
    index = {c.id: i for i, c in enumerate(src.cases)}
    test_rows = np.sort(np.asarray(prepared.test_idx, dtype=np.int64))  # the order of the CNN's test ensemble
    test_ids = [prepared.cases[i].id for i in test_rows]
    missing = [cid for cid in [*oof_ids, *test_ids] if cid not in index]
    if missing:
        raise ValueError(f"{len(missing)} case(s) of {run_dir} are not in the prepared data "
                         f"(first: {missing[0]}): was the run trained on other data?")
    all_rows = np.array([index[cid] for cid in [*oof_ids, *test_ids]], dtype=np.int64)
    names, x_all = feature_matrix(_Rows(src.images, all_rows), progress=progress)
    x_oof, x_test = x_all[: len(oof_ids)], x_all[len(oof_ids):]
    (out_dir / "plan.json").unlink(missing_ok=True)
    if src is not prepared:
        write_json(out_dir / "plan.json", src.plan)
    classes = list(prepared.classes)
    p_oof, p_test, docs = fit_fold_models(x_oof, oof_labels, oof_folds, x_test, names, classes, seed)
    for f, doc in docs.items():
        write_json(out_dir / f"fold_{f}.json", doc)
    groups = [src.cases[index[cid]].group for cid in oof_ids]
    why = "the descriptor model alone (its fold models' out-of-fold probabilities; the run decides on the mixture)"
    write_predictions(out_dir / "oof_predictions.csv", list(oof_ids), groups, oof_labels, p_oof, classes,
                      Decision.argmax(classes, why))
    if len(test_rows):
        write_predictions(out_dir / "test_predictions.csv", test_ids, [prepared.cases[i].group for i in test_rows],
                          prepared.labels[test_rows], p_test, classes, Decision.argmax(classes, why))
    weight, curve = choose_weight(oof_labels, oof_cnn, p_oof)
    fused = mix(oof_cnn, p_oof, weight)
    criterion = weight_criterion(len(classes))
    # the curve holds both scores of the CNN alone (w = 0), the descriptors alone (w = 1) and the chosen mixture
    ends = {"cnn": curve[0], "features": curve[-1], "fused": next(c for c in curve if c["weight"] == weight)}
    auc = {name: c["auc"] for name, c in ends.items()}
    log_loss = {name: c["log_loss"] for name, c in ends.items()}
    doc = {"weight": weight, "criterion": criterion, "oof_log_loss": log_loss,
           "chosen_on": "pooled out-of-fold predictions (CNN per-fold calibrated), "
                        + {"auc": "best AUC", "log_loss": "lowest log-loss"}[criterion],
           "model": f"StandardScaler + LogisticRegression(C={FEATURE_C}) on {len(names)} descriptors",
           "oof_auc": auc, "curve": curve, "n_features": len(names),
           "grid": {"target_shape": list(src.plan["target_shape"]), "target_spacing": list(src.plan["target_spacing"]),
                    "same_as_input": src is prepared}}
    write_json(out_dir / "fusion.json", doc)
    log.info("feature fusion: weight %.2f of the feature model (OOF %s)", weight, fusion_scores(doc))
    return {**doc, "oof": fused, "test_features": p_test if len(test_rows) else None, "test_ids": test_ids}


class _Rows:
    """Rows ``rows`` of a (memory-mapped) array, read one at a time."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.array[self.rows[i]])


def load_fusion(run_dir: Path) -> dict[str, Any] | None:
    """``{"weight", "models": [fold documents], "plan"}`` from a run's ``features/`` folder (``plan``: the
    preprocessing plan of the descriptors' grid, None when it is the CNN's), or None when the run was not
    fused (or its weight is 0)."""
    folder = Path(run_dir) / "features"
    path = folder / "fusion.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    models = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("fold_*.json"))]
    if not doc.get("weight") or not models:
        return None
    plan = json.loads((folder / "plan.json").read_text(encoding="utf-8")) if (folder / "plan.json").is_file() else None
    return {"weight": float(doc["weight"]), "models": models, "plan": plan}


def mix(cnn: np.ndarray, features: np.ndarray, weight: float) -> np.ndarray:
    """The fused probabilities ``(1 - weight) * cnn + weight * features``."""
    return (1 - weight) * np.asarray(cnn) + weight * np.asarray(features)


def fuse_probs(fusion: dict[str, Any], cnn: np.ndarray, volumes: np.ndarray) -> np.ndarray:
    """``(1 - w) * cnn + w * p_features``: the fold feature models' mean on ``volumes`` (N, C, D, H, W), which
    the caller has preprocessed with ``fusion["plan"]`` when there is one (else with the CNN's plan)."""
    names, x = feature_matrix(volumes, progress=False)
    models = fusion["models"]
    if names != models[0]["features"]:
        raise ValueError("the volumes' descriptors differ from those the feature model was fitted on "
                         f"({len(names)} vs {len(models[0]['features'])}): other channels?")
    p = np.mean([predict_json(m, x) for m in models], axis=0)
    return mix(cnn, p, fusion["weight"])
