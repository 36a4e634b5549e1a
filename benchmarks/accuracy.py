"""Accuracy study on AdrenalMNIST3D: medvox recipes (``medvox cv``) against a plain MONAI model.

Every medvox recipe is one ``medvox cv`` run: 5-fold cross-validation on the official train+val pool
(1,286 volumes; every choice, checkpoint and threshold made on validation folds only), then the fold
ensemble on the official test split (298 volumes), with and without flip TTA and temperature scaling.
The MONAI baseline (``benchmarks/monai_baseline.py``) trains once on the official train split and
picks its checkpoint on the official val split, as the MedMNIST papers do. Each run is repeated
over seeds (``--seed`` and ``--split-seed`` of medvox; the seed of the MONAI script).

Usage::

    python benchmarks/accuracy.py run --jobs default r18_ce monai_wce --seeds 0 1 2 --parallel 2 --out /tmp/acc
    python benchmarks/accuracy.py report --out /tmp/acc --merge   # -> benchmarks/accuracy.json + accuracy.md
    python benchmarks/accuracy.py report                          # accuracy.md again from accuracy.json alone

``run`` starts the jobs (``--parallel`` at a time, each in its own process, progress on stderr) and
keeps only the small files of every finished run (summaries and predictions; checkpoints deleted
with ``--drop-checkpoints``); ``report --out`` reads them into ``accuracy.json``, one compact summary per
run (with ``--merge`` added to the runs already there), and writes the tables from it; the run folders
themselves stay out of the repository. The decision threshold for
ACC, balanced accuracy and F1 of an ensemble is chosen on the pooled, per-fold calibrated
out-of-fold predictions (never on test); the rule is the recipe's (``youden`` by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("MEDVOX_MEDMNIST_DIR", REPO.parent / "shared" / "data" / "medmnist"))

# the recipe the plan picks for a small imbalanced dataset at 28^3 is spelled out here flag by flag, so the
# study compares it with explicit alternatives (see benchmarks/accuracy.md for the outcome)
_BASE = ["--lr", "1e-3", "--optimizer", "adamw", "--weight-decay", "0.05", "--batch_size", "16",
         "--gradient_accumulation_steps", "1", "--epochs", "40", "--dropout", "0.2", "--early_stopping", "10",
         "--ema_decay", "0.998", "--amp", "--loss", "weighted_CE", "--set", "augment.flip_axes=2"]


def _swap(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


_STEM1 = ["--set", 'model.kwargs={"stem_stride": 1}']
RECIPES: dict[str, dict] = {
    "r18": {"desc": "ResNet-18-3D, AdamW 1e-3, wd 0.05, batch 16, 40 ep., weighted CE, EMA 0.998, L-R flips",
            "args": ["--model", "resnet18", *_BASE]},
    "r18f": {"desc": "r18 + a logistic regression on shape/intensity descriptors, mixed in at the OOF-chosen weight",
             "args": ["--model", "resnet18", *_BASE, "--set", "train.feature_fusion=true"]},
    "r10s1": {"desc": "ResNet-10-3D with a stride-1 stem, otherwise as r18",
              "args": ["--model", "resnet10", *_BASE, *_STEM1]},
    "r18s1": {"desc": "ResNet-18-3D with a stride-1 stem, otherwise as r18", "args": ["--model", "resnet18", *_BASE, *_STEM1]},
    "r18_ldam": {"desc": "r18 with LDAM-DRW (cosine head)", "args": _swap(["--model", "resnet18", *_BASE], "--loss", "LDAM")},
    "r18_ce": {"desc": "r18 with plain cross-entropy", "args": _swap(["--model", "resnet18", *_BASE], "--loss", "CE")},
    "r18_mixup": {"desc": "r18 with mixup (Beta(0.4, 0.4), one mix per batch)",
                  "args": ["--model", "resnet18", *_BASE, "--set", "augment.mixup=0.4"]},
    "r18_noema": {"desc": "r18 without EMA", "args": _swap(["--model", "resnet18", *_BASE], "--ema_decay", "0")},
    "r50": {"desc": "ResNet-50-3D from scratch, otherwise as r18", "args": ["--model", "resnet50", *_BASE]},
    "mil": {"desc": "gated-attention MIL over slices, otherwise as r18", "args": ["--model", "mil", *_BASE]},
    "swin": {"desc": "Swin UNETR encoder (input padded to 32^3), otherwise as r18",
             "args": ["--model", "swin_unetr", *_BASE, "--target-shape", "32", "32", "32", "--target-spacing", "1", "1", "1"]},
    "r18_64": {"desc": "r18 on the 64^3 release", "args": ["--model", "resnet18", *_BASE], "data": "64"},
    "r10s1_64": {"desc": "r10s1 on the 64^3 release", "args": ["--model", "resnet10", *_BASE, *_STEM1], "data": "64"},
    "original": {"desc": "the original pipeline's defaults from scratch: ResNet-50, Adam 2e-4, batch 6 x 2, LDAM, "
                         "60 ep., patience 7, dropout 0.4, EMA 0.999", "args": ["--model", "resnet50", "--amp"]},
    "default": {"desc": "what `medvox cv` picks with no recipe flags (the fingerprint plan)", "args": []},
    "auto": {"desc": "`--recipe auto --amp`: the plan's recipe (r18's settings and descriptor fusion)",
             "args": ["--recipe", "auto", "--amp"]},
    "r18f64": {"desc": "r18f with the descriptors on the 64^3 release's grid (the CNN at 28^3; post hoc: "
                       "`fuse --features-data`, the CNN of the r18 runs)",
               "args": ["--model", "resnet18", *_BASE, "--target-shape", "28", "28", "28", "--set",
                        "train.feature_fusion=true"], "data": "64"},
    "auto_f64": {"desc": "auto's runs (CNN on the 28^3 release) re-fused with the descriptors of the 64^3 release "
                         "(post hoc: `fuse --features-data`); the end-to-end form is auto64",
                 "args": ["--recipe", "auto", "--amp", "--target-shape", "28", "28", "28"], "data": "64"},
    "auto64": {"desc": "`--recipe auto --amp` on the 64^3 release, CNN input 28^3: descriptors on the native 64^3 grid",
               "args": ["--recipe", "auto", "--amp", "--target-shape", "28", "28", "28"], "data": "64"},
    # the same command as auto64 once the plan anti-aliases downsampling: the auto64 rows were made with plain
    # linear interpolation from 64^3 to the CNN's 28^3
    "auto64aa": {"desc": "auto64 with anti-aliased downsampling to the CNN's 28^3 (the plan's default; auto64's "
                         "runs used plain interpolation)",
                 "args": ["--recipe", "auto", "--amp", "--target-shape", "28", "28", "28"], "data": "64"},
}
BASELINES = {"monai_ce": "CE", "monai_wce": "weighted_CE"}
PUBLISHED = [  # MedMNIST v2 (Yang et al., Scientific Data 2023), AdrenalMNIST3D, official test split, 28^3
    ("MedMNIST v2: ResNet-18 + 3D (published)", 0.827, 0.721),
    ("MedMNIST v2: ResNet-50 + 3D (published)", 0.828, 0.745),
    ("MedMNIST v2: ResNet-18 + ACS (published)", 0.839, 0.754),
    ("MedMNIST v2: auto-sklearn (published)", 0.828, 0.802),
]
KEEP = ("cv_summary.json", "cv_table.md", "oof_predictions.csv", "test_predictions.csv")  # medvox.run's names


def _npz(kind: str) -> Path:
    return DATA / ("adrenalmnist3d_64.npz" if kind == "64" else "adrenalmnist3d.npz")


def job_command(name: str, seed: int, out: Path, gpu: bool, threads: int | None,
                smoke: bool = False, extra: list[str] | None = None) -> tuple[list[str], Path]:
    """(command, result folder) of one job; ``smoke``: 1 epoch (and 2 folds), to test the harness."""
    py = [sys.executable]
    if name in BASELINES:
        result = out / "runs" / f"{name}_s{seed}.json"
        cmd = [*py, str(REPO / "benchmarks" / "monai_baseline.py"), "--npz", str(_npz("28")), "--seed", str(seed),
               "--loss", BASELINES[name], "--out", str(result), "--workers", "2"]
        cmd += ["--epochs", "1"] if smoke else []
        return cmd + (["--threads", str(threads)] if threads else []), result
    recipe = RECIPES[name]
    run_name = f"{name}_s{seed}"
    cmd = [*py, "-m", "medvox", "cv", "--data", str(_npz(recipe.get("data", "28"))), "--output", str(out / "runs"),
           "--run-name", run_name, "--seed", str(seed), "--split-seed", str(seed), "--plots", "final",
           "--set", "train.keep_last=false", *recipe["args"]]
    if gpu:
        cmd.append("--gpu")
    if smoke:
        cmd += ["--epochs", "1", "--folds", "2"]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += list(extra or [])  # last: wins over the recipe's flags
    return cmd, out / "runs" / run_name


def _keep_small(run_dir: Path, dest: Path) -> None:
    """Copy the summaries and predictions of a finished ``medvox cv`` run (and each fold's metrics)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    if (run_dir / "features").is_dir():  # the feature models (JSON) and their predictions: small
        shutil.copytree(run_dir / "features", dest / "features", dirs_exist_ok=True)
    for fold in sorted(run_dir.glob("fold_*")):
        for name in ("metrics.json", "config.json", "plan.json"):
            if (fold / name).is_file():
                (dest / fold.name).mkdir(exist_ok=True)
                shutil.copy2(fold / name, dest / fold.name / name)


def _job_env() -> dict[str, str]:
    """The environment every job runs in (and the pre-flight check imports in): medvox from this checkout."""
    path = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def preflight(jobs: list[tuple[str, int]], python: str = sys.executable) -> str | None:
    """Why ``python`` cannot run ``jobs`` (a missing module), or None: said before any job starts, instead
    of every job failing a second later with the error in its log."""
    modules = ["torch", "rich", "medvox.cli"] if any(name not in BASELINES for name, _ in jobs) else []
    modules += ["monai", "torch"] if any(name in BASELINES for name, _ in jobs) else []
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
    done = subprocess.run([python, "-c", code, *dict.fromkeys(modules)], env=_job_env(), capture_output=True,
                          text=True)
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return (f"{python} cannot run these jobs ({last}); run the harness with the project's environment, "
            f"e.g. `.venv/bin/python benchmarks/accuracy.py run ...` after `make install`")


def fold_commands(cv_cmd: list[str]) -> list[list[str]]:
    """The folds of a medvox job's ``medvox cv`` command as separate ``medvox train --fold K --resume``
    commands: the same flags (``cv`` sets ``fold`` and ``resume`` the same way for each fold), so the configs
    they save are the ones ``cv`` would write, and as many as its ``--folds`` (the last one given, as argparse
    reads it; medvox's default without). ``cv`` itself, run after them, finds every fold finished and only
    summarises (OOF, calibration, fusion, test ensemble). Used with ``--fold-parallel`` on a GPU, where one
    small model leaves the device mostly idle and the folds can share it."""
    from medvox.config import DataConfig

    given = [int(cv_cmd[i + 1]) for i, arg in enumerate(cv_cmd[:-1]) if arg == "--folds"]
    folds = given[-1] if given else DataConfig().folds
    at = cv_cmd.index("cv")
    return [[*cv_cmd[:at], "train", *cv_cmd[at + 1:], "--fold", str(k), "--resume"] for k in range(folds)]


@dataclasses.dataclass
class _Task:
    key: str  # the log's name: <job> or <job>_fold<K>
    job: str  # <name>_s<seed>: the timings' key
    cmd: list[str]
    after: tuple[str, ...] = ()  # task keys that must have finished with exit status 0


def _tasks(jobs: list[tuple[str, int]], out: Path, gpu: bool, threads: int | None, smoke: bool,
           extra: list[str] | None, fold_parallel: bool) -> tuple[list[_Task], dict[str, tuple]]:
    """The processes to run, in order, and per job (name, seed, result folder)."""
    tasks, meta = [], {}
    for name, seed in jobs:
        job = f"{name}_s{seed}"
        cmd, result = job_command(name, seed, out, gpu, threads, smoke, extra)
        meta[job] = (name, seed, result)
        if fold_parallel and name not in BASELINES:
            folds = [_Task(f"{job}_fold{k}", job, c) for k, c in enumerate(fold_commands(cmd))]
            tasks += [*folds, _Task(job, job, cmd, tuple(t.key for t in folds))]
        else:
            tasks.append(_Task(job, job, cmd))
    return tasks, meta


def run_jobs(jobs: list[tuple[str, int]], out: Path, parallel: int, gpu: bool, threads: int | None,
             deadline: float | None, drop_checkpoints: bool, smoke: bool = False,
             hard_deadline: float | None = None, extra: list[str] | None = None, fold_parallel: bool = False) -> None:
    """Run ``jobs`` (recipe/baseline name, seed), ``parallel`` processes at a time; record the time and CPU
    time of each job. ``fold_parallel``: each medvox job's folds are processes of their own
    (:func:`fold_commands`), then its ``medvox cv`` summarises; a job's time runs from its first fold's
    start to the summary's end, its CPU time is the sum over its processes."""
    out = out.resolve()  # the jobs run with `out` as their working folder: a relative path would nest
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    env = _job_env()
    timing_path = out / "timings.json"
    timings = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    tasks, meta = _tasks(jobs, out, gpu, threads, smoke, extra, fold_parallel)
    pending = [t for t in tasks if timings.get(t.job, {}).get("rc") != 0]
    running, exits, first_start, cpu = {}, {}, {}, {}
    device = ("cuda" if gpu else "cpu") + (", folds in parallel" if fold_parallel else "")
    start = time.time()

    def record(job: str, rc: int | None, **more) -> None:
        name, seed, _ = meta[job]
        timings[job] = {"name": name, "seed": seed, "rc": rc, "wall_seconds": time.time() - first_start[job],
                        "cpu_seconds": cpu.get(job), "device": device, "parallel": parallel, **more}
        timing_path.write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")

    while pending or running:
        if deadline is not None and time.time() >= deadline:  # no new work; a job's summary whose folds all
            started = set(exits) | {t.key for t, _, _ in running.values()}  # started still runs (it is short)
            pending = [t for t in pending if t.after and all(k in started for k in t.after)]
        for task in list(pending):
            if len(running) >= parallel:
                break
            failed = [k for k in task.after if k in exits and exits[k] != 0]
            if failed:  # a fold failed: the job's summary would train it again, on its own; not started
                pending.remove(task)
                record(task.job, exits[failed[0]], failed=f"{failed[0]} exited with {exits[failed[0]]}")
                continue
            if any(k not in exits for k in task.after):
                continue
            pending.remove(task)
            log = open(out / "logs" / f"{task.key}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
            proc = subprocess.Popen(task.cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[proc.pid] = (task, proc, log)
            first_start.setdefault(task.job, time.time())
            print(f"[{time.time() - start:6.0f} s] start {task.key}", file=sys.stderr, flush=True)
        if not running:
            break
        if hard_deadline is not None and time.time() >= hard_deadline:
            break
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.5)
            continue
        if pid not in running:
            continue
        task, proc, log = running.pop(pid)
        proc.returncode = exits[task.key] = os.waitstatus_to_exitcode(status)
        log.close()
        cpu[task.job] = cpu.get(task.job, 0.0) + usage.ru_utime + usage.ru_stime
        print(f"[{time.time() - start:6.0f} s] done  {task.key}: exit {proc.returncode}, "
              f"{time.time() - first_start[task.job]:.0f} s since the job started", file=sys.stderr, flush=True)
        if task.key != task.job:  # a fold: its job's summary records the job
            continue
        record(task.job, proc.returncode)
        name, _, result = meta[task.job]
        if name not in BASELINES and result.is_dir():
            _keep_small(result, out / "kept" / task.job)
            if drop_checkpoints and proc.returncode == 0:  # a failed summary keeps its folds' models to rerun it
                for pattern in ("*.pt", "*.safetensors"):
                    for path in result.rglob(pattern):
                        path.unlink(missing_ok=True)
    # processes cut by the hard deadline: stopped, their jobs recorded as unfinished
    for task, proc, log in running.values():
        proc.kill()
        proc.wait()
        log.close()
        record(task.job, None, unfinished="stopped at the time limit")
        print(f"stopped {task.key} at the time limit", file=sys.stderr, flush=True)
    timing_path.write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")


def fuse_kept(src: Path, out: Path, rule: str = "youden", name: str = "r18f", features_data: Path | None = None) -> str:
    """Fuse a finished run's kept predictions with the descriptor model, as ``medvox cv --set
    train.feature_fusion=true`` does at its end (:func:`medvox.cv.summary.summarize`), into
    ``out/kept/<name>_s<seed>``, through medvox's own functions: :func:`medvox.descriptors.fit_fusion` on the
    run's per-fold calibrated out-of-fold predictions (``oof_predictions.csv``), the decision chosen by ``rule``
    on the mixture (:class:`~medvox.metrics.decision.Decision`), the files written by :mod:`medvox.run` and the
    figures computed from them by :func:`~medvox.cv.summary.figures_of`. The kept folder has no checkpoints,
    so the CNN's test probabilities are its ``test_predictions.csv``'s calibrated ones (the calibrated TTA
    ensemble, which is what ``summarize`` mixes) and its ``spread`` column is kept (the CNN members' spread
    of the decided class: the same for two classes whichever class is decided). The time recorded is the
    source run's plus the fusion's."""
    from medvox import run as runfiles
    from medvox.config import from_dict
    from medvox.cv.summary import figures_of, folds_at_decision, format_table
    from medvox.data import prepare
    from medvox.descriptors import fit_fusion, mix
    from medvox.metrics.classification import compute_metrics
    from medvox.metrics.decision import Decision

    src, out = src.resolve(), out.resolve()
    timings_src = json.loads((src.parent.parent / "timings.json").read_text())[src.name]
    seed = timings_src["seed"]
    key = f"{name}_s{seed}"
    dest = out / "kept" / key
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    shutil.rmtree(dest / runfiles.FEATURES, ignore_errors=True)  # a former fusion must not be read as this one
    run = runfiles.Run(dest)
    cfg = from_dict(run.config)
    t0 = time.time()
    prepared = prepare(cfg.data, progress=False)
    features_from = None
    if features_data is not None:  # the same cases from another file (the 64^3 release), on its own grid
        features_from = prepare(dataclasses.replace(cfg.data, path=str(features_data), target_shape=None,
                                                    target_spacing=None), progress=False)
    summary, oof, test_preds = run.summary, run.oof(), run.test()
    if oof is None or test_preds is None:
        raise runfiles.RunError(f"{src}: the kept run lacks {runfiles.OOF_PREDICTIONS} or {runfiles.TEST_PREDICTIONS}")
    classes = run.classes
    fusion = fit_fusion(dest, prepared, oof.ids, oof.folds, oof.labels, _column(oof, "calibrated"), progress=False,
                        seed=cfg.train.seed, features_from=features_from)
    if test_preds.ids != fusion["test_ids"]:
        raise ValueError(f"{src}: {runfiles.TEST_PREDICTIONS} does not list the prepared test cases in order")
    decision = Decision.fit(oof.labels, fusion["oof"], classes, rule=rule, probabilities="fused",
                            fitted_on="the pooled out-of-fold predictions, each fold's calibrated, mixed with the "
                                      "descriptor model (benchmarks/accuracy.py fuse)")
    oof_path = runfiles.write_predictions(dest / runfiles.OOF_PREDICTIONS, oof.ids, oof.groups, oof.labels,
                                          fusion["oof"], classes, decision, raw=_column(oof, "raw"),
                                          calibrated=_column(oof, "calibrated"), extra=oof.extra)
    fused = mix(_column(test_preds, "calibrated"), fusion["test_features"], fusion["weight"])
    test_path = runfiles.write_predictions(dest / runfiles.TEST_PREDICTIONS, test_preds.ids, test_preds.groups,
                                           test_preds.labels, fused, classes, decision,
                                           raw=_column(test_preds, "raw"), calibrated=_column(test_preds, "calibrated"),
                                           extra=test_preds.extra)
    oof = runfiles.read_predictions(oof_path, classes)
    test = summary["test"]
    test["fused"] = compute_metrics(test_preds.labels, fused, class_names=classes)
    test["final"] = "fused"
    test["final_at_threshold"] = figures_of(runfiles.read_predictions(test_path, classes))
    fusion_json = runfiles.read_json(dest / runfiles.FEATURES / runfiles.FUSION)  # written by fit_fusion
    summary.update({"probabilities": "fused", "decision": decision.to_json(), "cv_at_decision": folds_at_decision(oof),
                    "oof": figures_of(oof), "fusion": {k: v for k, v in fusion_json.items() if k != "curve"}})
    runfiles.write_json(dest / runfiles.CV_SUMMARY, summary)
    (dest / runfiles.CV_TABLE).write_text(format_table(summary) + "\n", encoding="utf-8")
    seconds = time.time() - t0
    timing_path = out / "timings.json"
    timings = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    timings[key] = {**timings_src, "name": name, "wall_seconds": timings_src["wall_seconds"] + seconds,
                    "cpu_seconds": (timings_src.get("cpu_seconds") or 0) + seconds, "fusion_seconds": seconds,
                    "fused_from": str(src.relative_to(REPO) if src.is_relative_to(REPO) else src),
                    "features_data": None if features_data is None else features_data.name}
    out.mkdir(parents=True, exist_ok=True)
    timing_path.write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
    print(f"{key}: weight {fusion['weight']:.2f}, OOF AUC {fusion['oof_auc']['cnn']:.3f} -> {fusion['oof_auc']['fused']:.3f}, "
          f"test AUC {test['ensemble_tta_calibrated']['auc']:.3f} -> {test['fused']['auc']:.3f} ({seconds:.0f} s)")
    return key


# ------------------------------------------------------------------------------------------- analysis


def _column(preds, which: str) -> np.ndarray:
    """``preds``' ``raw`` or ``calibrated`` probabilities: a predictions CSV leaves out the columns equal to its
    ``prob_`` ones, so those are the ``probs``."""
    found = getattr(preds, which)
    return preds.probs if found is None else found


def _auc(preds, probs: np.ndarray) -> float | None:
    """The AUC of ``preds``' cases with the probabilities ``probs`` (its raw or calibrated ones), computed by
    :func:`~medvox.cv.summary.figures_of` (the AUC does not depend on the decision: the argmax is used)."""
    from medvox.cv.summary import figures_of
    from medvox.metrics.decision import Decision

    return figures_of(dataclasses.replace(preds, probs=probs, decision=Decision.argmax(preds.classes)))["auc"]


def medvox_result(kept: Path, rule: str = "youden") -> dict:
    """Test metrics of a finished cv run: single folds, ensemble, + TTA, + calibration, + OOF threshold.

    The thresholds are chosen by each rule on the run's final pooled out-of-fold probabilities (per-fold
    calibrated, fused where the run is: ``oof_predictions.csv``'s ``prob_`` columns, which the run's own
    decision was chosen on) and applied to its test ensemble's (``test_predictions.csv``); the figures are
    :func:`~medvox.cv.summary.figures_of` of those files at each decision."""
    from medvox.cv.summary import figures_of
    from medvox.metrics.decision import Decision
    from medvox.run import Run, RunError

    run = Run(kept)
    summary, classes = run.summary, run.classes
    if summary is None:
        raise RunError(f"{kept}: no cv_summary.json (an unfinished cross-validation)")
    test = summary["test"]
    oof, test_preds = run.oof().labelled(), run.test()  # the final probabilities: calibrated (TTA), fused if it was
    out = {
        "single_fold_auc": float(np.mean([m["auc"] for m in test["per_fold"]])),
        "single_fold_acc": float(np.mean([m["accuracy"] for m in test["per_fold"]])),
        "ensemble_auc": test["ensemble"]["auc"],
        "ensemble_tta_auc": (test.get("ensemble_tta") or {}).get("auc"),
        "calibrated_auc": (test.get("ensemble_tta_calibrated") or {}).get("auc"),
        "fused_auc": (test.get("fused") or {}).get("auc"), "fusion_weight": (summary.get("fusion") or {}).get("weight"),
        "cv_auc_mean": summary["cv"]["auc"]["mean"],
        "oof_auc": _auc(oof, _column(oof, "raw")),  # pooled, uncalibrated
        "oof_auc_calibrated": figures_of(oof)["auc"],  # pooled, final (calibrated, fused where fused)
    }
    out["argmax"] = figures_of(dataclasses.replace(test_preds, decision=Decision.argmax(classes)))
    for r in ("youden", "f1", "accuracy"):
        decision = Decision.fit(oof.labels, oof.probs, classes, rule=r, probabilities=oof.decision.probabilities)
        out[f"at_{r}"] = {**figures_of(dataclasses.replace(test_preds, decision=decision)), "threshold": decision.cut}
    out["chosen"] = out[f"at_{rule}"]
    out["epochs_run"] = [f.metrics["epochs_run"] for f in run.folds if f.metrics is not None]
    return out


def fold_level(run: Path) -> dict:
    """A run's fold-level figures from its fold folders alone, so that a run whose summary never ran (its
    checkpoints lost) still compares: each fold's final validation and test AUC (``metrics.json``), the
    AUC of the folds' validation predictions pooled, uncalibrated (``oof_auc``) and each fold's calibrated
    (``oof_auc_calibrated``: its ``calibration.json``'s temperature, fitted on its validation predictions
    where the summary never wrote one; the pooled OOF AUC of ``cv_summary.json`` for a run without fusion),
    and the test AUC of the fold ensemble without TTA or calibration (the mean of the folds' test
    probabilities: the ``ensemble`` variant of ``cv_summary.json``). A run with a summary is read from it and
    its ``oof_predictions.csv`` instead (kept runs hold no fold predictions)."""
    from medvox import run as runfiles
    from medvox.cv.summary import figures_of, pooled_oof
    from medvox.metrics.calibration import fit_calibration
    from medvox.metrics.decision import Decision

    opened = runfiles.Run(run)
    folds = opened.folds
    finals = [f.metrics["final"] for f in folds]
    out = {"run": opened.name, "folds": len(folds), "val_auc": [f["val"]["auc"] for f in finals],
           "fold_test_auc": [f["test"]["auc"] for f in finals if f.get("test")]}
    if opened.summary is not None:
        oof = opened.oof()
        out["oof_auc"], out["oof_auc_calibrated"] = _auc(oof, _column(oof, "raw")), _auc(oof, _column(oof, "calibrated"))
        out["test_ensemble_auc"] = opened.summary["test"]["ensemble"]["auc"]
        return out

    def temperature(fold: runfiles.Fold) -> float:
        if fold.calibration is not None:
            return float(fold.calibration["temperature"])
        val = runfiles.read_predictions(fold.path / runfiles.VAL_PREDICTIONS).labelled()
        return float(fit_calibration(val.labels, val.raw if val.raw is not None else val.probs)["temperature"])

    rows, _, calibrated = pooled_oof([f.path for f in folds], [temperature(f) for f in folds])
    out["oof_auc"], out["oof_auc_calibrated"] = figures_of(rows)["auc"], _auc(rows, calibrated)
    tests = [runfiles.read_predictions(f.path / runfiles.TEST_PREDICTIONS) for f in folds]
    if any(t.ids != tests[0].ids for t in tests):
        raise runfiles.RunError(f"{run}: the folds' {runfiles.TEST_PREDICTIONS} list different cases")
    mean = np.mean([_column(t, "raw") for t in tests], axis=0)
    out["test_ensemble_auc"] = figures_of(dataclasses.replace(tests[0], probs=mean, raw=mean, calibrated=None,
                                                              decision=Decision.argmax(tests[0].classes)))["auc"]
    return out


def render_fold_level(rows: list[dict]) -> str:
    lines = ["| run | folds | fold val AUC (final weights) | pooled OOF AUC (uncalibrated) | pooled OOF AUC (per-fold "
             "calibrated) | fold test AUC, mean | test ensemble AUC (no TTA) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['folds']} | {' / '.join(f'{v:.3f}' for v in r['val_auc'])} | "
                     f"{r['oof_auc']:.3f} | {r['oof_auc_calibrated']:.3f} | {np.mean(r['fold_test_auc']):.3f} | "
                     f"{r['test_ensemble_auc']:.3f} |")
    return "\n".join(lines)


def collect(outs: Path | list[Path], rule: str, previous: dict | None = None) -> dict:
    """Every finished run under the ``outs`` folders: per run and, per recipe, mean and std over seeds.

    ``previous``: an earlier result of this function (``accuracy.json``), whose runs are kept where ``outs``
    holds no run of the same name, so new runs are added to the report without the old runs' folders. Their
    paired rows are kept as well unless both runs of a pair can be read again."""
    runs = collect_runs(outs, rule)
    if previous is not None:
        if previous["rule"] != rule:
            raise ValueError(f"the previous results were made with --rule {previous['rule']}, not {rule}")
        runs = {**previous["runs"], **runs}
    paired = paired_against({k: r for k, r in runs.items() if "kept" not in r or Path(r["kept"]).is_dir()})
    if previous is not None:
        fresh = {(row["recipe"], row["seed"]) for row in paired}
        paired += [row for row in previous.get("paired", []) if (row["recipe"], row["seed"]) not in fresh]
        paired.sort(key=lambda row: f"{row['recipe']}_s{row['seed']}")
    return {"rule": rule, "runs": runs, "recipes": recipe_table(runs), "paired": paired}


def collect_runs(outs: Path | list[Path], rule: str) -> dict[str, dict]:
    """The finished runs under the ``outs`` folders (``run --out``), each with its test figures."""
    runs: dict[str, dict] = {}
    for out in [outs] if isinstance(outs, Path) else outs:
        timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
        for key, t in timings.items():
            if t["rc"] != 0:
                continue
            if t["name"] in BASELINES:
                res = json.loads((out / "runs" / f"{key}.json").read_text())
                runs[key] = {**t, "test": res["test"], "best_val_auc": res["best_val_auc"]}
            elif (out / "kept" / key / "cv_summary.json").is_file():
                res = medvox_result(out / "kept" / key, rule)
                runs[key] = {**t, **res, "test": res["chosen"], "kept": str(out / "kept" / key)}
    return runs


def recipe_table(runs: dict[str, dict]) -> dict[str, dict]:
    """Per recipe: the mean and std over its runs (seeds) of every figure the report shows."""
    recipes: dict[str, dict] = {}
    for r in runs.values():
        recipes.setdefault(r["name"], []).append(r)
    table = {}
    for name, rs in recipes.items():
        row = {"n_seeds": len(rs), "seeds": sorted(r["seed"] for r in rs),
               "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in rs])),
               "cpu_seconds_mean": (float(np.mean([r["cpu_seconds"] for r in rs]))
                                    if all(r.get("cpu_seconds") is not None for r in rs) else None),
               "device": rs[0]["device"]}
        for m in ("auc", "accuracy", "balanced_accuracy", "f1"):
            vals = [r["test"][m] for r in rs]
            row[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}
        for m in ("single_fold_auc", "ensemble_auc", "ensemble_tta_auc", "calibrated_auc", "fused_auc",
                  "oof_auc_calibrated", "cv_auc_mean"):
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                row[m] = float(np.mean(vals))
        if any(r.get("fusion_weight") is not None for r in rs):
            row["fusion_weights"] = [f"{r['fusion_weight']:.2f}" for r in sorted(rs, key=lambda r: r["seed"])]
        if "argmax" in rs[0]:
            for label in ("argmax", "at_youden", "at_f1", "at_accuracy"):
                row[label] = {m: float(np.mean([r[label][m] for r in rs]))
                              for m in ("accuracy", "balanced_accuracy", "f1")}
        table[name] = row
    return table


def paired_against(runs: dict[str, dict], reference: str = "r18", n_boot: int = 1000) -> list[dict]:
    """``medvox compare`` of every medvox run with the ``reference`` recipe's run of the same seed (the same
    CV split, so the same out-of-fold cases): DeLong's test of the two correlated AUCs, out-of-fold (what a
    choice may rest on) and on test (for information), as recipe minus reference."""
    from medvox.reporting.compare import compare_runs
    from medvox.run import Run

    refs = {r["seed"]: r for r in runs.values() if r["name"] == reference and "kept" in r}
    rows = []
    for key in sorted(runs):
        r = runs[key]
        if r["name"] == reference or "kept" not in r or r["seed"] not in refs:
            continue
        result = compare_runs([Run(Path(refs[r["seed"]]["kept"])), Run(Path(r["kept"]))], n_boot=n_boot)
        row = {"recipe": r["name"], "seed": r["seed"], "reference": reference}
        for pair in result["pairs"]:
            d, b = pair.get("delong"), pair.get("bootstrap")
            if d is not None:
                row[pair["split"]] = {"auc_reference": d["auc_a"], "auc": d["auc_b"], "diff": -d["diff"],
                                      "ci95": [-d["ci95_diff"][1], -d["ci95_diff"][0]], "p": d["p_value"], "n": d["n"]}
            elif b is not None:  # more than two classes: DeLong is binary; the paired bootstrap of the macro AUC
                row[pair["split"]] = {"auc_reference": None, "auc": None, "diff": -b["diff"],
                                      "ci95": [-b["ci"][1], -b["ci"][0]], "p": b["p_boot"], "n": pair["n_common"],
                                      "test": "bootstrap, macro one-vs-rest AUC"}
        rows.append(row)
    return rows


def _pm(cell: dict) -> str:
    return f"{cell['mean']:.3f}" + (f" ± {cell['std']:.3f}" if cell.get("std") is not None else "")


def render(results: dict, commands: dict[str, str]) -> str:
    rec = results["recipes"]
    lines = ["# Accuracy on AdrenalMNIST3D (official test split, 298 volumes)", "",
             "Generated by `python benchmarks/accuracy.py report` from the runs listed below. Test metrics are "
             "means ± std over seeds; every checkpoint, temperature and decision threshold was chosen on "
             f"validation folds only (threshold rule: `{results['rule']}` on the pooled, calibrated out-of-fold "
             "predictions). medvox rows: 5-fold CV on the official train+val pool, then the 5-model "
             "ensemble with flip TTA and temperature scaling on test.", "",
             "| recipe | seeds | test AUC | ACC | balanced ACC | F1 | time per run (device) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    order = sorted(rec, key=lambda n: -rec[n]["auc"]["mean"])
    for name in order:
        r = rec[name]
        desc = RECIPES[name]["desc"] if name in RECIPES else f"plain MONAI ResNet-18 ({BASELINES[name]}), argmax"
        lines.append(f"| **{name}**: {desc} | {r['n_seeds']} | {_pm(r['auc'])} | {_pm(r['accuracy'])} | "
                     f"{_pm(r['balanced_accuracy'])} | {_pm(r['f1'])} | {r['wall_seconds_mean'] / 60:.1f} min "
                     f"({r['device']}) |")
    for label, auc, acc in PUBLISHED:
        lines.append(f"| {label} | 1 | {auc:.3f} | {acc:.3f} | | | |")
    lines += ["", "## What each part adds (test AUC, mean over seeds)", "",
              "| recipe | CV mean (val folds) | single fold model | 5-fold ensemble | + flip TTA | + calibration "
              "| + descriptor model (weight) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in order:
        r = rec[name]
        if "ensemble_auc" not in r:
            continue
        cells = [r.get("cv_auc_mean"), r.get("single_fold_auc"), r.get("ensemble_auc"), r.get("ensemble_tta_auc"),
                 r.get("calibrated_auc", r["auc"]["mean"])]
        fused = "" if r.get("fused_auc") is None else f"{r['fused_auc']:.3f} ({', '.join(r['fusion_weights'])})"
        lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + f" | {fused} |")
    lines += ["", "## Decision threshold (test ACC / balanced ACC / F1 of the same ensemble)", "",
              "| recipe | argmax | Youden on OOF | F1-max on OOF | accuracy-max on OOF |", "| --- | --- | --- | --- | --- |"]
    for name in order:
        r = rec[name]
        if "argmax" not in r:
            continue
        cells = [r[k] for k in ("argmax", "at_youden", "at_f1", "at_accuracy")]
        lines.append(f"| {name} | " + " | ".join(
            f"{c['accuracy']:.3f} / {c['balanced_accuracy']:.3f} / {c['f1']:.3f}" for c in cells) + " |")
    if results.get("paired"):
        ref = results["paired"][0]["reference"]
        lines += ["", f"## Paired against {ref} (`medvox compare`: DeLong's test, same seed = same CV split and cases)",
                  "", "Choices rest on the out-of-fold columns; the test columns are for information only.", "",
                  f"| recipe | seed | OOF AUC ({ref} -> recipe) | difference [95 % CI] | p | test AUC ({ref} -> recipe) "
                  "| difference [95 % CI] | p |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in results["paired"]:
            cells = []
            for split in ("oof", "test"):
                c = row.get(split)
                cells += (["", "", ""] if c is None else
                          ["" if c["auc"] is None else f"{c['auc_reference']:.3f} -> {c['auc']:.3f}",
                           f"{c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]",
                           "< 0.001" if c["p"] < 0.001 else f"{c['p']:.3f}"])
            lines.append(f"| {row['recipe']} | {row['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "## Commands", ""]
    lines += [f"- `{name}`: `{cmd}`" for name, cmd in commands.items()]
    return "\n".join(lines) + "\n"


def _commands(names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        cmd, _ = job_command(name, 0, Path("acc"), False, None)
        cmd[0] = "python"
        text = " ".join(c if " " not in c and "{" not in c else f"'{c}'" for c in cmd)
        out[name] = text.replace(str(DATA), "../shared/data/medmnist").replace(str(REPO) + "/", "")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run jobs")
    r.add_argument("--jobs", nargs="+", required=True,
                   help=f"NAME (every --seeds) or NAME@SEED, run in this order; names: {', '.join([*RECIPES, *BASELINES])}")
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--parallel", type=int, default=1)
    r.add_argument("--threads", type=int)
    r.add_argument("--gpu", action="store_true", help="pass --gpu to medvox (the MONAI script uses CUDA when present)")
    r.add_argument("--minutes", type=float, help="start no job after this many minutes")
    r.add_argument("--hard-minutes", type=float, help="kill the jobs still running after this many minutes")
    r.add_argument("--drop-checkpoints", action="store_true", help="delete each finished run's checkpoints")
    r.add_argument("--fold-parallel", action="store_true",
                   help="each medvox job's folds as processes of their own (`medvox train --fold K`), then its "
                        "`medvox cv` summarises; --parallel counts processes (for a GPU that one small model leaves idle)")
    r.add_argument("--smoke", action="store_true", help="1 epoch (medvox: 2 folds): checks the harness only")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further `medvox cv` flags for every medvox job (last on the command line, e.g. --epochs 20)")
    r.add_argument("--out", type=Path, required=True)
    fu = sub.add_parser("fuse", help="fuse finished runs' kept predictions with the descriptor model (as r18f)")
    fu.add_argument("kept", type=Path, nargs="+", help="kept run folders (<out>/kept/<name>_s<seed>)")
    fu.add_argument("--out", type=Path, required=True)
    fu.add_argument("--name", default="r18f")
    fu.add_argument("--rule", default="youden", choices=["youden", "f1", "accuracy"])
    fu.add_argument("--features-data", type=Path,
                    help="compute the descriptors on this file's version of the cases (e.g. the 64^3 release)")
    fl = sub.add_parser("folds", help="fold-level figures of run folders (kept runs, or fold folders alone)")
    fl.add_argument("runs", type=Path, nargs="+")
    rep = sub.add_parser("report", help="write the tables",
                         description="With --out: read the runs' folders and write --results and --md. Without: "
                                     "write --md again from --results alone (no run folder needed).")
    rep.add_argument("--out", type=Path, nargs="+", help="one or more `run --out` folders")
    rep.add_argument("--merge", action="store_true",
                     help="with --out: keep the runs already in --results that the folders do not hold")
    rep.add_argument("--rule", default="youden", choices=["youden", "f1", "accuracy"])
    rep.add_argument("--md", type=Path, default=REPO / "benchmarks" / "accuracy.md")
    rep.add_argument("--results", type=Path, help="the per-run summary JSON (default: --md's name with .json)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        jobs = []
        for token in args.jobs:
            name, _, seed = token.partition("@")
            if name not in RECIPES and name not in BASELINES:
                p.error(f"unknown job {name!r}")
            jobs += [(name, int(seed))] if seed else [(name, s) for s in args.seeds]
        problem = preflight(jobs)
        if problem:
            p.error(problem)
        now = time.time()
        deadline = now + 60 * args.minutes if args.minutes else None
        hard = now + 60 * args.hard_minutes if args.hard_minutes else None
        run_jobs(jobs, args.out, args.parallel, args.gpu, args.threads, deadline, args.drop_checkpoints, args.smoke,
                 hard, args.extra, args.fold_parallel)
        return 0
    if args.cmd == "fuse":
        for kept in args.kept:
            fuse_kept(kept, args.out, args.rule, args.name, args.features_data)
        return 0
    if args.cmd == "folds":
        print(render_fold_level([fold_level(run) for run in args.runs]))
        return 0
    results_path = args.results or args.md.with_suffix(".json")
    if args.out:
        previous = json.loads(results_path.read_text(encoding="utf-8")) if args.merge else None
        results = collect(args.out, args.rule, previous)
        results_path.write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")
    elif args.merge:
        p.error("--merge adds the runs of --out folders: give --out")
    else:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    args.md.write_text(report_text(results, args.md), encoding="utf-8")
    print(args.md.read_text())
    return 0


def report_text(results: dict, md: Path) -> str:
    """The Markdown report of ``results`` (:func:`collect`), with the hand-written ``accuracy_notes.md``
    appended when ``md`` is the repository's ``accuracy.md``."""
    notes = REPO / "benchmarks" / "accuracy_notes.md"  # hand-written findings, appended to the generated tables
    text = render(results, _commands(list(results["recipes"])))
    if notes.is_file() and md.resolve() == (REPO / "benchmarks" / "accuracy.md").resolve():
        text += "\n" + notes.read_text(encoding="utf-8")
    return text


if __name__ == "__main__":
    sys.exit(main())
