"""Rebuild one model from its checkpoint alone, and its logits with optional test-time augmentation.

A checkpoint carries the resolved config, the preprocessing plan and the class names, so a run folder
is enough to predict (as nnU-Net's predictor does). Which checkpoints make a run's ensemble is decided by
:meth:`medvox.run.Run.members`; the ensemble is averaged by :class:`~medvox.inference.predictor.Predictor`.
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
    from medvox.models import create_model, uses_cosine_head

    cfg = from_dict(ckpt["config"])
    in_channels = int(ckpt.get("in_channels") or ckpt["plan"].get("in_channels") or 1)
    model = create_model(cfg.model.name, in_channels=in_channels, num_classes=len(ckpt["classes"]),
                         dropout=cfg.model.dropout, cosine_head=uses_cosine_head(cfg), **cfg.model.kwargs)
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
