"""The ``medvox`` command line: each subcommand parses its flags and calls one API function.

The original pipeline's flags keep working verbatim, e.g.::

    medvox train --fold 0 --pretrained-path pretrained/medicalnet_resnet50_3d.pth --lr 2e-4 \
        --batch_size 6 --epochs 60 --optimizer adam --loss LDAM --multi_gpu --gpu --amp
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from medvox import config as config_mod

# flag dest -> dotted config key; every flag defaults to None so "unset" never overrides
_DATA_FLAGS = {
    "data": "data.path",
    "image_col": "data.image_cols",
    "label_col": "data.label_col",
    "group_col": "data.group_col",
    "fold_col": "data.fold_col",
    "id_col": "data.id_col",
    "cache_dir": "data.cache_dir",
    "folds": "data.folds",
    "split_seed": "data.split_seed",
    "skip_bad": "data.skip_bad",
    "target_shape": "data.target_shape",
    "target_spacing": "data.target_spacing",
    "normalization": "data.normalization",
    "ct_window": "data.ct_window",
    "workers": "data.workers",
    "classes": "data.classes",
    "max_volume_mb": "data.max_volume_mb",
}
_TRAIN_FLAGS = {
    "recipe": "train.recipe",
    "time_budget": "train.time_budget_min",
    "model": "model.name",
    "pretrained_path": "model.pretrained_path",
    "allow_partial": "model.allow_partial",
    "head_lr_mult": "model.head_lr_mult",
    "dropout": "model.dropout",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "optimizer": "optim.optimizer",
    "scheduler": "optim.scheduler",
    "loss": "loss.name",
    "label_smoothing": "loss.label_smoothing",
    "drw_start": "loss.drw_start",
    "fold": "train.fold",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "grad_clip": "train.grad_clip",
    "ema_decay": "train.ema_decay",
    "early_stopping": "train.early_stopping",
    "monitor": "train.monitor",
    "precision": "train.precision",
    "amp": "train.amp",
    "gpu": "train.gpu",
    "multi_gpu": "train.multi_gpu",
    "devices": "train.devices",
    "num_nodes": "train.num_nodes",
    "seed": "train.seed",
    "deterministic": "train.deterministic",
    "resume": "train.resume",
    "output": "train.output",
    "run_name": "train.run_name",
    "plots": "train.plots",
    "logger": "train.logger",
    "compile": "train.compile",
    "threads": "train.threads",
    "safetensors": "train.safetensors",
    "no_augment": "augment.enabled",
}


def _add_data_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("data", help="a CSV/TSV manifest, a MedMNIST .npz, or a folder with one sub-folder per class")
    else:
        p.add_argument("--data", help="a CSV/TSV manifest, a MedMNIST .npz, or a folder-per-class (default: demo data)")
    p.add_argument("--image-col", "--image_col", dest="image_col", action="append",
                   help="manifest image column; repeat for multi-channel input (default: image)")
    p.add_argument("--label-col", "--label_col", dest="label_col", help="manifest label column (default: label)")
    p.add_argument("--group-col", "--group_col", dest="group_col", help="patient/group column (default: patient_id)")
    p.add_argument("--fold-col", "--fold_col", dest="fold_col", help="column with a fixed fold (default: fold)")
    p.add_argument("--id-col", "--id_col", dest="id_col", help="case id column (default: id; else the row)")
    p.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", help="preprocessing cache (default ~/.cache/medvox)")
    p.add_argument("--folds", type=int, help="k of k-fold cross-validation (default 5)")
    p.add_argument("--split-seed", "--split_seed", dest="split_seed", type=int, help="seed of the fold split")
    p.add_argument("--skip-bad", "--skip_bad", dest="skip_bad", action="store_const", const=True,
                   help="skip bad cases (listed in skipped_cases.json) instead of stopping")
    p.add_argument("--target-shape", "--target_shape", dest="target_shape", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="the CNN's input grid (default: from the fingerprint); alone it resizes the whole field of "
                        "view, with --target-spacing it resamples to that spacing and crops/pads")
    p.add_argument("--target-spacing", "--target_spacing", dest="target_spacing", type=float, nargs=3,
                   metavar=("SZ", "SY", "SX"), help="voxel spacing in mm (default: from the fingerprint)")
    p.add_argument("--normalization", choices=config_mod.CHOICES["data.normalization"],
                   help="intensity normalisation: ct (clip to the CT window, dataset-wide z-score), zscore (per image), "
                        "minmax or none (default: from the fingerprint)")
    p.add_argument("--ct-window", "--ct_window", dest="ct_window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="CT intensity window in HU (default: from the fingerprint)")
    p.add_argument("--workers", type=int, help="preprocessing processes (default: auto)")
    p.add_argument("--classes", type=lambda text: [c.strip() for c in text.split(",")], metavar="A,B",
                   help="the expected labels, comma-separated, in class order; any other label is a row error "
                        "(default: the labels found)")
    p.add_argument("--max-volume-mb", "--max_volume_mb", dest="max_volume_mb", type=float, metavar="MB",
                   help="refuse an image whose reading needs more memory, from its header (default 2048)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON experiment config (flags override it)")
    _add_data_args(p)
    p.add_argument("--recipe", choices=config_mod.CHOICES["train.recipe"],
                   help="original (default): the original pipeline's settings (MedicalNet fine-tuning); auto: a "
                        "from-scratch recipe chosen from the dataset's plan (flags and config values still win)")
    p.add_argument("--time-budget", "--time_budget", dest="time_budget", type=float, metavar="MIN",
                   help="--recipe auto: minutes for the whole cross-validation on this machine; the recipe measures "
                        "the model's speed here (seconds) and picks the epochs (and, if need be, a coarser input) "
                        "to fit, printing the forecast; your --epochs / --target-shape win (default: 120 on a CPU, "
                        "none on a GPU; 0: none, the recipe's own length whatever the machine)")
    p.add_argument("--model", help="registered model name (default resnet50); see `medvox models`")
    p.add_argument("--pretrained-path", "--pretrained_path", dest="pretrained_path",
                   help="local MedicalNet / Swin UNETR checkpoint (.pth)")
    p.add_argument("--allow-partial", "--allow_partial", dest="allow_partial", action="store_const", const=True,
                   help="accept a checkpoint with missing or mismatched backbone tensors")
    p.add_argument("--head-lr-mult", "--head_lr_mult", dest="head_lr_mult", type=float,
                   help="learning-rate multiplier for new head layers (MedicalNet used 10-100)")
    p.add_argument("--dropout", type=float, help="dropout before the classifier (default 0.4)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    p.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float,
                   help="weight decay, not applied to norms and biases (default 1e-5)")
    p.add_argument("--optimizer", choices=config_mod.CHOICES["optim.optimizer"], help="optimizer (default adam)")
    p.add_argument("--scheduler", choices=config_mod.CHOICES["optim.scheduler"],
                   help="learning-rate schedule after the warmup, stepped per optimizer step (default cosine)")
    p.add_argument("--loss", choices=config_mod.CHOICES["loss.name"], help="classification loss (default LDAM)")
    p.add_argument("--label-smoothing", "--label_smoothing", dest="label_smoothing", type=float,
                   help="label smoothing of the CE losses, in [0, 1) (default 0)")
    p.add_argument("--drw-start", "--drw_start", dest="drw_start", type=float,
                   help="fraction of epochs after which LDAM's deferred re-weighting starts (default 0.8)")
    p.add_argument("--fold", type=int, help="validation fold (default 0)")
    p.add_argument("--epochs", type=int, help="epochs per fold (default 60)")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int,
                   help="samples per step and process (default 6)")
    p.add_argument("--gradient_accumulation_steps", "--gradient-accumulation-steps", "--grad-accum",
                   dest="gradient_accumulation_steps", type=int,
                   help="batches accumulated per optimizer step (default 2)")
    p.add_argument("--grad_clip", "--grad-clip", dest="grad_clip", type=float, help="global norm (default 0.5)")
    p.add_argument("--ema_decay", "--ema-decay", dest="ema_decay", type=float, help="0 disables EMA (default 0.999)")
    p.add_argument("--early_stopping", "--early-stopping", dest="early_stopping", type=int,
                   help="patience in epochs, 0 disables (default 7)")
    p.add_argument("--monitor", choices=config_mod.CHOICES["train.monitor"], help="validation metric for best checkpoints (default auc)")
    p.add_argument("--precision", choices=config_mod.CHOICES["train.precision"],
                   help="numeric precision (default auto: mixed precision with --amp, else fp32)")
    p.add_argument("--amp", action="store_const", const=True, help="mixed precision (bf16 where supported, else fp16)")
    p.add_argument("--gpu", action="store_const", const=True, help="train on a GPU")
    p.add_argument("--multi_gpu", "--multi-gpu", dest="multi_gpu", action="store_const", const=True,
                   help="DDP over all visible GPUs")
    p.add_argument("--devices", type=int, help="number of DDP processes per node (e.g. 2 on CPU with gloo); default 1 "
                                               "(under torchrun / srun: the processes it starts per node)")
    p.add_argument("--num-nodes", "--num_nodes", dest="num_nodes", type=int,
                   help="nodes of a multi-node DDP run, each running --devices processes (default 1; under "
                        "torchrun / srun: the nodes it spans); the cache and --output must be on a file system "
                        "every node shares")
    p.add_argument("--seed", type=int, help="seed of initialisation, shuffling and augmentation (default 42)")
    p.add_argument("--deterministic", action="store_const", const=True, help="bit-reproducible on CPU")
    p.add_argument("--resume", action="store_const", const=True, help="continue from last.pt")
    p.add_argument("--output", help="results root (default results/)")
    p.add_argument("--run-name", "--run_name", dest="run_name", help="sub-folder under --output (default: model)")
    p.add_argument("--logger", choices=config_mod.CHOICES["train.logger"],
                   help="experiment tracker for the config (as hyperparameters) and each epoch's metrics, besides "
                        "log.csv: tensorboard (default; tensorboard/ in each fold folder), csv (log.csv alone), "
                        "mlflow or wandb (extras medvox[mlflow] / medvox[wandb]; MLFLOW_TRACKING_URI, WANDB_PROJECT "
                        "...: docs/training.md)")
    p.add_argument("--plots", choices=config_mod.CHOICES["train.plots"],
                   help="per-epoch confusion/ROC images to keep (final: none; curves drawn once at the end)")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--safetensors", action="store_const", const=True,
                   help="also write the best weights as best.safetensors / best_ema.safetensors (no pickle)")
    p.add_argument("--no-augment", "--no_augment", dest="no_augment", action="store_const", const=False,
                   help="train without augmentation (augment.enabled = false)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set augment.prob=0.5")


def _add_run_arg(p: argparse.ArgumentParser, what: str, inputs: str | None = None) -> None:
    """The run a command reads, given the same way everywhere: as the first positional argument (``RUN``) or as
    ``--run RUN``; ``inputs``: the command also takes input files, after the run."""
    p.add_argument("--run", dest="run_flag", action="append", metavar="RUN",
                   help=f"{what}; or give it as the first positional argument")
    if inputs is None:
        p.add_argument("run", nargs="?", metavar="RUN", help=f"{what} (or --run RUN)")
    else:
        p.add_argument("inputs", nargs="+", metavar="INPUT",
                       help=f"RUN INPUT... or --run RUN INPUT...: the run first ({what}) unless --run gives it, "
                            f"then the inputs: {inputs}")


def _run_and_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The run folder of a command (positional ``RUN`` or ``--run RUN``) and its inputs, if it takes any.

    Raises:
        UsageError: no run, two runs, or a run and no inputs.
    """
    from medvox.errors import UsageError

    flags = args.run_flag or []
    takes_inputs = hasattr(args, "inputs")
    positional = list(args.inputs) if takes_inputs else [args.run] if args.run else []
    if len(flags) > 1:  # the run's decision and temperatures belong to one ensemble
        raise UsageError(f"--run was given {len(flags)} times; {args.command} takes one run folder, fold folder or "
                         "checkpoint (run the command once per run, or cross-validate them as one run)")
    if flags:
        run = flags[0]
        if not takes_inputs and positional:
            raise UsageError(f"the run was given twice (--run {run} and {positional[0]}): give it once, as RUN or "
                             "--run RUN")
    elif positional:
        run, positional = positional[0], positional[1:]
    else:
        raise UsageError(f"{args.command}: no run given: `medvox {args.command} RUN ...` or "
                         f"`medvox {args.command} --run RUN ...` (a run folder such as results/resnet18)")
    if takes_inputs and not positional:
        raise UsageError(f"{args.command}: no inputs after the run {run}: give the files or folders to "
                         f"{args.command}, e.g. `medvox {args.command} --run {run} scans/`")
    return run, positional if takes_inputs else []


def _overrides(args: argparse.Namespace, table: dict[str, str]) -> dict[str, Any]:
    out = {key: getattr(args, dest) for dest, key in table.items() if getattr(args, dest, None) is not None}
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise config_mod.ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


DEFAULT_CONFIG_FILES = ("medvox.yaml", "medvox.yml", "medvox.json")


def _default_config_file() -> str | None:
    """A ``medvox.yaml``/``.json`` in the working directory is read when no ``--config`` is given, so a
    project folder can hold its data path and settings and the original command line works as it is."""
    for name in DEFAULT_CONFIG_FILES:
        if Path(name).is_file():
            return name
    return None


def config_from_args(args: argparse.Namespace, table: dict[str, str] | None = None,
                     fixed: dict[str, Any] | None = None, recipe: bool = True) -> config_mod.ExperimentConfig:
    """The experiment config: defaults < config file (``--config`` or ``medvox.yaml``/``.json`` here) < flags <
    ``fixed`` (what the command itself sets); checked, then ``--recipe auto`` fills what nobody gave
    (:func:`medvox.recipe.apply_recipe`, told exactly which keys the file and the flags set) unless ``recipe`` is
    false."""
    table = table if table is not None else {**_DATA_FLAGS, **_TRAIN_FLAGS}
    config_file = getattr(args, "config", None) or _default_config_file()
    overrides = _overrides(args, table) | (fixed or {})
    if "data.path" not in overrides and os.environ.get("MEDVOX_DATA"):
        overrides["data.path"] = os.environ["MEDVOX_DATA"]
    cfg = config_mod.resolve(config_file, overrides)
    if config_file and not getattr(args, "config", None):
        print(f"medvox: using settings from {config_file}", file=sys.stderr)
    if recipe and "recipe" in table:
        from medvox.recipe import apply_recipe, explicit_keys
        from medvox.run import require_output_folder

        require_output_folder(cfg.train.output, "--output")  # before the recipe reads the data

        given = explicit_keys(config_mod.load_file(config_file) if config_file else None, overrides)
        cfg = apply_recipe(cfg, given)
    return cfg


def _cmd_check(args: argparse.Namespace) -> int:
    from medvox.data.check import check_data

    cfg = config_from_args(args, _DATA_FLAGS)
    report = check_data(cfg.data)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_make_demo(args: argparse.Namespace) -> int:
    from medvox.data.demo import make_demo_data

    manifest = make_demo_data(Path(args.out), n_cases=args.n_cases, seed=args.seed)
    print(f"demo data written: {manifest}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from medvox.data import prepare

    cfg = config_from_args(args, _DATA_FLAGS)
    prepared = prepare(cfg.data)
    print(prepared.summary())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from medvox.engine import train

    cfg = config_from_args(args)
    train(cfg)
    return 0


def _cmd_cv(args: argparse.Namespace) -> int:
    from medvox.cv.crossval import cross_validate

    if args.fold is not None:
        raise config_mod.ConfigError(f"--fold {args.fold}: `medvox cv` trains every fold in turn; give how many "
                                     "with --folds K, or train one fold with `medvox train --fold K`")
    # a fold named in the project's config file is for `medvox train`; cv sets each fold itself
    cfg = config_from_args(args, fixed={"train.fold": 0})
    cross_validate(cfg, tta=not args.no_tta)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from medvox.inference.predict import predict_cases
    from medvox.metrics.decision import Decision

    run, inputs = _run_and_inputs(args)
    result = predict_cases(run, inputs, args.out, tta=args.tta, calibrated=not args.uncalibrated,
                           batch_size=args.batch_size, argmax=args.argmax, gpu=args.gpu,
                           allow_missing=args.allow_missing)
    print(f"predicted {result['predicted']} case(s) -> {result['output']}")
    print(f"decision: {Decision.from_json(result['decision']).describe()}")
    if result["failed"]:
        print(f"{result['failed']} input(s) could not be read or were refused by the checks (status 'error' in the CSV):", file=sys.stderr)
        for f in result["failures"]:
            print(f"  {f['case_id']} ({f['source']}): {f['error']}", file=sys.stderr)
        return 4
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medvox.demo import run_demo

    run_demo(Path(args.out), data_dir=Path(args.data_dir), epochs=args.epochs, model=args.model)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from medvox.reporting.report import write_report

    run, _ = _run_and_inputs(args)
    path = write_report(Path(run), Path(args.out) if args.out else None, gallery=args.gallery)
    print(f"report written: {path}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from medvox.reporting.compare import write_comparison

    try:
        path = write_comparison([Path(r) for r in args.runs], Path(args.out), n_boot=args.n_boot, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        print(f"medvox: error: {exc}", file=sys.stderr)
        return 2
    print(f"comparison written: {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from medvox.inference.export import FORMATS, export_model, summary_lines

    run, _ = _run_and_inputs(args)
    info = export_model(Path(run), Path(args.out), formats=tuple(args.format or FORMATS), fold=args.fold,
                        calibrated=not args.uncalibrated, allow_missing=args.allow_missing)
    print("\n".join(summary_lines(info)))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from medvox.inference.explain import explain

    target = int(args.target_class) if args.target_class and args.target_class.isdigit() else args.target_class
    run, inputs = _run_and_inputs(args)
    results = explain(Path(run), inputs, Path(args.out), fold=args.fold, target_class=target, tta=args.tta,
                      layer=args.layer, allow_missing=args.allow_missing)
    for r in results:
        shows = (f"Grad-CAM of class {r['target_class']} at {r['cam_layer']}" if r.get("target_class") is not None
                 else "attention")
        print(f"{r.get('case_id')}: predicted {r.get('predicted')}, {shows}: {r.get('cam_png')}"
              + (f"  ({r['note']})" if r.get("note") else "") + (f"  (warning: {r['warning']})" if r.get("warning") else ""))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from medvox.models.catalog import describe_models

    rows = describe_models()
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {text}" for name, text in rows))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.defaults:
        given = sorted(f"--{dest.replace('_', '-')}" for dest in {**_DATA_FLAGS, **_TRAIN_FLAGS}
                       if getattr(args, dest, None) is not None)
        if given or args.config or args.set:
            from medvox.errors import UsageError

            raise UsageError(f"config --defaults prints the code defaults alone; drop {', '.join(given) or '--config/--set'}"
                             ", or print the resolved config with `medvox config --show ...`")
        cfg = config_mod.ExperimentConfig()
        title = "every setting at its code default"
    else:
        cfg = config_from_args(args, recipe=False)
        title = "the settings `medvox train` / `medvox cv` would start from with these flags"
    print(config_mod.to_yaml(cfg, title=f"medvox config: {title}"), end="")
    return 0


# what every command returns; argparse itself exits 2 on a malformed command line
EXIT_CODES = {0: "success", 1: "bad data, image or checkpoint (the message names the file and the fix)",
              2: "usage or configuration error", 3: "training refused or failed (e.g. a run trained with other settings)",
              4: "predict: some inputs could not be read or were refused by the checks (the others were predicted)",
              5: "a run folder that is missing, unfinished or inconsistent", 130: "interrupted"}
EXIT_CODES_TEXT = "exit codes:\n" + "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())


# each command's --help ends with these (tests/test_cli_help.py parses every line with build_parser())
EXAMPLES: dict[str, tuple[str, ...]] = {
    "check": ("medvox check data/manifest.csv",
              "medvox check data/manifest.csv --label-col diagnosis --group-col patient --classes benign,malignant"),
    "make-demo-data": ("medvox make-demo-data demo_data", "medvox make-demo-data demo_data --n-cases 40 --seed 1"),
    "prepare": ("medvox prepare data/manifest.csv", "medvox prepare data/manifest.csv --folds 5 --workers 2"),
    "train": ("medvox train --data data/manifest.csv --fold 0 --model resnet18",
              "medvox train --fold 0 --pretrained-path pretrained/medicalnet_resnet50_3d.pth --lr 2e-4 --batch_size 6 "
              "--epochs 60 --optimizer adam --loss LDAM --multi_gpu --gpu --amp",
              "medvox train --config configs/medmnist_quick.yaml --fold 1 --logger mlflow"),
    "cv": ("medvox cv --data data/manifest.csv --recipe auto",
           "medvox cv --config configs/medicalnet_finetune.yaml --data data/manifest.csv --gpu --amp",
           "medvox cv --data data/manifest.csv --model resnet10 --epochs 20 --folds 3 --run-name quick"),
    "predict": ("medvox predict --run results/resnet18 new_scans/ --out predictions.csv",
                "medvox predict results/resnet18 scan_001.nii.gz scan_002.nii.gz --tta"),
    "demo": ("medvox demo", "medvox demo --epochs 2 --out demo_results"),
    "report": ("medvox report results/resnet18", "medvox report --run results/resnet18 --out resnet18.html"),
    "compare": ("medvox compare results/resnet18 results/resnet50 --out comparison/",),
    "export": ("medvox export results/resnet18 --out exported/",
               "medvox export --run results/resnet18 --out exported/ --format onnx --fold 0"),
    "explain": ("medvox explain --run results/resnet18 scan_001.nii.gz --out cams/",
                "medvox explain results/resnet18 scan_001.nii.gz --out cams/ --class malignant"),
    "models": ("medvox models",),
    "config": ("medvox config --defaults > experiment.yaml",
               "medvox config --config configs/medmnist_quick.yaml --lr 1e-3 --logger csv"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medvox", description="Train, cross-validate and serve 3D classifiers of medical volumes.",
        epilog=EXIT_CODES_TEXT + "\n\nStart with `medvox demo`, or `medvox check DATA` on your own data; each command "
               "has its own --help.", formatter_class=argparse.RawDescriptionHelpFormatter)
    from medvox._version import __version__

    parser.add_argument("--version", action="version", version=f"medvox {__version__}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", "-q", dest="log_level", action="store_const", const=logging.WARNING,
                          help="print warnings and errors only")
    loudness.add_argument("--verbose", "-v", dest="log_level", action="store_const", const=logging.DEBUG,
                          help="print debugging messages too")
    parser.set_defaults(log_level=logging.INFO)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                              epilog="examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("check", "check a dataset: every problem, by row and file, before anything runs")
    _add_data_args(p, positional=True)
    p.set_defaults(func=_cmd_check)

    p = command("make-demo-data", "write the synthetic CT demo dataset (.nii.gz + manifest)")
    p.add_argument("out", help="output folder")
    p.add_argument("--n-cases", "--n_cases", dest="n_cases", type=int, default=200,
                   help="number of cases (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated volumes (default 0)")
    p.set_defaults(func=_cmd_make_demo)

    p = command("prepare", "check, fingerprint, preprocess into the cache and split a dataset")
    _add_data_args(p, positional=True)
    p.set_defaults(func=_cmd_prepare)

    p = command("train", "train one fold")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    p = command("cv", "k-fold cross-validation (the main job): all folds, summary, test ensemble")
    _add_train_args(p)
    p.add_argument("--no-tta", "--no_tta", dest="no_tta", action="store_true",
                   help="no test-time augmentation for the test-set ensemble")
    p.set_defaults(func=_cmd_cv)

    p = command("predict", "predict new inputs with a trained run (fold ensemble)")
    _add_run_arg(p, "run folder (results/<model>), fold folder, or one checkpoint .pt (decided by the argmax)",
                 inputs="NIfTI/DICOM/.npy files, folders of them, or a manifest")
    p.add_argument("--out", default="predictions.csv", help="output CSV (default predictions.csv)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (flips, small affines)")
    p.add_argument("--uncalibrated", action="store_true", help="ignore the fitted temperatures")
    p.add_argument("--argmax", action="store_true",
                   help="predict the most probable class instead of the run's own decision threshold")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8,
                   help="volumes per forward pass (default 8)")
    p.add_argument("--gpu", action="store_true", help="predict on the first visible GPU (the CPU when there is none)")
    p.add_argument("--allow-missing", "--allow_missing", dest="allow_missing", action="store_true",
                   help="when a fold's final checkpoint is missing, predict with the fold models that are there, by the "
                        "most probable class (the run's decision belongs to the full ensemble); default: refuse")
    p.set_defaults(func=_cmd_predict)

    p = command("demo", "the main job on the embedded demo data: make it, cross-validate, report")
    p.add_argument("--out", default="demo_results", help="results root (default demo_results/)")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default="demo_data",
                   help="where the demo data is written (default demo_data/)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per fold (default: the demo's short schedule)")
    p.add_argument("--model", default="resnet10", help="model (default resnet10)")
    p.set_defaults(func=_cmd_demo)

    p = command("report", "one self-contained HTML report of a cross-validation run")
    _add_run_arg(p, "run folder (results/<model>)")
    p.add_argument("--out", help="HTML file (default RUN/report.html)")
    p.add_argument("--no-gallery", dest="gallery", action="store_false",
                   help="leave out the gallery of the most confident out-of-fold errors and their Grad-CAM maps (it "
                        "loads the fold models: one forward and backward pass per error shown)")
    p.set_defaults(func=_cmd_report)

    p = command("compare", "compare runs side by side: table, ROC overlay, DeLong test on OOF AUCs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more run folders")
    p.add_argument("--out", required=True, help="output folder or .html file")
    p.add_argument("--n-boot", "--n_boot", dest="n_boot", type=int, default=2000,
                   help="bootstrap resamples of the confidence intervals (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.set_defaults(func=_cmd_compare)

    p = command("export", "export a run (fold ensemble) or checkpoint to TorchScript / ONNX / safetensors")
    _add_run_arg(p, "run folder, fold folder or checkpoint .pt")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", action="append", choices=["torchscript", "onnx"], help="repeatable; default both")
    p.add_argument("--fold", type=int, help="export one fold instead of the ensemble")
    p.add_argument("--uncalibrated", action="store_true", help="ignore the fitted temperatures")
    p.add_argument("--allow-missing", "--allow_missing", dest="allow_missing", action="store_true",
                   help="when a fold's final checkpoint is missing, export with the fold models that are there, by the "
                        "most probable class (the run's decision belongs to the full ensemble); default: refuse")
    p.set_defaults(func=_cmd_export)

    p = command("explain", "3D Grad-CAM (CNN/Swin) or attention maps (MIL) as NIfTI overlay + PNG")
    _add_run_arg(p, "run folder, fold folder or checkpoint .pt", inputs="NIfTI/DICOM/.npy files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fold", type=int, help="one fold instead of the fold average")
    p.add_argument("--class", dest="target_class",
                   help="class name or index to explain (default: the predicted class, at the run's decision threshold)")
    p.add_argument("--tta", action="store_true",
                   help="decide the predicted class on test-time augmented probabilities, as predict --tta does "
                        "(the map is computed on the volume as it is)")
    p.add_argument("--layer", help="module Grad-CAM reads (default: the last one whose map is at least 4 voxels "
                                   "along every axis, e.g. layer4, else layer3 / layer2 of a ResNet)")
    p.add_argument("--allow-missing", "--allow_missing", dest="allow_missing", action="store_true",
                   help="when a fold's final checkpoint is missing, explain with the fold models that are there, by "
                        "the most probable class (the run's decision belongs to the full ensemble); default: refuse")
    p.set_defaults(func=_cmd_explain)

    p = command("models", "list the registered models, each with a one-line description")
    p.set_defaults(func=_cmd_models)

    p = command("config", "print an experiment config as YAML: the defaults, or what a command would resolve")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--defaults", action="store_true",
                       help="every setting at its code default (no config file, no flags); save it, edit it, pass "
                            "it back with --config")
    shown.add_argument("--show", action="store_true",
                       help="(the default) the config `medvox train` / `cv` would start from with these flags: "
                            "defaults < --config (or ./medvox.yaml) < flags; --recipe auto fills its settings "
                            "later, from the data")
    _add_train_args(p)
    p.set_defaults(func=_cmd_config)
    return parser


@contextlib.contextmanager
def _console_logging(level: int):
    """The command's messages: the ``medvox`` logger's records at ``level`` and above, printed on stdout.

    The library logs and never prints; the command line is the application, so it sets the handler and the
    level, and takes both back when the command ends (``main`` can run several times in one process).
    """
    logger = logging.getLogger("medvox")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _console_logging(args.log_level):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except config_mod.ConfigError as exc:
        print(f"medvox: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medvox: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a clear one-line error for the errors we raise on purpose
        from medvox.errors import MedvoxError

        if isinstance(exc, MedvoxError):
            print(f"medvox: error: {exc}", file=sys.stderr)
            return exc.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
