"""Cold preprocessing (s/volume) and warm start-up (process start -> first optimizer step).

Cold: ``medvox.data.prepare`` on a fresh cache folder -- check, fingerprint, plan, preprocess, cache,
split -- for the npz subset and for generated NIfTI CT (``make_demo_data``), interleaved with a
tutorial-style MONAI ``CacheDataset`` that loads, reorients, resamples, windows and pads the same
NIfTI files to the same spacing and shape (it only preprocesses: no checks, plan or split).

Warm: a real ``medvox train`` process (the CLI, unchanged) on the already-cached data. A global
optimizer-step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) prints a timestamp
at the first optimizer step and ends the process there; a module forward pre-hook stamps the first
forward. The clock starts in this process just before the child is spawned, so interpreter start-up
and imports count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, load_average, log, summary

# Runs inside the child: stamps, hooks, then the unchanged CLI.
_HOOKED_CLI = r"""
import json, os, sys, time
stamps = {"interpreter": time.time()}
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook
def _first_forward(module, args):
    stamps.setdefault("first_forward", time.time())
def _first_step(optimizer, args, kwargs):
    stamps["first_step"] = time.time()
    print("BENCH_STAMPS " + json.dumps(stamps), flush=True)
    os._exit(0)
register_module_forward_pre_hook(_first_forward)
register_optimizer_step_post_hook(_first_step)
from medvox.cli import main
stamps["imported"] = time.time()
sys.exit(main(sys.argv[1:]))
"""


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def cold_prepare(npz: Path, manifest: Path | None, rounds: int, tmp: Path) -> dict:
    """Interleaved cold runs: medvox on the npz, medvox on NIfTI, MONAI CacheDataset on NIfTI."""
    from benchmarks.peer_monai import monai_preprocess
    from medvox.config import DataConfig
    from medvox.data import prepare

    times: dict[str, list[float]] = {"medvox_npz": [], "medvox_nifti": [], "monai_nifti": []}
    counts: dict[str, int] = {}
    plan = None
    for r in range(rounds):
        jobs = [("medvox_npz", npz)] + ([("medvox_nifti", manifest)] if manifest else [])
        for name, path in jobs:
            cache = _fresh(tmp / f"cold_cache_{name}")
            t0 = time.perf_counter()
            prepared = prepare(DataConfig(path=str(path), cache_dir=str(cache)), progress=False)
            times[name].append(time.perf_counter() - t0)
            counts[name] = len(prepared.cases)
            if name == "medvox_nifti":
                plan = prepared.plan
            log(f"cold preprocessing: round {r + 1}/{rounds}, {name}: {times[name][-1]:.1f} s "
                f"for {counts[name]} volumes")
        if manifest and plan:
            files = _manifest_files(manifest)
            seconds = monai_preprocess(files, plan["target_spacing"], plan["target_shape"],
                                       plan["normalization"][0]["clip"], workers=os.cpu_count() or 1)
            times["monai_nifti"].append(seconds)
            counts["monai_nifti"] = len(files)
            log(f"cold preprocessing: round {r + 1}/{rounds}, monai_nifti: {seconds:.1f} s for {len(files)} volumes")
    out = {}
    for name, values in times.items():
        if values:
            out[name] = {"volumes": counts[name], "seconds": summary(values),
                         "s_per_volume": summary([v / counts[name] for v in values])}
    if plan:
        out["nifti_plan"] = {k: plan[k] for k in ("target_spacing", "target_shape")}
    return out


def _manifest_files(manifest: Path) -> list[str]:
    import csv

    with open(manifest, newline="", encoding="utf-8") as fh:
        return [str(manifest.parent / row["image"]) for row in csv.DictReader(fh)]


def _train_args(npz: Path, cache: Path, out: Path, model: str, batch: int, amp: bool) -> list[str]:
    args = ["train", "--data", str(npz), "--cache-dir", str(cache), "--model", model, "--batch_size", str(batch),
            "--gradient_accumulation_steps", "1", "--epochs", "1", "--folds", "2", "--loss", "CE",
            "--output", str(out)]
    return args + (["--amp"] if amp else [])


def _one_start(args: list[str], log_path: Path) -> dict:
    """Spawn the hooked CLI; seconds from spawn to imports done, first forward and first step."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as err:
        # cwd: a folder without a medvox.yaml, so only the flags given here configure the run
        proc = subprocess.run([sys.executable, "-c", _HOOKED_CLI, *args], cwd=log_path.parent, env=env,
                              stdout=subprocess.PIPE, stderr=err, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_STAMPS ")), None)
    if line is None:
        raise RuntimeError(f"medvox train ended (code {proc.returncode}) before its first optimizer step; "
                           f"see {log_path}")
    stamps = json.loads(line.split(" ", 1)[1])
    return {k: stamps[k] - t0 for k in ("interpreter", "imported", "first_forward", "first_step")}


def warm_startup(npz: Path, cache: Path, rounds: int, tmp: Path, model: str, batch: int, amp: bool) -> dict:
    """One first process (it may have to fill the cache), then ``rounds`` warm ones; medians."""
    runs = []
    for r in range(rounds + 1):
        out = _fresh(tmp / f"startup_run_{r}")
        stamps = _one_start(_train_args(npz, cache, out, model, batch, amp), tmp / f"startup_{r}.log")
        stamps["load_1min"] = load_average()[0] if load_average() else None
        runs.append(stamps)
        kind = "first (cache filled if needed)" if r == 0 else f"warm {r}/{rounds}"
        log(f"warm start-up: {kind}: first optimizer step after {stamps['first_step']:.1f} s "
            f"(imports done {stamps['imported']:.1f} s, first forward {stamps['first_forward']:.1f} s)")
    warm = runs[1:]
    return {"model": model, "batch": batch, "amp": amp, "first_run": runs[0], "warm_runs": warm,
            **{k: summary([w[k] for w in warm]) for k in ("interpreter", "imported", "first_forward", "first_step")}}
