"""``make bench``: medvox against the MONAI/TorchIO way of doing the same work, on the same data and machine.

Sections (each prints what it is doing to stderr as it goes):

* ``aug``: augmentation samples/s at 96^3 (medvox BatchAugment vs MONAI RandAffined vs TorchIO RandomAffine);
* ``train``: training epochs, ResNet-18-3D at 64^3, the MONAI tutorial pipeline (a), its tuned form (b)
  and medvox's engine, interleaved epoch by epoch;
* ``startup``: cold preprocessing s/volume, and warm start-up of ``medvox train`` to its first step;
* ``memory``: ResNet-50-3D at 128^3 peak memory, with and without activation checkpointing;
* ``gpu``: FLOPs per step everywhere; TFLOP/s, MFU and GPU memory where CUDA is available.

Usage::

    python benchmarks/run.py            # full, ~15 min on 2 idle cores; writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # a few minutes: fewer volumes, rounds and configurations
    python benchmarks/run.py --sections aug train --out /tmp/R.md --json /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/run.py` finds the package

from benchmarks.common import DEFAULT_NPZ, load_average, log, machine_info, subset_npz  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTIONS = ("aug", "train", "startup", "memory", "gpu")
MODES: dict[str, dict] = {
    "full": {"aug_n": 48, "aug_size": 96, "aug_rounds": 5, "cold_rounds": 3, "nifti_n": 64, "prep_n": 64,
             "startup_rounds": 3, "train_n": 64, "train_rounds": 3, "train_configs": "full",
             "model": "resnet18", "size": 64, "batch": 4, "mem_model": "resnet50", "mem_size": 128,
             "mem_precisions": ("fp32", "bf16"), "local": False},
    "quick": {"aug_n": 16, "aug_size": 96, "aug_rounds": 2, "cold_rounds": 1, "nifti_n": 0, "prep_n": 64,
              "startup_rounds": 1, "train_n": 16, "train_rounds": 2,
              "train_configs": "quick", "model": "resnet18", "size": 64,
              "batch": 4, "mem_model": "resnet50", "mem_size": 128, "mem_precisions": ("bf16",), "local": False},
    # on a GPU machine (`--device cuda`): ResNet-50-3D at 128^3, batch 6, the issue's GPU targets; the peers'
    # DataLoaders get 8 workers (such a machine has 16 cores), the CPU-only sections are left out
    "gpu": {"aug_n": 96, "aug_size": 96, "aug_rounds": 3, "workers": 8, "train_n": 96, "train_rounds": 3,
            "train_configs": ["peer_a", "peer_b", "medvox_bf16", "medvox_defaults"], "model": "resnet50",
            "size": 128, "batch": 6, "local": False, "sections": ["aug", "train", "gpu"]},
    # tests/benchmarks: tiny sizes, in-process where possible
    "smoke": {"aug_n": 4, "aug_size": 24, "aug_rounds": 1, "cold_rounds": 1, "nifti_n": 0, "prep_n": 8,
              "startup_rounds": 1, "train_n": 8, "train_rounds": 1, "train_configs": ["peer_a", "medvox_fp32", "medvox_amp"],
              "model": "resnet10", "size": 28, "batch": 4, "mem_model": "resnet10", "mem_size": 64,
              "mem_precisions": ("fp32",), "local": True, "npz": DEFAULT_NPZ.with_name("adrenalmnist3d.npz")},
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few-minute version (fewer volumes, rounds, configs)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for the harness's own test")
    mode.add_argument("--gpu", action="store_true",
                      help="GPU machine: ResNet-50-3D at 128^3 on CUDA (implies --device cuda), aug + train + gpu")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--rounds", type=int, help="interleaved training epochs per configuration")
    p.add_argument("--compile", action="store_true", help="add medvox with --compile to the training comparison")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="training comparison device")
    p.add_argument("--npz", type=Path, help=f"AdrenalMNIST3D 64^3 npz, read, never copied (default {DEFAULT_NPZ}; "
                   "--smoke: the 28^3 one next to it)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--json", type=Path, default=HERE / "results.json")
    p.add_argument("--keep-tmp", action="store_true", help="keep the scratch folder (logs, caches, runs)")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rewrite --out from the results already in --json (e.g. after editing NOTES.md)")
    return p.parse_args(argv)


def _train(args, cfg: dict, tmp: Path) -> dict:
    from benchmarks.gpu import train_step_flops
    from benchmarks.train_bench import precision_note, ratios, run_training, train_configs

    names = cfg["train_configs"]
    if isinstance(names, str):  # "full" / "quick": the precisions this CPU runs natively (train_configs)
        names = train_configs(names == "full", machine_info()["bf16_native"])
    names = list(names) + (["medvox_compile"] if args.compile else [])
    npz = subset_npz(args.npz, tmp / f"train_{cfg['train_n']}.npz", cfg["train_n"], size=cfg["size"])
    base = {"npz": str(npz), "n": cfg["train_n"], "batch": cfg["batch"], "workers": cfg.get("workers", 2),
            "model": cfg["model"],
            "size": cfg["size"], "lr": 2e-4, "device": args.device, "cache_dir": str(tmp / "train_cache"),
            "out_dir": str(tmp / "train_runs"), "seed": 0}
    rounds = args.rounds or cfg["train_rounds"]
    log(f"training: {', '.join(names)}; {rounds} interleaved epochs of {cfg['train_n']} volumes each")
    configs = run_training(names, base, rounds, tmp, local=cfg["local"])
    return {"spec": base, "rounds": rounds, "configs": configs, "ratios": ratios(configs),
            "precision_note": precision_note(configs),
            "step_flops": train_step_flops(cfg["model"], cfg["size"], cfg["batch"])}


def _startup(args, cfg: dict, tmp: Path, amp: bool, with_warm: bool) -> dict:
    from benchmarks.startup_bench import cold_prepare, warm_startup
    from medvox.data.demo import make_demo_data

    npz = subset_npz(args.npz, tmp / f"prep_{cfg['prep_n']}.npz", cfg["prep_n"])
    manifest = None
    if cfg["nifti_n"]:
        log(f"cold preprocessing: generating {cfg['nifti_n']} NIfTI CT volumes (not timed)")
        manifest = make_demo_data(tmp / "nifti", n_cases=cfg["nifti_n"], seed=0)
    out = {"cold": cold_prepare(npz, manifest, cfg["cold_rounds"], tmp)}
    if with_warm:
        out["warm"] = warm_startup(npz, tmp / "warm_cache", cfg["startup_rounds"], tmp, cfg["model"], cfg["batch"], amp)
    return out


def main(argv: list[str] | None = None) -> int:
    import warnings

    # the peers' deprecation and optional-plugin warnings would bury the progress lines
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    args = _parse(argv)
    if args.render_only:
        _write(json.loads(args.json.read_text(encoding="utf-8")), args)
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "gpu" if args.gpu else "full"
    cfg = MODES[mode]
    if mode == "gpu":
        args.device = "cuda"
    args.npz = args.npz or cfg.get("npz", DEFAULT_NPZ)
    # smoke: the start-up and memory sections spawn several fresh Python processes each (too slow for a test)
    sections = args.sections or cfg.get("sections") or (["aug", "train", "gpu"] if args.smoke else list(SECTIONS))
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="medvox-bench-"))
    log(f"{mode} run of {', '.join(sections)}; scratch folder {tmp}")
    results: dict = {"machine": machine_info()}
    try:
        if "aug" in sections:
            from benchmarks.aug_bench import run_augmentation

            results["augmentation"] = run_augmentation(args.npz, cfg["aug_n"], cfg["aug_size"], 8, cfg["aug_rounds"],
                                                       cfg.get("workers", 2), device=args.device)
        if "train" in sections:
            results["training"] = _train(args, cfg, tmp)
        if "startup" in sections:
            note = (results.get("training") or {}).get("precision_note") or "bf16"
            results["startup"] = _startup(args, cfg, tmp, amp=note.startswith("bf16"), with_warm=True)
        if "memory" in sections:
            from benchmarks.memory_bench import run_memory

            # bf16 only where it is native: emulated, one ResNet-50 128^3 step takes minutes and measures nothing
            # a user would run
            precisions = [p for p in cfg["mem_precisions"] if p != "bf16" or results["machine"]["bf16_native"]]
            results["memory"] = run_memory(cfg["mem_model"], cfg["mem_size"], tuple(precisions or ["fp32"]), tmp)
        if "gpu" in sections:
            from benchmarks.gpu import run_gpu

            results["gpu"] = run_gpu(quick=mode not in ("full", "gpu"))
    finally:
        if args.keep_tmp:
            log(f"scratch folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["meta"] = {"command": " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
                       "date": results["machine"]["date"], "mode": mode, "sections": sections,
                       "duration_s": time.perf_counter() - started, "load_end": load_average()}
    _write(results, args)
    return 0


def _write(results: dict, args) -> None:
    from benchmarks.aug_bench import aug_ratios
    from benchmarks.report import render, target_rows
    from benchmarks.train_bench import precision_note, ratios

    # every derived figure is recomputed here from the raw measurements (also with --render-only)
    if results.get("augmentation"):
        results["augmentation"]["ratios"] = aug_ratios(results["augmentation"]["methods"])
    if results.get("training"):
        results["training"]["ratios"] = ratios(results["training"]["configs"])
        results["training"]["precision_note"] = precision_note(results["training"]["configs"])
    notes_path = HERE / "NOTES.md"
    notes = notes_path.read_text(encoding="utf-8") if notes_path.is_file() and args.out == HERE / "RESULTS.md" else ""
    results["targets"] = target_rows(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    args.out.write_text(render(results, notes), encoding="utf-8")
    log(f"wrote {args.out} and {args.json} ({results['meta']['duration_s'] / 60:.1f} min)")
    for row in results["targets"]:
        state = "n/a" if row["met"] is None else ("met" if row["met"] else "MISSED")
        print(f"  {state:6s} {row['what']}: {row['value'] if row['value'] is None else round(row['value'], 3)} "
              f"(goal {row['target']})")


if __name__ == "__main__":
    sys.exit(main())
