"""Rebuild models from checkpoints alone and predict with a fold ensemble and test-time augmentation.

A checkpoint carries the resolved config, the preprocessing plan and the class names, so a run folder
is enough to predict (as nnU-Net's predictor does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvox.config import ExperimentConfig, from_dict
from medvox.engine.checkpoint import load_checkpoint
from medvox.engine.setup import use_gpu
from medvox.errors import CheckpointError


@dataclass
class LoadedModel:
    """A model in eval mode with what it was trained with."""

    model: nn.Module
    config: ExperimentConfig
    plan: dict[str, Any]
    classes: list[str]
    path: Path
    temperature: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)


def build_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """The model a checkpoint's config describes, with the checkpoint's weights."""
    from medvox.models import create_model

    cfg = from_dict(ckpt["config"])
    cosine = cfg.model.cosine_head if cfg.model.cosine_head is not None else cfg.loss.name == "LDAM"
    in_channels = int(ckpt.get("in_channels") or ckpt["plan"].get("in_channels") or 1)
    model = create_model(cfg.model.name, in_channels=in_channels, num_classes=len(ckpt["classes"]),
                         dropout=cfg.model.dropout, cosine_head=cosine, **cfg.model.kwargs)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load one checkpoint (``best_ema.pt``/``best.pt``) with its calibration temperature when present."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    for key in ("config", "plan", "classes", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path} is not a medvox model checkpoint (no {key!r} entry)")
    model = build_from_checkpoint(ckpt).to(device)
    temperature = 1.0
    calib = path.parent / "calibration.json"
    if calib.exists():
        temperature = float(json.loads(calib.read_text())["temperature"])
    return LoadedModel(model, from_dict(ckpt["config"]), ckpt["plan"], list(ckpt["classes"]), path, temperature,
                       {"epoch": ckpt.get("epoch"), "kind": ckpt.get("kind")})


def inference_device(gpu: bool) -> torch.device:
    """Where inference runs: the first visible GPU when ``gpu`` and one is there, else the CPU (with the same
    warning as training, :func:`medvox.engine.setup.use_gpu`)."""
    if use_gpu(gpu, "--gpu", "predicting"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def final_checkpoint(fold_dir: Path) -> Path | None:
    """The checkpoint a fold's final evaluation used (from metrics.json), else best_ema.pt, else best.pt."""
    metrics = fold_dir / "metrics.json"
    if metrics.exists():
        weights = json.loads(metrics.read_text()).get("final", {}).get("weights")
        if weights and (fold_dir / weights).exists():
            return fold_dir / weights
    for name in ("best_ema.pt", "best.pt"):
        if (fold_dir / name).exists():
            return fold_dir / name
    return None


def find_checkpoints(paths: list[str | Path]) -> list[Path]:
    """Checkpoints from run folders (``<run>/fold_*``), fold folders, or ``.pt`` files."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
            continue
        is_fold = any((p / name).exists() for name in ("metrics.json", "best_ema.pt", "best.pt"))
        folds = [p] if is_fold else sorted(p.glob("fold_*"))
        for fold in folds:
            ck = final_checkpoint(fold)
            if ck is not None:
                found.append(ck)
    if not found:
        raise CheckpointError(f"no model checkpoint found in {', '.join(map(str, paths))} "
                              "(expected a run folder with fold_*/best_ema.pt or best.pt, or .pt files)")
    return found


@torch.inference_mode()
def predict_logits(model: nn.Module, images, batch_size: int = 16, tta: bool = False,
                   device: str | torch.device | None = None) -> np.ndarray:
    """Logits (N, K) for ``images`` (N, C, D, H, W), optionally averaged over test-time augmented views.

    With TTA, the mean of the views' log-probabilities is returned (a valid logit vector). The batches go
    to ``device``, by default the model's own (fp32 on either: the numbers do not depend on the device
    beyond rounding).
    """
    from medvox.transforms.tta import tta_views

    if device is None:
        device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[start:start + batch_size]), device=device).float()
        if not tta:
            out.append(model(x).float().cpu())
            continue
        views = [torch.log_softmax(model(v).float(), dim=1) for v in tta_views(x)]
        out.append(torch.stack(views).mean(0).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def ensemble_predict(models: list[LoadedModel], images, tta: bool = False, calibrated: bool = True,
                     batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Average the members' probabilities.

    Returns:
        (mean probabilities (N, K), per-member probabilities (M, N, K)).
    """
    per_model = []
    for m in models:
        logits = predict_logits(m.model, images, batch_size=batch_size, tta=tta)
        t = m.temperature if calibrated else 1.0
        per_model.append(torch.softmax(torch.from_numpy(logits).double() / t, dim=1).numpy())
    stacked = np.stack(per_model)
    return stacked.mean(0), stacked
