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
  agreement of each exported file with the PyTorch model on random inputs, and ``decision``: the run's own
  decision (:meth:`~medvox.metrics.decision.Decision.to_json`, the one ``medvox predict`` applies): a
  ``threshold`` on ``probabilities[:, 1]``, or for more than two classes ``class_weights`` (predict the class
  with the largest ``weight * probability``); neither: the argmax, with the reason in ``fitted_on``.

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

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvox.errors import CheckpointError
from medvox.inference.predictor import Predictor
from medvox.metrics.decision import Decision
from medvox.models import uses_cosine_head
from medvox.run import write_json

log = logging.getLogger("medvox")

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 17
_TOLERANCE = 1e-4


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

    Args:
        checkpoint_or_run: a ``.pt`` checkpoint, a ``fold_<k>`` folder, or a run folder (all folds'
            final checkpoints become one ensemble); read by
            :meth:`~medvox.inference.predictor.Predictor.from_run`.
        out_dir: output folder (created).
        formats: any of ``"torchscript"``, ``"onnx"``; safetensors and ``export.json`` are always written.
        fold: with a run folder, export only ``fold_<fold>``.
        calibrated: divide the logits by each fold's fitted temperature (``calibration.json``).
        verify: run the exported files on random inputs and record the largest difference to PyTorch.
        allow_missing: export the fold models that are there when a fold's final checkpoint is missing (the
            decision is then the argmax, with a warning); otherwise such a run is refused.

    Returns:
        The ``export.json`` document (with ``files`` and ``checks``).

    Raises:
        ValueError: an unknown format.
        RunError: the run is not a finished run / fold, or a fold's final checkpoint is missing (unless
            ``allow_missing``).
        CheckpointError: a checkpoint is not a medvox model, or the members are different models.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    predictor = Predictor.from_run(Path(checkpoint_or_run), fold=fold, calibrated=calibrated,
                                   allow_missing=allow_missing)
    loaded = predictor.models
    _check_members(loaded)
    temps = predictor.temperatures
    wrapper = ProbabilityModel([m.model for m in loaded], temps).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = _describe(loaded, temps, calibrated)
    doc["decision"], doc["fusion"] = _decision(predictor)
    doc["all_members_present"] = predictor.complete
    shape = doc["input_shape"][1:]
    files = {"safetensors": _save_safetensors(wrapper, out_dir / "model.safetensors", doc)}
    example = torch.zeros(1, *shape)
    probe = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = wrapper(probe).numpy()
    if "torchscript" in formats:
        files["torchscript"] = _export_torchscript(wrapper, example, out_dir / "model.torchscript.pt")
    if "onnx" in formats:
        files["onnx"] = _export_onnx(wrapper, example, out_dir / "model.onnx")
    doc["files"] = {k: Path(v).name for k, v in files.items()}
    doc["checks"] = _verify(files, probe, reference) if verify else {}
    write_json(out_dir / "export.json", doc)
    return {**doc, "out_dir": str(out_dir)}


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


def _verify(files: dict[str, Path], probe: torch.Tensor, reference: np.ndarray) -> dict[str, Any]:
    """Largest absolute difference of each exported file's probabilities to PyTorch's on ``probe``."""
    checks: dict[str, Any] = {"inputs": f"{len(probe)} random N(0, 1) volumes (batch != the traced batch of 1)"}
    outputs = {}
    if "torchscript" in files:
        with torch.no_grad():
            outputs["torchscript"] = torch.jit.load(str(files["torchscript"])).eval()(probe).numpy()
    if "onnx" in files:
        try:
            import onnxruntime as ort
        except ImportError:
            checks["onnx"] = {"skipped": "onnxruntime not installed (pip install onnxruntime)"}
        else:
            session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
            outputs["onnx"] = session.run(None, {"image": probe.numpy()})[0]
    for name, out in outputs.items():
        diff = float(np.abs(out - reference).max())
        checks[name] = {"max_abs_diff": diff, "ok": diff <= _TOLERANCE}
        if diff > _TOLERANCE:
            log.warning("exported %s differs from PyTorch by up to %.3g (tolerance %.0e)", name, diff, _TOLERANCE)
    return checks
