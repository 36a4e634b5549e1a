"""``medvox export``: a trained model (or a run's fold ensemble) as TorchScript, ONNX and safetensors.

The exported graph takes a preprocessed batch ``image (B, C, D, H, W)`` float32 (the plan's
``target_shape``; the batch axis is dynamic) and returns ``probabilities (B, K)``: the mean over the
members of ``softmax(logits / T)``, with each fold's fitted temperature ``T`` (1 when uncalibrated). That is
what ``medvox predict`` computes without TTA, so a deployment does not need medvox, only the preprocessing
described by ``export.json`` (spacing, shape, normalisation, axis order).

Files written to ``out_dir``:

* ``model.torchscript.pt``: ``torch.jit.load`` it (traced);
* ``model.onnx``: opset 17, input ``image``, output ``probabilities``, dynamic batch;
* ``model.safetensors``: weights only (no pickle); one member: the model's own state-dict keys, so
  ``create_model(**export["create_model"]).load_state_dict(load_file(...))`` works; several: keys
  ``members.<k>.<key>`` (:func:`load_exported` rebuilds either);
* ``export.json``: input shape, classes, temperatures, preprocessing plan, config, the measured
  agreement of each exported file with the PyTorch model on random inputs and, under ``checks["case"]``, with
  :class:`~medvox.inference.predictor.Predictor` on a real case of the run's data (its first test case, else
  the first case of its cross-validation pool; its id is recorded), and ``decision``: the run's own
  decision (:meth:`~medvox.metrics.decision.Decision.to_json`, the one ``medvox predict`` applies): a
  ``threshold`` on ``probabilities[:, 1]``, or for more than two classes ``class_weights`` (predict the class
  with the largest ``weight * probability``); neither: the argmax, with the reason in ``fitted_on``;
* with TorchScript, ``predict.py``: reads a NIfTI, preprocesses it as medvox does and predicts, with NumPy,
  nibabel and PyTorch only (:mod:`medvox.inference.standalone_template`; every number from ``export.json``);
  the real-case check runs its preprocessing too;
* with TorchScript, ``bundle/``: a MONAI Bundle (``configs/metadata.json``, ``configs/inference.json``,
  ``configs/export.json``, ``models/model.ts``, ``scripts/medvox_predict.py``: the same file as ``predict.py``),
  run by ``monai.bundle.run`` on NIfTI files (``input_files``), writing ``predictions.json`` to ``output_dir``.

A run that ``medvox cv`` fused with its descriptor model (``--recipe auto``) reported the mixture: the
export holds the CNN part only (the descriptors are NumPy/SciPy code, not a graph), so its probabilities are
not the run's final ones, and the run's threshold, chosen on the mixture, is not given for them:
``export.json``'s ``fusion`` says so (with the weight) and the export logs a warning; ``medvox predict`` on
the run folder gives the fused predictions.

Example:
    >>> info = export_model(Path("results/resnet50"), Path("exported"))
    >>> info["checks"]["onnx"]["max_abs_diff"] < 1e-4
    True
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvox.data.preprocess import read_case
from medvox.errors import CheckpointError, DataError, MedvoxError, UsageError
from medvox.inference.predictor import Predictor
from medvox.metrics.decision import Decision
from medvox.models import uses_cosine_head
from medvox.run import require_output_folder, write_json

log = logging.getLogger("medvox")

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 17
_TOLERANCE = 1e-4
_CASE_TOLERANCE = 1e-5  # on a real case, against medvox predict: what a deployment may rely on
# the export folder's own names
EXPORT_JSON = "export.json"
STANDALONE = "predict.py"
BUNDLE = "bundle"
BUNDLE_SCRIPT = "medvox_predict"  # bundle/scripts/medvox_predict.py: the same file as predict.py
TEMPLATE = "standalone_template.py"


class ProbabilityModel(nn.Module):
    """Mean over members of ``softmax(logits / T_m)``: what is exported.

    Shapes:
        ``(B, C, D, H, W) -> (B, K)``; every row sums to 1.
    """

    def __init__(self, members: list[nn.Module], temperatures: list[float]) -> None:
        super().__init__()
        if not members or len(members) != len(temperatures):
            raise ValueError(f"need one temperature per member, got {len(members)} member(s), {len(temperatures)}")
        if any(not t > 0 for t in temperatures):
            raise ValueError(f"temperatures must be > 0, got {temperatures}")
        self.members = nn.ModuleList(members)
        self.register_buffer("inv_temperature", torch.tensor([1.0 / t for t in temperatures], dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(m(image).float() * self.inv_temperature[i], dim=1) for i, m in enumerate(self.members)]
        return torch.stack(probs).mean(0)


def export_model(checkpoint_or_run: Path, out_dir: Path, formats: tuple[str, ...] | list[str] = FORMATS, *,
                 fold: int | None = None, calibrated: bool = True, verify: bool = True,
                 allow_missing: bool = False) -> dict[str, Any]:
    """Export a checkpoint, a fold folder, or a run's fold ensemble.

    The files are written to a temporary folder beside ``out_dir`` and renamed into place at the end, so a
    failed export leaves no half-written folder; a previous export in ``out_dir`` is replaced. Every file is
    written with mode 0644 (folders 0755).

    Args:
        checkpoint_or_run: a ``.pt`` checkpoint, a ``fold_<k>`` folder, or a run folder (all folds'
            final checkpoints become one ensemble); read by
            :meth:`~medvox.inference.predictor.Predictor.from_run`.
        out_dir: output folder (created; an existing one must hold a previous export, or nothing).
        formats: any of ``"torchscript"``, ``"onnx"``; safetensors and ``export.json`` are always written;
            with ``"torchscript"`` also ``predict.py`` (the standalone predictor) and ``bundle/`` (a MONAI Bundle).
        fold: with a run folder, export only ``fold_<fold>``.
        calibrated: divide the logits by each fold's fitted temperature (``calibration.json``).
        verify: run the exported files on random inputs and on a real case of the run's data, and record their
            largest difference to PyTorch and to :class:`~medvox.inference.predictor.Predictor`.
        allow_missing: export the fold models that are there when a fold's final checkpoint is missing (the
            decision is then the argmax, with a warning); otherwise such a run is refused.

    Returns:
        The ``export.json`` document (with ``files`` and ``checks``).

    Raises:
        ValueError: an unknown format.
        UsageError: ``"onnx"`` without the ``export`` extra (onnx) installed (before anything is read or written).
        DataError: an ``out_dir`` that is a file, cannot be written, or holds something other than an export
            (before anything is read or written).
        RunError: the run is not a finished run / fold, or a fold's final checkpoint is missing (unless
            ``allow_missing``).
        CheckpointError: a checkpoint is not a medvox model, or the members are different models.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    if "onnx" in formats and importlib.util.find_spec("onnx") is None:
        raise UsageError('ONNX export needs the onnx package: pip install "medvox[export]" (or export TorchScript '
                         "alone with --format torchscript / formats=(\"torchscript\",))")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    predictor = Predictor.from_run(Path(checkpoint_or_run), fold=fold, calibrated=calibrated,
                                   allow_missing=allow_missing)
    loaded = predictor.models
    _check_members(loaded)
    temps = predictor.temperatures
    wrapper = ProbabilityModel([m.model for m in loaded], temps).eval()
    doc = _describe(loaded, temps, calibrated)
    doc["decision"], doc["fusion"] = _decision(predictor)
    doc["all_members_present"] = predictor.complete
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        doc["files"], doc["checks"] = _write_files(work, wrapper, doc, formats, predictor, verify)
        write_json(work / EXPORT_JSON, doc)
        if "bundle" in doc["files"]:
            write_json(work / BUNDLE / "configs" / EXPORT_JSON, doc)
        _set_modes(work)
        _replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {**doc, "out_dir": str(out_dir)}


def _write_files(work: Path, wrapper: ProbabilityModel, doc: dict[str, Any], formats, predictor: Predictor,
                 verify: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """Every exported file into ``work``: (``files``, ``checks``) of ``export.json``."""
    shape = doc["input_shape"][1:]
    files = {"safetensors": _save_safetensors(wrapper, work / "model.safetensors", doc)}
    example = torch.zeros(1, *shape)
    if "torchscript" in formats:
        files["torchscript"] = _export_torchscript(wrapper, example, work / "model.torchscript.pt")
        files["standalone"] = _write_standalone(work / STANDALONE)
        files["bundle"] = _write_bundle(work / BUNDLE, files["torchscript"], doc)
    if "onnx" in formats:
        files["onnx"] = _export_onnx(wrapper, example, work / "model.onnx")
    names = {k: str(Path(v).relative_to(work)) for k, v in files.items()}
    if not verify:
        return names, {}
    probe = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = wrapper(probe).numpy()
    checks = _verify(files, probe, reference)
    checks["case"] = _verify_case(files, predictor, doc)
    return names, checks


def load_exported(out_dir: Path) -> ProbabilityModel:
    """Rebuild the exported :class:`ProbabilityModel` from ``export.json`` + ``model.safetensors`` (no pickle)."""
    from safetensors.torch import load_file

    from medvox.models import create_model

    doc = json.loads((Path(out_dir) / "export.json").read_text(encoding="utf-8"))
    members = [create_model(**doc["create_model"]).eval() for _ in doc["members"]]
    wrapper = ProbabilityModel(members, doc["temperatures"]).eval()
    state = load_file(str(Path(out_dir) / "model.safetensors"))
    if len(members) == 1:
        members[0].load_state_dict(state)
    else:
        wrapper.members.load_state_dict({k[len("members."):]: v for k, v in state.items()})
    return wrapper


def _check_out_dir(out_dir: Path) -> None:
    """Refuse, before any work, an ``out_dir`` that is not a writable folder
    (:func:`~medvox.run.require_output_folder`) or whose contents an export would destroy."""
    require_output_folder(out_dir, "--out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_JSON).is_file():
        raise DataError(f"{out_dir} holds files that are not a medvox export (no {EXPORT_JSON}): give a new or empty "
                         "folder (an earlier export there is replaced)")


def _replace(work: Path, out_dir: Path) -> None:
    """Rename the finished ``work`` folder to ``out_dir``, replacing an earlier export there."""
    if not out_dir.exists():
        work.rename(out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    out_dir.rename(trash / "old")
    try:
        work.rename(out_dir)
    except BaseException:
        (trash / "old").rename(out_dir)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _set_modes(folder: Path) -> None:
    """Files 0644, folders 0755 (temporary files are created 0600, the temporary folder 0700)."""
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _template_text() -> str:
    return (importlib.resources.files("medvox.inference") / TEMPLATE).read_text(encoding="utf-8")


def _write_standalone(path: Path) -> Path:
    """``predict.py``: preprocessing and prediction with NumPy, nibabel and PyTorch only (the package's
    :mod:`medvox.inference.standalone_template`, which reads every number from ``export.json``)."""
    path.write_text(_template_text(), encoding="utf-8")
    return path


def _write_bundle(folder: Path, torchscript: Path, doc: dict[str, Any]) -> Path:
    """A MONAI Bundle: ``configs/metadata.json``, ``configs/inference.json`` (``configs/export.json`` comes with
    ``export.json``), ``models/model.ts`` (the TorchScript file) and ``scripts/medvox_predict.py`` (the standalone
    preprocessing, so the bundle and ``predict.py`` share one definition)."""
    for sub in ("configs", "models", "scripts"):
        (folder / sub).mkdir(parents=True)
    try:  # the same bytes as model.torchscript.pt: a hard link where the file system has them
        os.link(torchscript, folder / "models" / "model.ts")
    except OSError:
        shutil.copyfile(torchscript, folder / "models" / "model.ts")
    (folder / "scripts" / "__init__.py").write_text("", encoding="utf-8")
    (folder / "scripts" / f"{BUNDLE_SCRIPT}.py").write_text(_template_text(), encoding="utf-8")
    write_json(folder / "configs" / "metadata.json", _bundle_metadata(doc))
    write_json(folder / "configs" / "inference.json", _bundle_inference())
    return folder


def _bundle_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    import monai
    import nibabel

    from medvox._version import __version__

    classes, channels = doc["classes"], doc["input_shape"][1]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "1.0.0", "changelog": {"1.0.0": f"exported by medvox {__version__}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": {"nibabel": nibabel.__version__},
        "name": f"medvox {doc['model']}", "task": f"3D classification into {', '.join(classes)}",
        "description": (f"A medvox {doc['model']} ({len(doc['members'])} member(s)) exported with its preprocessing. "
                        "configs/inference.json reads NIfTI files (input_files), preprocesses them as medvox does "
                        "(scripts/medvox_predict.py, the plan in configs/export.json), runs models/model.ts and writes "
                        "output_dir/predictions.json: each file's probabilities and the label by the run's decision."),
        "authors": "medvox export", "copyright": "the owners of the training data and run",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "any", "num_channels": channels,
                                 "spatial_shape": doc["input_shape"][2:], "dtype": "float32", "value_range": [],
                                 "is_patch_data": False,
                                 "channel_def": {str(c): f"channel {c}" for c in range(channels)}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(classes),
                                 "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1],
                                 "is_onehot": False, "channel_def": {str(k): c for k, c in enumerate(classes)}}},
        },
    }


def _bundle_inference() -> dict[str, Any]:
    """``configs/inference.json``: every number comes from ``configs/export.json`` when the bundle runs."""
    script = f"scripts.{BUNDLE_SCRIPT}"
    return {
        "imports": ["$import json", "$import torch"],
        "bundle_root": ".",
        "input_files": [],
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "export": "$json.load(open(@bundle_root + '/configs/export.json', encoding='utf-8'))",
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "network": "$@network_def.eval()",
        "preprocessing": {"_target_": f"{script}.LoadAndPreprocessd", "plan": "$@export['preprocessing']",
                          "keys": "image"},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @input_files]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "run": [{"_target_": f"{script}.run_bundle", "network": "@network", "dataloader": "@dataloader",
                 "export": "@export", "output_dir": "@output_dir", "device": "@device"}],
    }


def _check_members(loaded) -> None:
    ref = loaded[0]
    for m in loaded[1:]:
        for what in ("plan", "classes"):
            if getattr(m, what) != getattr(ref, what):
                raise CheckpointError(f"{ref.path} and {m.path} have different {what}: export them one at a time")
        if type(m.model) is not type(ref.model):
            raise CheckpointError(f"{ref.path} and {m.path} are different models: export them one at a time")


def _decision(predictor: Predictor) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the decision for the exported probabilities, :meth:`~medvox.metrics.decision.Decision.to_json`; the
    fusion the export leaves out, or None)."""
    fusion = predictor.fusion
    if fusion is None:
        return predictor.decision.to_json(), None
    note = (f"{predictor.source} mixes a descriptor model into its final probabilities (weight {fusion['weight']:g}); "
            "this export is the CNN fold ensemble alone, whose probabilities are not the run's final ones. `medvox "
            f"predict --run {predictor.source}` gives the fused predictions.")
    log.warning("%s", note)
    decision = Decision.argmax(predictor.classes, "the run's decision was chosen on the fused probabilities, not on "
                               "these (the CNN fold ensemble alone)")
    return decision.to_json(), {"weight": fusion["weight"], "note": note}


def _describe(loaded, temps: list[float], calibrated: bool) -> dict[str, Any]:
    """``export.json`` without files and checks."""
    from medvox._version import __version__
    from medvox.config import to_dict

    ref = loaded[0]
    cfg = ref.config
    in_channels = int(getattr(ref.model, "in_channels", ref.plan.get("in_channels", 1)))
    return {
        "format_version": 1, "medvox_version": __version__, "torch_version": torch.__version__,
        "model": cfg.model.name, "members": [str(m.path) for m in loaded], "classes": list(ref.classes),
        "input": "image", "input_shape": ["batch", in_channels, *map(int, ref.plan["target_shape"])],
        "input_dtype": "float32", "output": "probabilities",
        "output_shape": ["batch", len(ref.classes)],
        "output_meaning": "mean over members of softmax(logits / temperature)",
        "calibrated": calibrated, "temperatures": temps, "onnx_opset": ONNX_OPSET,
        "create_model": {"name": cfg.model.name, "in_channels": in_channels, "num_classes": len(ref.classes),
                         "dropout": cfg.model.dropout, "cosine_head": uses_cosine_head(cfg), **cfg.model.kwargs},
        "preprocessing": ref.plan, "config": to_dict(cfg),
    }


def _save_safetensors(wrapper: ProbabilityModel, path: Path, doc: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    members = list(wrapper.members)
    state = members[0].state_dict() if len(members) == 1 else wrapper.members.state_dict()
    prefix = "" if len(members) == 1 else "members."
    # safetensors refuses shared or strided storage: store independent contiguous copies
    tensors = {prefix + k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"model": doc["model"], "classes": json.dumps(doc["classes"]),
                                            "layout": "state_dict" if not prefix else "members.<k>.<state_dict key>"})
    return path


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        # tracing warns about Python-side shape checks; the batch axis stays symbolic in the graph
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    traced.save(str(path))
    return path


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path) -> Path:
    # The TorchScript-based exporter (dynamo=False): the torch.export-based default of torch >= 2.9 fails
    # here with "No module named 'onnxscript'" (not a medvox dependency); this one needs nothing extra and
    # takes dynamic_axes as they are. It is deprecated upstream: revisit when it goes.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), input_names=["image"], output_names=["probabilities"],
                          opset_version=ONNX_OPSET, dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                          do_constant_folding=True, dynamo=False)
    return path


def _run_case(files: dict[str, Path], x: np.ndarray) -> dict[str, np.ndarray]:
    """Each exported graph's probabilities ``(N, K)`` of the preprocessed ``x`` ``(N, C, D, H, W)``."""
    out = {}
    if "torchscript" in files:
        with torch.no_grad():
            out["torchscript"] = torch.jit.load(str(files["torchscript"])).eval()(torch.from_numpy(x)).numpy()
    if "onnx" in files and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
        out["onnx"] = session.run(None, {"image": x})[0]
    return out


def _first_case(predictor: Predictor):
    """A case of the run's own data (the first test case, else the first case of the cross-validation pool,
    which is a validation case of its fold), or the reason there is none."""
    from medvox.data.sources import load_source

    try:
        cases = load_source(predictor.models[0].config.data, require_labels=False)
    except (MedvoxError, OSError, ValueError) as exc:
        return None, f"the run's data cannot be read here ({str(exc).splitlines()[0] if str(exc) else exc})"
    chosen = (cases.test or cases.pool or [None])[0]
    return chosen, None if chosen is not None else "the run's data holds no case"


def _verify_case(files: dict[str, Path], predictor: Predictor, doc: dict[str, Any]) -> dict[str, Any]:
    """The exported files, and ``predict.py``'s own preprocessing, on a real case against
    :class:`~medvox.inference.predictor.Predictor` (what ``medvox predict`` gives, without TTA and fusion)."""
    case, why = _first_case(predictor)
    if case is None:
        log.warning("export: no real case checked: %s", why)
        return {"skipped": why}
    cnn = copy.copy(predictor)
    cnn.fusion = None  # the export is the CNN fold ensemble: its probabilities come before any fusion
    array, meta = read_case(case)
    x, _ = cnn.preprocess(array, meta)
    pred = cnn.predict_preprocessed(x[None])
    expected = pred.calibrated if predictor.calibrated else pred.raw
    check: dict[str, Any] = {"id": case.id, "subset": case.subset, "input": case.file,
                             "probabilities": [float(p) for p in expected[0]], "tolerance": _CASE_TOLERANCE}
    outputs = _run_case(files, x[None].astype(np.float32))
    if "standalone" in files:
        standalone = _load_standalone(files["standalone"])
        x_alone = standalone.preprocess(array, meta.get("spacing", [1.0, 1.0, 1.0]), doc["preprocessing"])
        check["standalone_preprocessing_max_abs_diff"] = float(np.abs(x_alone - x).max())
        outputs["standalone"] = _run_case({"torchscript": files["torchscript"]}, x_alone[None])["torchscript"]
    check.update(_agreement(outputs, expected, _CASE_TOLERANCE, f"medvox predict on case {case.id}"))
    return check


def summary_lines(info: dict[str, Any]) -> list[str]:
    """What ``medvox export`` prints: each file, the agreement checks in words, and the decision."""
    lines = [f"{name}: {item}" for name, item in (info.get("files") or {}).items()]
    checks = dict(info.get("checks") or {})
    inputs = checks.pop("inputs", None)
    case = checks.pop("case", None)

    def verdict(item: dict[str, Any], tolerance: float) -> str:
        if "skipped" in item:
            return f"skipped ({item['skipped']})"
        return f"max |p - p_medvox| = {item['max_abs_diff']:.2g} ({'ok' if item['ok'] else 'OVER'} {tolerance:.0e})"

    for name, item in checks.items():
        if isinstance(item, dict):
            lines.append(f"check on {inputs or 'random volumes'}, {name}: {verdict(item, _TOLERANCE)}")
    if isinstance(case, dict) and "skipped" in case:
        lines.append(f"check on a real case: skipped ({case['skipped']})")
    elif isinstance(case, dict):
        parts = [f"{k} {verdict(v, case['tolerance'])}" for k, v in case.items() if isinstance(v, dict)]
        lines.append(f"check on case {case['id']} ({case['subset']}) against medvox predict: " + "; ".join(parts))
    lines.append(f"decision: {Decision.from_json(info['decision']).describe(digits=6)}")  # a deployer's precision
    return lines


def _load_standalone(path: Path):
    """The written ``predict.py`` as a module (not registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(f"_medvox_export_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _verify(files: dict[str, Path], probe: torch.Tensor, reference: np.ndarray) -> dict[str, Any]:
    """Largest absolute difference of each exported file's probabilities to PyTorch's on ``probe``."""
    checks: dict[str, Any] = {"inputs": f"{len(probe)} random N(0, 1) volumes (batch != the traced batch of 1)"}
    outputs = _run_case(files, probe.numpy())
    if "onnx" in files and "onnx" not in outputs:
        checks["onnx"] = {"skipped": "onnxruntime not installed (pip install onnxruntime)"}
    checks.update(_agreement(outputs, reference, _TOLERANCE, "PyTorch"))
    return checks


def _agreement(outputs: dict[str, np.ndarray], reference: np.ndarray, tolerance: float, against: str
               ) -> dict[str, dict[str, Any]]:
    """Each exported file's largest absolute difference to ``reference`` and whether it is within ``tolerance``;
    a file beyond it is logged as a warning naming what it was compared ``against``."""
    out: dict[str, dict[str, Any]] = {}
    for name, probs in outputs.items():
        diff = float(np.abs(probs - reference).max())
        out[name] = {"max_abs_diff": diff, "ok": diff <= tolerance}
        if diff > tolerance:
            log.warning("exported %s differs from %s by up to %.3g (tolerance %.0e)", name, against, diff, tolerance)
    return out
