"""The peers: pipelines written the way the MONAI (and TorchIO) tutorials write them.

* Augmentation: ``RandAffined`` per sample inside a ``DataLoader`` with worker processes (MONAI's
  3D classification/segmentation tutorials); TorchIO's ``RandomAffine`` per sample, same ranges.
* Training: ``CacheDataset`` (deterministic transforms cached once) + ``RandAffined`` + ``RandFlipd``
  in 2 DataLoader workers, and the tutorials' plain loop (``zero_grad``, forward, loss, backward,
  ``step``, ``loss.item()``). Variant (b) adds what a careful user would: bf16 autocast,
  ``channels_last_3d``, ``persistent_workers`` (and, on the CPU, the same fp32 fallback for tiny bf16
  convolutions that medvox applies: without it the loss becomes NaN, see ``medvox.engine.compat``).
* Preprocessing: ``CacheDataset`` over NIfTI files with ``LoadImaged`` ... ``ResizeWithPadOrCropd``.

The augmentation ranges are medvox's defaults: rotation +-11.5 deg about each axis, zoom +-8 %,
translation +-8 % of the size, probability 0.6. MONAI draws one zoom per axis (it has no isotropic
option); TorchIO and medvox draw one zoom for all axes.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

ROTATE_DEG, ZOOM, TRANSLATE, PROB = 11.5, 0.08, 0.08, 0.6


def monai_rand_affine(size: int, keys: str = "image"):
    """``RandAffined`` with medvox's default ranges, as the tutorials configure it (``spatial_size`` set)."""
    from monai.transforms import RandAffined

    rad = math.radians(ROTATE_DEG)
    return RandAffined(keys=keys, prob=PROB, rotate_range=(rad,) * 3, scale_range=(ZOOM,) * 3,
                       translate_range=(TRANSLATE * size,) * 3, mode="bilinear", padding_mode="zeros",
                       spatial_size=(size,) * 3)


def monai_aug_loader(volumes: np.ndarray, batch: int, workers: int):
    """A DataLoader that applies ``RandAffined`` per sample in ``workers`` processes.

    Persistent workers: the benchmark measures steady-state throughput, not worker start-up.
    """
    from monai.data import DataLoader, Dataset

    items = [{"image": v} for v in volumes]
    dataset = Dataset(items, transform=monai_rand_affine(volumes.shape[-1]))
    return DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)


def torchio_rand_affine(size: int):
    """TorchIO ``RandomAffine`` with the same ranges (1 mm voxels, so the translation is in voxels)."""
    import torchio as tio

    return tio.RandomAffine(scales=ZOOM, degrees=ROTATE_DEG, translation=TRANSLATE * size, isotropic=True, p=PROB,
                            image_interpolation="linear", default_pad_value="minimum")


class TorchioDataset(torch.utils.data.Dataset):
    """Per-sample TorchIO augmentation of in-memory volumes (for a DataLoader)."""

    def __init__(self, volumes: np.ndarray):
        self.volumes = volumes
        self.transform = torchio_rand_affine(volumes.shape[-1])

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> torch.Tensor:
        import torchio as tio

        subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(self.volumes[i])))
        return self.transform(subject)["image"].data


def torchio_aug_loader(volumes: np.ndarray, batch: int, workers: int):
    return torch.utils.data.DataLoader(TorchioDataset(volumes), batch_size=batch, num_workers=workers,
                                       persistent_workers=workers > 0)


# ------------------------------------------------------------------------------------ training


class PeerTrainer:
    """The MONAI-tutorial training pipeline; ``setup`` / ``epoch`` / ``finish`` as every case has.

    Spec keys: ``npz``, ``n``, ``batch``, ``workers``, ``precision`` ("fp32"/"bf16"), ``channels_last``,
    ``persistent``, ``model``, ``lr``, ``device``, ``seed``.
    """

    def __init__(self, spec: dict):
        self.spec, self.name = spec, spec["name"]
        self.device = torch.device(spec.get("device", "cpu"))

    def _loader(self, n: int | None = None):
        from monai.data import CacheDataset, DataLoader
        from monai.transforms import Compose, EnsureChannelFirstd, RandFlipd, ScaleIntensityd

        s = self.spec
        with np.load(s["npz"]) as data:
            images, labels = data["train_images"][: n or s["n"]], data["train_labels"][: n or s["n"]].reshape(-1)
        items = [{"image": img, "label": int(lab)} for img, lab in zip(images, labels, strict=True)]
        transform = Compose([
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
            ScaleIntensityd(keys="image"),  # deterministic: CacheDataset caches the result of everything above
            monai_rand_affine(images.shape[-1]),
            *[RandFlipd(keys="image", spatial_axis=axis, prob=0.5) for axis in range(3)],
        ])
        dataset = CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=None, progress=False)
        workers = s["workers"]
        return DataLoader(dataset, batch_size=s["batch"], shuffle=True, num_workers=workers,
                          persistent_workers=bool(s.get("persistent")) and workers > 0)

    def setup(self) -> dict:
        from medvox.models import create_model  # the same network on both sides: only the pipeline differs

        s = self.spec
        t0 = time.perf_counter()
        torch.manual_seed(s.get("seed", 0))
        self.model = create_model(s["model"], in_channels=1, num_classes=2).to(self.device)
        if s["precision"] == "bf16" and self.device.type == "cpu":
            # Without it oneDNN's bf16 Conv3d weight gradient turns the loss NaN within a few steps (the
            # upstream bug medvox.engine.compat works around): a tuned user needs the same work-around, and
            # timing a run whose weights are NaN would mean nothing.
            from medvox.engine.compat import guard_cpu_bf16_conv3d

            guard_cpu_bf16_conv3d(self.model)
        if s.get("channels_last"):
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s["lr"])
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.loader = self._loader()
        warm = self._loader(n=s["batch"])  # warm-up: one step, excluded from every timing
        self._run(warm)
        return {"setup_seconds": time.perf_counter() - t0}

    def _step(self, batch) -> float:
        x, y = batch["image"].to(self.device), batch["label"].to(self.device)
        if self.spec.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        self.optimizer.zero_grad()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.spec["precision"] == "bf16"):
            out = self.model(x)
            loss = self.loss_fn(out, y)
        loss.backward()
        self.optimizer.step()
        return loss.item()  # the tutorials' per-step epoch_loss += loss.item()

    def _run(self, loader) -> dict:
        from benchmarks.common import tree_cpu_seconds

        self.model.train()
        n = steps = nonfinite = 0
        wait = 0.0
        cpu0, start = tree_cpu_seconds(), time.perf_counter()
        it = iter(loader)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            wait += time.perf_counter() - t
            if batch is None:
                break
            loss = self._step(batch)
            nonfinite += not math.isfinite(loss)
            n, steps = n + len(batch["label"]), steps + 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "samples": n, "steps": steps, "data_wait": wait, "aug_seconds": None,
                "cpu_seconds": tree_cpu_seconds() - cpu0, "nonfinite_losses": nonfinite}

    def epoch(self) -> dict:
        return self._run(self.loader)

    def finish(self) -> dict:
        from benchmarks.common import max_rss_gb

        return max_rss_gb()


# ------------------------------------------------------------------------------- preprocessing


def monai_preprocess(files: list[str], spacing: list[float], shape: list[int], window: list[float],
                     workers: int) -> float:
    """Cold preprocessing of NIfTI files with a tutorial-style ``CacheDataset``; returns seconds.

    Load, channel first, RAS, resample to ``spacing`` (given in medvox's (D, H, W) = (S, A, R) order,
    MONAI wants (R, A, S)), clip + scale the CT window, pad/crop to ``shape`` (D, H, W likewise).
    """
    from monai.data import CacheDataset
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        Spacingd,
    )

    transform = Compose([
        LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=tuple(reversed(spacing)), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        ResizeWithPadOrCropd(keys="image", spatial_size=tuple(reversed(shape))),
    ])
    t0 = time.perf_counter()
    CacheDataset([{"image": f} for f in files], transform=transform, cache_rate=1.0, num_workers=workers,
                 progress=False)
    return time.perf_counter() - t0
