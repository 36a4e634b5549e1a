"""``medvox demo``: the main job on the embedded demo data, end to end, on a laptop-class CPU.

Makes the synthetic CT dataset (once), checks it, cross-validates a small ResNet-3D over 5 folds with
the full pipeline (LDAM, EMA, warmup + cosine, augmentation), evaluates the fold ensemble on the
held-out test cases, and writes the HTML report.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medvox.config import ExperimentConfig, resolve
from medvox.machine import EMULATED_BF16_SLOWDOWN, cpu_bf16_basis, cpu_bf16_native

log = logging.getLogger("medvox")

# A short schedule that still shows learning within the 10-minute budget of a 2-core CPU.
DEMO_OVERRIDES = {
    "data.target_spacing": [3.0, 1.2, 1.2],  # 32^3 voxels instead of 32x48x48: the lesions stay visible
    "train.epochs": 12,
    "train.batch_size": 8,
    "train.grad_accum": 1,
    "train.early_stopping": 0,
    "train.ema_decay": 0.99,
    "train.plots": "best_last",
    "optim.lr": 5e-4,
    "augment.flip_axes": [2],
}


def demo_config(manifest: Path, out: Path, model: str = "resnet10", epochs: int | None = None) -> ExperimentConfig:
    """The demo's config: :data:`DEMO_OVERRIDES` on ``manifest``, writing ``out/<model>``."""
    overrides = {**DEMO_OVERRIDES, "data.path": str(manifest), "train.output": str(out), "model.name": model}
    # mixed precision only where this CPU runs bf16 natively (faster than fp32 there, benchmarks/RESULTS.md);
    # elsewhere oneDNN emulates it at ~26x the fp32 step time, so the demo trains in fp32
    overrides["train.amp"] = cpu_bf16_native()
    if not overrides["train.amp"]:
        log.info("the demo trains in fp32: bf16 is emulated on this CPU (%s), %s slower than fp32",
                 cpu_bf16_basis(), EMULATED_BF16_SLOWDOWN)
    if epochs is not None:
        overrides["train.epochs"] = epochs
    return resolve(overrides=overrides)


def run_demo(out: Path, data_dir: Path = Path("demo_data"), epochs: int | None = None,
             model: str = "resnet10") -> dict:
    """Run the demo; returns the cross-validation summary."""
    from medvox.cv.crossval import cross_validate
    from medvox.data.demo import make_demo_data

    manifest = data_dir / "manifest.csv"
    if not manifest.exists():
        log.info("writing the demo dataset to %s", data_dir)
        make_demo_data(data_dir)
    summary = cross_validate(demo_config(manifest, out, model, epochs))
    run_dir = out / model
    report = _report(run_dir)
    print(f"\ndemo finished: results in {run_dir}" + (f", report {report}" if report else ""))
    return summary


def _report(run_dir: Path) -> Path | None:
    try:
        from medvox.reporting.report import write_report
    except ImportError:  # the report module is optional in a minimal install
        return None
    return write_report(run_dir)
