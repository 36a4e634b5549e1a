"""The Predictor: a trained run (or one fold) rebuilt from its folder alone, and its predictions.

It returns, for each case, the raw probabilities (the fold members' mean softmax), the calibrated ones
(each member at its own temperature), the fused ones where the run has a descriptor model, the
probabilities the run's decision applies to, and the decided label: every consumer (``medvox predict``,
``explain``, ``export``, the cv test ensemble) gets its numbers here.

An input is preprocessed as the run's training data was (the plan stored in the checkpoints): a file as
:func:`medvox.data.io.read_image` reads it, an array with its NIfTI affine through the same reorientation
(:func:`medvox.data.io.from_array`), an array with its voxel spacing in the axis order it is given in.

Before that, every input goes through ``medvox check``'s per-case checks (:func:`medvox.data.inspection.
inspect_volumes`, the same messages): what check refuses (a constant volume, NaN voxels) is not predicted, and
what it warns about is reported; so is a spacing, shape, field of view or intensity outside the range of the
run's training cases (the plan's ``input_range``, :func:`medvox.data.fingerprint.range_warnings`).

Example:
    >>> p = Predictor.from_run("results/resnet50")                       # doctest: +SKIP
    >>> img = nibabel.load("ct_001.nii.gz")                              # doctest: +SKIP
    >>> out = p.predict(img.get_fdata(), affine=img.affine)              # doctest: +SKIP
    >>> out.label, out.probs[0]                                          # doctest: +SKIP
    ('malignant', array([0.21, 0.79]))
    >>> p.predict(volume_zyx, spacing=(2.5, 0.8, 0.8), axes="zyx")       # doctest: +SKIP
    >>> [r.prediction.label for r in p.predict_files(["a.nii.gz", "b.nii.gz"])]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvox.data import io as image_io
from medvox.data.fingerprint import range_warnings
from medvox.data.inspection import inspect_volumes, progress_bar, record_warnings
from medvox.data.preprocess import preprocess_volume, read_case
from medvox.data.sources import Case, cases_from_paths
from medvox.descriptors import fuse_probs, mix
from medvox.errors import DataError
from medvox.inference.models import LoadedModel, inference_device, load_model, predict_logits
from medvox.metrics.decision import Decision
from medvox.run import BEST, BEST_EMA, METRICS, Run, RunError, read_json

log = logging.getLogger("medvox")


@dataclass
class Prediction:
    """Predictions of ``N`` cases.

    Attributes:
        raw: ``(N, K)`` the members' mean softmax, without temperatures.
        calibrated: ``(N, K)`` the members' mean softmax, each at its own temperature.
        fused: ``(N, K)`` the calibrated probabilities mixed with the descriptor model's, or None.
        probs: ``(N, K)`` the probabilities ``decision`` applies to (one of the three).
        per_member: ``(M, N, K)`` each member's probabilities (calibrated when ``probs`` are).
        decision: the decision ``labels`` follow from.
        labels: ``N`` class names.
    """

    raw: np.ndarray
    calibrated: np.ndarray
    fused: np.ndarray | None
    probs: np.ndarray
    per_member: np.ndarray
    decision: Decision
    classes: list[str]

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, index: int | slice) -> Prediction:
        """The prediction of case ``index`` (or of a slice of cases)."""
        pick = slice(index, index + 1) if isinstance(index, (int, np.integer)) else index
        return Prediction(self.raw[pick], self.calibrated[pick], None if self.fused is None else self.fused[pick],
                          self.probs[pick], self.per_member[:, pick], self.decision, self.classes)

    @property
    def labels(self) -> list[str]:
        return self.decision.labels(self.probs)

    @property
    def label(self) -> str:
        """The label of a single case."""
        if len(self.probs) != 1:
            raise ValueError(f"label is for one case; this prediction holds {len(self.probs)} (use labels)")
        return self.labels[0]

    @property
    def spread(self) -> np.ndarray:
        """``(N,)`` the members' standard deviation of the decided class's probability."""
        pred = self.decision.apply(self.probs)
        return self.per_member[:, np.arange(len(pred)), pred].std(0)


@dataclass
class CaseResult:
    """What became of one input of :meth:`Predictor.predict_cases` / :meth:`Predictor.predict_files`.

    Attributes:
        case: the input (its ``id``, ``file``, ``group`` and label when a manifest gave one).
        prediction: its :class:`Prediction` (one case), or None when it could not be read or preprocessed, or
            ``medvox check`` refuses it.
        error: why not, in one line (None when predicted).
        warnings: what is odd about the input, one short text each: a spacing, shape, field of view or
            intensity outside the training cases' range (``"spacing_z 10 mm > train max 3 mm"``), and
            ``medvox check``'s warnings (extreme anisotropy or shape, a sheared grid).
    """

    case: Case
    prediction: Prediction | None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.prediction is not None


class Predictor:
    """A run's fold ensemble (or one fold), its temperatures, descriptor model and decision.

    Build with :meth:`from_run` (a run folder, a fold folder or a checkpoint file).

    Args:
        run: the run (None for a checkpoint file on its own).
        models: the members, with their temperatures.
        decision: how probabilities become a class (its ``probabilities`` say which ones).
        calibrated: the members' temperatures are applied to what is decided and fused (``Prediction.calibrated``
            holds the temperature-scaled probabilities either way).
        tta: average test-time augmented views.
        fusion: the run's descriptor model (:attr:`medvox.run.Run.fusion`), or None.
        batch_size: volumes per forward pass (and per chunk read by :meth:`predict_cases`).
        missing: why members of the run are left out (``allow_missing``), one line each.
        source: the folder or file the predictor was built from (default: the run's folder).
    """

    def __init__(self, run: Run | None, models: list[LoadedModel], decision: Decision, calibrated: bool = True,
                 tta: bool = False, fusion: dict[str, Any] | None = None, batch_size: int = 8,
                 missing: Sequence[str] = (), source: str | Path | None = None):
        where = source or (run.path if run is not None else "the predictor")
        if not models:
            raise RunError(f"{where}: no model to predict with")
        plan = models[0].plan
        for m in models[1:]:
            if m.plan != plan:
                raise RunError(f"the members of {where} were trained with different preprocessing plans "
                               f"({models[0].path} vs {m.path})")
            if list(m.classes) != list(models[0].classes):
                raise RunError(f"the members of {where} have different classes ({models[0].path}: "
                               f"{models[0].classes}, {m.path}: {m.classes})")
        classes = list(models[0].classes)
        if list(decision.classes) != classes:
            if not decision.is_argmax:
                raise RunError(f"{where}: the decision is over classes {list(decision.classes)}, the models "
                               f"predict {classes}")
            decision = Decision.argmax(classes, decision.fitted_on, decision.probabilities)
        self.run, self.models, self.decision = run, models, decision
        self.calibrated, self.tta, self.fusion, self.batch_size = calibrated, tta, fusion, batch_size
        self.plan, self.classes = plan, classes
        # the training cases' spacing, shape, field of view and intensity range (None: a plan from before it)
        self.input_range: dict[str, Any] | None = plan.get("input_range")
        self.missing = list(missing)
        self.source = Path(where)

    @classmethod
    def from_run(cls, path: str | Path, fold: int | None = None, tta: bool = False, device: Any = None,
                 calibrated: bool = True, argmax: bool = False, allow_missing: bool = False,
                 batch_size: int = 8) -> Predictor:
        """The predictor of a run folder (every fold's final weights), of ``<run>/fold_<fold>``, of a fold
        folder, or of one checkpoint file (:meth:`from_checkpoint`).

        Args:
            path: a ``medvox cv`` run folder, a fold folder, or a ``.pt`` checkpoint.
            fold: one fold of a run folder instead of the ensemble (its own validation decision).
            tta: average flipped / shifted views.
            device: ``"cpu"``, ``"cuda"``, a ``torch.device``; None: the CPU.
            calibrated: apply the temperatures (the run's decision was chosen on calibrated probabilities;
                ``False`` decides on the raw ones: by a fold's own validation decision, which was chosen on
                them, else by the argmax).
            argmax: decide by the most probable class instead of the run's decision.
            allow_missing: predict with the folds whose final checkpoint is there when some is missing, by
                the argmax (the run's decision belongs to the full ensemble); a warning names what is missing.

        Raises:
            RunError: the folder is not a finished run / fold, or a member is missing (unless
                ``allow_missing``), naming the missing file.
        """
        path = Path(path)
        if path.is_file():
            if fold is not None:
                raise RunError(f"{path} is a checkpoint file; fold={fold} needs the run folder")
            return cls.from_checkpoint(path, tta=tta, device=device, calibrated=calibrated, batch_size=batch_size)
        run = Run(path)
        if fold is not None:
            if run.is_fold:
                raise RunError(f"{path} is a fold folder already; leave out fold={fold}")
            if not (run.path / f"fold_{fold}").is_dir():
                raise RunError(f"{run.path} has no fold_{fold} (folds: {', '.join(f.name for f in run.folds)})")
            run = Run(run.path / f"fold_{fold}")
        device = inference_device(False) if device is None else device
        problems = run.member_problems()
        members = run.members(allow_missing=allow_missing)
        if problems:
            log.warning("%s; predicting with the %d fold model(s) present, by the most probable class (the run's "
                        "decision belongs to the full ensemble)", "; ".join(problems), len(members))
        models = [load_model(p, device) for p in members]  # each with its fold's temperature (calibration.json)
        classes = list(models[0].classes)
        fusion = run.fusion if calibrated and not problems else None
        final = "fused" if fusion is not None else "calibrated" if calibrated else "raw"
        if argmax:
            decision = Decision.argmax(classes, "--argmax: the most probable class was asked for", final)
        elif problems:
            decision = Decision.argmax(classes, f"{len(problems)} problem(s) with the run's fold models "
                                       f"({len(members)} of {len(run.folds)} present): the run's decision belongs "
                                       "to the full ensemble", final)
        elif not calibrated:
            decision = run.raw_decision or Decision.argmax(
                classes, "--uncalibrated: the run's decision was chosen on calibrated probabilities", "raw")
        else:
            decision = run.decision
        return cls(run, models, decision, calibrated=calibrated, tta=tta, fusion=fusion, batch_size=batch_size,
                   missing=problems)

    @classmethod
    def from_checkpoint(cls, path: str | Path, tta: bool = False, device: Any = None, calibrated: bool = True,
                        batch_size: int = 8) -> Predictor:
        """One checkpoint file on its own, deciding by the argmax: a file records no decision (its fold or run
        folder does). Its temperature is the ``calibration.json`` beside it when that belongs to this file (the
        fold's final weights, or a folder that names none).

        Raises:
            CheckpointError: the file is not a medvox model checkpoint.
        """
        path = Path(path)
        device = inference_device(False) if device is None else device
        model = load_model(path, device)
        final = ((read_json(path.parent / METRICS) or {}).get("final") or {}).get("weights")
        why = (f"{path} is a checkpoint file, which records no decision: the most probable class (give its fold or "
               "run folder for the decision the run was evaluated at)")
        if final and final != path.name and path.name in (BEST, BEST_EMA) and model.temperature != 1.0:
            model.temperature = 1.0  # the fold's temperature was fitted on its final weights, another file
            why += f"; uncalibrated: the fold's temperature belongs to its final weights, {final}"
        decision = Decision.argmax(list(model.classes), why, "calibrated" if calibrated else "raw")
        return cls(None, [model], decision, calibrated=calibrated, tta=tta, batch_size=batch_size, source=path)

    @property
    def members(self) -> list[Path]:
        return [m.path for m in self.models]

    @property
    def temperatures(self) -> list[float]:
        """Each member's temperature for the probabilities decided on (1.0 for every member when uncalibrated)."""
        return [m.temperature if self.calibrated else 1.0 for m in self.models]

    @property
    def complete(self) -> bool:
        """Every fold model of the run is a member (False after ``allow_missing`` left some out)."""
        return not self.missing

    # -- inputs -------------------------------------------------------------------------------------------------
    def check_input(self, array: np.ndarray, meta: dict[str, Any]) -> list[str]:
        """``medvox check``'s per-case checks of a volume read as :func:`medvox.data.io.read_image` gives it, and
        the comparison with the training cases' range; returns the warnings (see :attr:`CaseResult.warnings`).

        Raises:
            DataError: what ``medvox check`` refuses (a constant volume, NaN / Inf voxels), in check's words.
        """
        record, problems = inspect_volumes([image_io.Volume(array, meta)])
        errors = [p for p in problems if p.level == "error"]
        if errors or record is None:
            raise DataError("; ".join(f"{p.what} ({p.fix})" if p.fix else p.what for p in errors)
                            or "the volume cannot be inspected")
        found = range_warnings(record, self.input_range) if self.input_range else []
        return found + [what.split(";")[0] for what, _ in record_warnings(record)]

    def preprocess(self, array: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """A volume read as :func:`medvox.data.io.read_image` gives it (``(D, H, W)`` / ``(C, D, H, W)`` RAS, with
        ``meta["spacing"]``) on the model's grid ``(C, *plan["target_shape"])``, and on the descriptor model's
        grid where the run's fusion has its own (else None)."""
        x = preprocess_volume(array, meta, self.plan)
        feature_plan = (self.fusion or {}).get("plan")
        return x, (preprocess_volume(array, meta, feature_plan) if feature_plan else None)

    def predict(self, array: Any, affine: Any = None, spacing: Sequence[float] | None = None,
                axes: str | None = None) -> Prediction:
        """The prediction of one volume, preprocessed exactly as the same image read from a file.

        Args:
            array: with ``affine``: the voxels in the affine's own order, ``(x, y, z)`` or ``(x, y, z, c)``, as
                nibabel's ``img.get_fdata()`` gives them. With ``spacing``: ``(D, H, W)`` / ``(C, D, H, W)``
                in the order ``axes`` names.
            affine: the ``4 x 4`` voxel -> world matrix (nibabel's ``img.affine``): the array is reoriented to
                RAS by the code that reads NIfTI files (:func:`medvox.data.io.from_array`).
            spacing: voxel size in mm, in the order of ``axes``; the array is taken as it is (no reorientation).
            axes: with ``spacing``, the array's axis order: a permutation of ``"zyx"`` (default ``"zyx"``, medvox's
                own ``(D, H, W)``; ``"xyz"`` for nibabel's order), with ``"c"`` where a channel axis is not first
                (e.g. ``"xyzc"``). With ``affine``, only ``"xyz"`` (the default there).

        Returns:
            A :class:`Prediction` of one case (``.label``, ``.probs[0]``).

        Raises:
            ValueError: an array with neither ``affine`` nor ``spacing`` (or with both), a bad ``axes`` or
                ``spacing``, or a volume that does not fit the model's channels.
            ImageError: the array or affine is not a 3D volume with a finite, invertible affine.
        """
        if affine is None and spacing is None:
            raise ValueError("an array without geometry cannot be preprocessed as its file would be: give affine= "
                             "(nibabel: img = nibabel.load(path); predict(img.get_fdata(), affine=img.affine)), or "
                             "spacing= in mm with axes= (e.g. predict(volume, spacing=(2.5, 0.8, 0.8), axes='zyx') for "
                             "a (D, H, W) array)")
        if affine is not None and spacing is not None:
            raise ValueError("give affine= (the array in its NIfTI voxel order) or spacing= with axes=, not both")
        if affine is not None:
            if axes not in (None, "xyz"):
                raise ValueError(f"axes={axes!r} with affine=: the array must be in the affine's voxel order "
                                 "(x, y, z[, c]), as nibabel's get_fdata() gives it; leave axes out")
            volume, meta = image_io.from_array(array, affine)
        else:
            volume, meta = _as_zyx(np.asarray(array), spacing, axes or "zyx")
        for warning in self.check_input(volume, meta):
            log.warning("the volume: %s", warning)
        x, features = self.preprocess(volume, meta)
        return self.predict_preprocessed(x[None], None if features is None else features[None])

    def predict_cases(self, cases: Sequence[Case], batch_size: int | None = None,
                      progress: bool = False) -> list[CaseResult]:
        """Every case read and preprocessed as :func:`medvox.data.preprocess.preprocess_case` does, after
        :meth:`check_input`; an input that cannot be read or preprocessed, or that check refuses, gets its error
        and the others are still predicted. One result per case, in order (:meth:`iter_cases` gives them a chunk
        at a time)."""
        return [r for chunk in self.iter_cases(cases, batch_size, progress) for r in chunk]

    def iter_cases(self, cases: Sequence[Case], batch_size: int | None = None,
                   progress: bool = False) -> Iterator[list[CaseResult]]:
        """:meth:`predict_cases` a chunk of ``batch_size`` cases at a time (memory stays flat over thousands of
        inputs): yields each chunk's results, in order."""
        batch_size = batch_size or self.batch_size
        with progress_bar(progress) as bar:
            task = bar.add_task("predict", total=len(cases))
            for start in range(0, len(cases), batch_size):
                chunk = list(cases[start:start + batch_size])
                done: list[CaseResult | None] = [None] * len(chunk)
                ready, volumes, features = [], [], []
                warned: dict[int, list[str]] = {}
                for i, case in enumerate(chunk):
                    try:
                        array, meta = read_case(case)
                        warned[i] = self.check_input(array, meta)
                        x, f = self.preprocess(array, meta)
                    except Exception as exc:  # one bad input must not stop the others
                        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        done[i] = CaseResult(case, None, reason, warned.get(i, []))
                        continue
                    ready.append(i)
                    volumes.append(x)
                    if f is not None:
                        features.append(f)
                if ready:
                    pred = self.predict_preprocessed(np.stack(volumes), np.stack(features) if features else None)
                    for j, i in enumerate(ready):
                        done[i] = CaseResult(chunk[i], pred[j], warnings=warned[i])
                bar.advance(task, len(chunk))
                yield done

    def predict_files(self, paths: Sequence[str | Path], batch_size: int | None = None,
                      progress: bool = False) -> list[CaseResult]:
        """:meth:`predict_cases` of image files, DICOM series folders, ``.npy`` arrays or folders of them, read
        as ``medvox predict`` reads them (one case per image; a DICOM folder is one case).

        Raises:
            DataError: a path that does not exist or holds no image (before any is predicted).
        """
        cases = cases_from_paths([str(p) for p in paths])
        if not cases:
            raise DataError(f"no input images found in {', '.join(map(str, paths))} (NIfTI .nii/.nii.gz, DICOM "
                            "folders, .npy)")
        return self.predict_cases(cases, batch_size, progress)

    def predict_preprocessed(self, volumes: np.ndarray, feature_volumes: np.ndarray | None = None,
                             feature_probs: np.ndarray | None = None) -> Prediction:
        """Predictions of volumes already preprocessed with :attr:`plan`: ``(N, C, D, H, W)``.

        ``feature_volumes``: the same cases on the descriptor model's grid where the run's fusion has its own
        (``fusion["plan"]``); ``feature_probs``: the descriptor model's probabilities when the caller has them
        (the cv test ensemble)."""
        raw_per, cal_per = [], []
        for m in self.models:
            logits = torch.from_numpy(predict_logits(m.model, volumes, batch_size=self.batch_size, tta=self.tta)).double()
            raw_per.append(torch.softmax(logits, dim=1).numpy())
            cal_per.append(torch.softmax(logits / m.temperature, dim=1).numpy())
        raw_per, cal_per = np.stack(raw_per), np.stack(cal_per)
        raw, calibrated = raw_per.mean(0), cal_per.mean(0)
        fused = None
        if self.fusion is not None:
            if feature_probs is not None:
                fused = mix(calibrated, feature_probs, self.fusion["weight"])
            else:
                fused = fuse_probs(self.fusion, calibrated, volumes if feature_volumes is None else feature_volumes)
        which = self.decision.probabilities
        probs = {"raw": raw, "calibrated": calibrated, "fused": fused if fused is not None else calibrated}[which]
        return Prediction(raw, calibrated, fused, probs, raw_per if which == "raw" else cal_per, self.decision,
                          self.classes)


def _as_zyx(array: np.ndarray, spacing: Sequence[float], axes: str) -> tuple[np.ndarray, dict[str, Any]]:
    """An array in the axis order ``axes`` (see :meth:`Predictor.predict`) as ``([C,] D, H, W)`` float32 with its
    spacing in that order."""
    letters = str(axes).lower()
    spatial = letters.replace("c", "")
    if sorted(spatial) != ["x", "y", "z"] or letters.count("c") > 1 or len(letters) - len(spatial) > 1:
        raise ValueError(f"axes={axes!r}: give the array's axis order as a permutation of 'zyx' ('zyx' for (D, H, W), "
                         "'xyz' for nibabel's order), with 'c' for a channel axis that is not first")
    if "c" not in letters and array.ndim == 4:
        letters = "c" + letters  # channels first, as medvox holds them
    if array.ndim != len(letters):
        raise ValueError(f"a {array.ndim}D array of shape {array.shape} for axes {letters!r}: give a 3D volume, or a "
                         "4D one with its channel axis")
    problem = image_io.dtype_problem(array.dtype)
    if problem is not None:
        raise ValueError(f"the array: {problem[0]} ({problem[1]})")
    try:
        spacing = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise ValueError(f"spacing={spacing!r}: give three voxel sizes in mm, in the order of axes") from None
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing={spacing!r}: give three positive voxel sizes in mm, in the order of axes "
                         f"({spatial!r})")
    order = [letters.index(a) for a in ("c" if "c" in letters else "") + "zyx"]
    volume = np.ascontiguousarray(np.transpose(array, order), dtype=np.float32)
    return volume, {"spacing": [spacing[spatial.index(a)] for a in "zyx"]}


__all__ = ["CaseResult", "Prediction", "Predictor"]
