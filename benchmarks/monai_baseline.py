"""The plain MONAI-tutorial classifier of issue 8, measured by our own script on the official split.

MONAI's ResNet-18-3D (``monai.networks.nets.resnet18``, from scratch, its own stem: 7^3 conv with
stride 1), the tutorials' augmentation (three ``RandFlip`` with p 0.5 and ``RandAffine`` p 0.5,
rotation +-0.2 rad, zoom +-10 %) in DataLoader workers, Adam lr 1e-3, batch 32, 20 epochs, plain or
inverse-frequency weighted cross-entropy, the checkpoint with the best validation AUC (official
``val`` split, 98 volumes) evaluated once on the official ``test`` split at the argmax. bf16
autocast on a GPU; fp32 on a CPU (the bf16 Conv3d bug of oneDNN that medvox guards against would
hit MONAI's 2^3 layer4 inputs too).

Usage::

    python benchmarks/monai_baseline.py --npz ../shared/data/medmnist/adrenalmnist3d.npz --seed 0 \\
        --loss weighted_CE --out /tmp/monai_wce_s0.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` finds the package


def _split(npz: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(npz) as data:
        x = data[f"{name}_images"].astype(np.float32)[:, None] / 255.0
        y = data[f"{name}_labels"].reshape(-1).astype(np.int64)
    return x, y


def _loader(x: np.ndarray, y: np.ndarray, batch: int, train: bool, workers: int, seed: int):
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, RandAffine, RandFlip

    items = [{"image": xi, "label": int(yi)} for xi, yi in zip(x, y, strict=True)]
    if train:
        aug = Compose([RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1),
                       RandFlip(prob=0.5, spatial_axis=2),
                       RandAffine(prob=0.5, rotate_range=(0.2, 0.2, 0.2), scale_range=(0.1, 0.1, 0.1),
                                  padding_mode="border")])
        aug.set_random_state(seed=seed)

        def transform(item):
            return {"image": aug(item["image"]), "label": item["label"]}
    else:
        def transform(item):
            return item
    return DataLoader(Dataset(items, transform=transform), batch_size=batch, shuffle=train, num_workers=workers,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))


def _predict(model, loader, device, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, labels = [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for batch in loader:
            logits = model(torch.as_tensor(batch["image"]).to(device)).float()
            probs.append(torch.softmax(logits, 1).cpu().numpy())
            labels.append(np.asarray(batch["label"]))
    return np.concatenate(labels), np.concatenate(probs)


def run(npz: Path, seed: int, loss: str, epochs: int = 20, batch: int = 32, lr: float = 1e-3, workers: int = 2,
        device: str | None = None) -> dict:
    """Train and evaluate once; returns the figures (validation AUC per epoch, test metrics, seconds)."""
    from monai.networks.nets import resnet18
    from monai.utils import set_determinism

    from medvox.metrics.classification import compute_metrics

    started, cpu0 = time.perf_counter(), time.process_time()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = dev.type == "cuda"
    set_determinism(seed=seed)
    (xtr, ytr), (xva, yva), (xte, yte) = (_split(npz, s) for s in ("train", "val", "test"))
    model = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2).to(dev)
    weight = None
    if loss == "weighted_CE":
        counts = np.bincount(ytr, minlength=2).astype(np.float64)
        weight = torch.tensor(counts.sum() / (2 * counts), dtype=torch.float32, device=dev)
    elif loss != "CE":
        raise ValueError(f"loss must be CE or weighted_CE, got {loss!r}")
    criterion = torch.nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train_loader = _loader(xtr, ytr, batch, True, workers, seed)
    val_loader, test_loader = (_loader(x, y, 64, False, 0, seed) for x, y in ((xva, yva), (xte, yte)))
    best_auc, best_epoch, best_state, history = -1.0, 0, None, []
    for epoch in range(1, epochs + 1):
        model.train()
        for b in train_loader:
            x, y = torch.as_tensor(b["image"]).to(dev), torch.as_tensor(b["label"]).to(dev)
            opt.zero_grad()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                out = criterion(model(x).float(), y)
            out.backward()
            opt.step()
        labels, probs = _predict(model, val_loader, dev, amp)
        auc = compute_metrics(labels, probs)["auc"]
        history.append(auc)
        print(f"monai baseline ({loss}, seed {seed}) epoch {epoch}/{epochs}: val auc {auc:.4f}", file=sys.stderr,
              flush=True)
        if auc > best_auc:
            best_auc, best_epoch, best_state = auc, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    labels, probs = _predict(model, test_loader, dev, amp)
    test = compute_metrics(labels, probs, class_names=["0", "1"])
    return {"model": "MONAI resnet18 (from scratch)", "loss": loss, "seed": seed, "epochs": epochs, "batch": batch,
            "lr": lr, "device": str(dev), "val_auc_history": history, "best_val_auc": best_auc,
            "best_epoch": best_epoch, "test": test, "wall_seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=["CE", "weighted_CE"], default="CE")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.npz, args.seed, args.loss, epochs=args.epochs, workers=args.workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    t = result["test"]
    print(f"test auc {t['auc']:.4f} acc {t['accuracy']:.4f} balanced acc {t['balanced_accuracy']:.4f} "
          f"f1 {t['f1']:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
