"""Turn the measured results into ``RESULTS.md``: machine, targets, one table per section.

Every ratio in the report is computed here from the medians in the results (never typed in), and
the same numbers are written to ``results.json`` next to it, so each figure can be checked.
"""

from __future__ import annotations

from benchmarks.common import ratio

# (key, what, comparison, threshold, where): "bf16" targets apply only where bf16 is native (a CPU with
# AVX-512-BF16/AMX kernels, or a GPU); elsewhere medvox trains in fp32 and they read n/a
TARGETS = [
    ("aug_vs_monai", "Augmentation: medvox / MONAI RandAffined (samples/s)", ">=", 2.0, "all"),
    ("aug_vs_torchio", "Augmentation: medvox / TorchIO RandomAffine, its faster set-up", ">=", 1.2, "all"),
    ("startup_s", "Warm start-up: `medvox train` process start -> first optimizer step (s)", "<", 5.0, "all"),
    # paired: the median of per-round ratios, each of two epochs run one after the other (where --amp is fp32,
    # the two run the same computation and the ratio of the medians is the load's noise alone)
    ("amp_time", "Precision: `--amp` epoch time / fp32 epoch time, per-round median (never slower than fp32)", "<=",
     1.1, "all"),
    ("train_fp32_vs_a", "Training, fp32: medvox / (a) MONAI tutorial pipeline (samples/s)", ">=", 1.3, "all"),
    ("train_bf16_vs_a", "Training, bf16: medvox / (a) MONAI tutorial pipeline (fp32, as written) (samples/s)", ">=",
     2.0, "bf16"),
    ("train_bf16_vs_b", "Training, bf16: medvox / (b) MONAI tuned pipeline in bf16 (samples/s)", ">=", 1.15, "bf16"),
    ("data_wait", "Training: medvox's share of step time waiting for data", "<", 0.05, "all"),
]


def _f(v, digits: int = 2, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _spread(s: dict | None, digits: int = 2) -> str:
    if not s or s.get("median") is None:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def target_values(results: dict) -> dict:
    """The figure behind each target, from the sections' results (None where a section did not run)."""
    aug = results.get("augmentation", {}).get("ratios", {})
    train = results.get("training", {})
    tr = train.get("ratios", {})
    best = tr.get("medvox")
    wait = train.get("configs", {}).get(best, {}).get("data_wait_frac", {}).get("median") if best else None
    return {"aug_vs_monai": aug.get("vs_monai"), "aug_vs_torchio": aug.get("vs_torchio_best"),
            "startup_s": results.get("startup", {}).get("warm", {}).get("first_step", {}).get("median"),
            "amp_time": tr.get("paired_fp32_vs_amp", tr.get("fp32_vs_amp")), "train_fp32_vs_a": tr.get("fp32_vs_peer_a"),
            "train_bf16_vs_a": tr.get("bf16_vs_peer_a"), "train_bf16_vs_b": tr.get("bf16_vs_peer_b"),
            "data_wait": wait}


def bf16_native(results: dict) -> bool:
    """Whether the measured machine runs bf16 natively: the training device's, a GPU counting as native."""
    spec = results.get("training", {}).get("spec", {})
    return spec.get("device") == "cuda" or bool(results.get("machine", {}).get("bf16_native"))


def target_rows(results: dict) -> list[dict]:
    values = target_values(results)
    rows = []
    native = bf16_native(results)
    for key, what, op, threshold, where in TARGETS:
        applies = where == "all" or native
        v = values[key] if applies else None
        met = (None if v is None else v >= threshold if op == ">=" else v <= threshold if op == "<=" else
               v < threshold)
        goal = f"{op} {100 * threshold:g} %" if key == "data_wait" else f"{op} {threshold:g}"
        if not applies:
            goal += " (where bf16 is native; not on this machine)"
        rows.append({"key": key, "what": what, "value": v, "target": goal, "met": met})
    return rows


def _machine(m: dict, extra: dict) -> list[str]:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["cpu_flags"].items())
    return ["## Machine", "", f"**CPU kind: {m.get('kind', 'unknown')}.**", "", "| | |", "| --- | --- |",
            f"| CPU | {m['cpu']}, {m['cores']} cores ({flags}) |",
            f"| kernels | ATen capability {m.get('cpu_capability')}, oneDNN bf16 {m.get('mkldnn_bf16')}, "
            f"medvox's bf16 basis: {m.get('bf16_basis')}; ONEDNN_MAX_CPU_ISA={m.get('onednn_max_cpu_isa') or 'unset'} |",
            f"| memory | {m['memory_gb']} GiB |",
            f"| GPU | {m['gpu'] or 'none'} |",
            f"| software | Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), MONAI {m['monai']}, "
            f"TorchIO {m['torchio']}, Lightning {m['lightning']} |",
            f"| load average (1, 5, 15 min) | start {m['load_average']}, end {extra.get('load_end')} |", ""]


def _targets(results: dict) -> list[str]:
    lines = ["## Targets", "", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    for r in target_rows(results):
        value = r["value"]
        # three decimals: a figure just under its goal must not print as if it met it
        shown = (_pct(value) if r["key"] == "data_wait" else _f(value, 2, " s") if r["key"] == "startup_s"
                 else _f(value, 3, "x"))
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['what']} | {shown} | {r['target']} | {met} |")
    return lines + [""]


def _augmentation(a: dict) -> list[str]:
    ours = a["methods"].get("medvox", {}).get("samples_per_s", {}).get("median")
    lines = [f"## Augmentation ({a['size']}^3, {a['n']} volumes, medvox batch {a['batch']}, "
             f"{a['workers']} DataLoader workers, {a['rounds']} interleaved rounds)", "",
             "| method | samples/s, median (min-max) | CPU s/sample (all processes) | medvox / method |",
             "| --- | --- | --- | --- |"]
    for m in a["methods"].values():
        rate = m["samples_per_s"]["median"]
        lines.append(f"| {m['label']} | {_spread(m['samples_per_s'], 1)} | {_f(m['cpu_seconds_per_sample']['median'], 3)}"
                     f" | {_x(ratio(ours, rate))} |")
    return lines + ["", f"1-min load average after each round: {a['load_1min']}", ""]


def _startup(s: dict) -> list[str]:
    lines = ["## Preprocessing and start-up", ""]
    cold = s.get("cold", {})
    if cold:
        lines += ["| cold preprocessing (fresh cache) | volumes | seconds, median (min-max) | s/volume |",
                  "| --- | --- | --- | --- |"]
        labels = {"medvox_npz": "medvox `prepare`, MedMNIST npz subset",
                  "medvox_nifti": "medvox `prepare`, generated NIfTI CT (check, fingerprint, plan, resample, cache, split)",
                  "monai_nifti": "MONAI CacheDataset, same NIfTI (load, orient, resample, window, pad; no check/plan/split)"}
        for key, label in labels.items():
            if key in cold:
                c = cold[key]
                lines.append(f"| {label} | {c['volumes']} | {_spread(c['seconds'])} | {_f(c['s_per_volume']['median'], 3)} |")
        lines.append("")
    warm = s.get("warm")
    if warm:
        first = warm["first_run"]
        lines += [f"Warm start-up of `medvox train` ({warm['model']}, batch {warm['batch']}, "
                  f"{'--amp' if warm['amp'] else 'fp32'}), seconds after the process was spawned:", "",
                  "| milestone | first process | warm, median (min-max) |", "| --- | --- | --- |"]
        for key, label in (("interpreter", "Python running"), ("imported", "medvox CLI imported"),
                           ("first_forward", "first forward (after prepare + model + Fabric)"),
                           ("first_step", "first optimizer step")):
            lines.append(f"| {label} | {_f(first[key], 1)} | {_spread(warm[key], 1)} |")
        lines.append("")
    return lines


def _training(t: dict) -> list[str]:
    spec, flops = t["spec"], t.get("step_flops")
    lines = [f"## Training ({spec['model']}, {spec['size']}^3, batch {spec['batch']}, {spec['n']} volumes = "
             f"{spec['n'] // spec['batch']} steps/epoch, {t['rounds']} interleaved epochs each, device {spec['device']})", "",
             "| pipeline | epoch s | samples/s, median (min-max) | data wait | augmentation | CPU s/sample | "
             "peak memory (tree PSS / main RSS) | GFLOP/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in t["configs"].values():
        rate = c["samples_per_s"]["median"]
        gflops = flops * rate / spec["batch"] / 1e9 if flops and rate else None
        mem = c["memory"]
        mem_s = (f"{_f(mem.get('peak_tree_pss_gb'))} / {_f(mem.get('peak_main_rss_gb') or mem.get('self_max_rss_gb'))} GiB"
                 if mem else "n/a")
        aug = c["aug_frac"]["median"] if c.get("aug_frac") else None
        lines.append(f"| {c['label']} | {_f(c['epoch_seconds']['median'], 1)} | {_spread(c['samples_per_s'])} | "
                     f"{_pct(c['data_wait_frac']['median'])} | {'in workers' if aug is None else _pct(aug)} | "
                     f"{_f(c['cpu_seconds_per_sample']['median'], 2)} | {mem_s} | {_f(gflops, 0)} |")
    r = t["ratios"]
    pairs = [k for k in r if k != "medvox" and not k.startswith("paired_")]
    lines += ["", "Like-for-like ratios (medvox / peer in the same precision; `fp32_vs_amp`: `--amp`'s epoch time over "
              "fp32's), of the medians: " + ", ".join(f"{_x(r[k])} {k}" for k in pairs) + "; median of the "
              "per-round ratios (each pair of epochs ran minutes apart, under similar load): "
              + ", ".join(f"{_x(r[f'paired_{k}'])} {k}" for k in pairs if f"paired_{k}" in r) + ".",
              f"Precision on this CPU: {t.get('precision_note') or 'n/a'}.", ""]
    amp = t["configs"].get("medvox_amp", {}).get("setup")
    if amp:
        lines += [f"`--amp` chose `{amp.get('precision')}` here.", ""]
    setup = t["configs"][r["medvox"]]["setup"] if r.get("medvox") else None
    if setup:
        lines += [f"`{r['medvox']}` ran with precision `{setup.get('precision')}`, channels_last "
                  f"{setup.get('channels_last')}, fused Adam {setup.get('fused_adam')}, {setup.get('threads')} threads.", ""]
    bad = {n: c["nonfinite_losses"] for n, c in t["configs"].items() if c.get("nonfinite_losses")}
    if bad:
        lines += [f"Non-finite training losses (speed still counted): {bad}.", ""]
    return lines


def _memory(m: dict) -> list[str]:
    lines = [f"## Peak memory: {m['model']} at {m['size']}^3, one forward + backward on the CPU", "",
             "| precision | activation checkpointing | batch | peak RSS | of which activations | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in m["rows"]:
        lines.append(f"| {r['precision']} | {'on' if r['checkpointing'] else 'off'} | {r['batch']} | "
                     f"{_f(r['peak_gb'])} GiB | {_f(r['activation_gb'])} GiB | {_f(r['seconds'], 1)} |")
    tb = m["target_batch"]
    lines += ["", f"Extrapolated to the default batch {tb} (linear in the batch from batches 1 and 2):", "",
              f"| precision | activation checkpointing | per sample | peak, batch {tb} | + gradients and Adam state |",
              "| --- | --- | --- | --- | --- |"]
    for e in m["extrapolated"]:
        lines.append(f"| {e['precision']} | {'on' if e['checkpointing'] else 'off'} | {_f(e['per_sample_gb'])} GiB | "
                     f"{_f(e[f'peak_b{tb}_gb'])} GiB | {_f(e['adam_and_grads_gb'])} GiB |")
    return lines + [""]


def _gpu(g: dict) -> list[str]:
    flops = g.get("train_step_flops", {})
    lines = ["## GPU", ""]
    if g.get("status") != "measured":
        lines += [f"**No GPU figures from this machine** ({g.get('reason')}; an H100 run: `benchmarks/RESULTS_GPU.md`). "
                  "`benchmarks/run.py` measures them where CUDA is "
                  "available: medvox's step (bf16, channels_last_3d, fused Adam, on-device augmentation) for "
                  "ResNet-18 64^3 batch 4 and ResNet-50 128^3 batch 6, with and without checkpointing; achieved "
                  "TFLOP/s and MFU against the card's dense bf16 peak (table in `benchmarks/gpu.py`, e.g. H100 SXM "
                  "989 TFLOP/s); peak GPU memory; BatchAugment samples/s at 96^3. `--device cuda` also runs the "
                  "training comparison on the GPU.", ""]
    else:
        peak = g.get("peak")
        lines += [f"Device: {g['device']}; dense bf16 peak: {peak[1] if peak else 'unknown'} TFLOP/s.", "",
                  "| model | size | batch | checkpointing | step s | samples/s | TFLOP/s | MFU | peak allocated |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in g["runs"]:
            lines.append(f"| {r['model']} | {r['size']}^3 | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | "
                         f"{_f(r['step_seconds']['median'], 3)} | {_f(r['samples_per_s'], 1)} | {_f(r['tflops'], 1)} | "
                         f"{_pct(r['mfu'])} | {_f(r['peak_allocated_gb'])} GiB |")
        a = g.get("augment", {})
        lines += ["", f"BatchAugment on the GPU: {_f(a.get('samples_per_s'), 0)} samples/s at {a.get('size')}^3.", ""]
    lines += ["FLOPs per training step (forward + backward, FlopCounterMode): "
              + ", ".join(f"{k}: {v / 1e9:.0f} GFLOP" for k, v in flops.items()) + ".", ""]
    if g.get("roofline"):
        lines += ["**Roofline bound on MFU** (`benchmarks/gpu.py: op_costs, roofline`; every ATen op of one bf16 "
                  "forward + backward recorded on `meta` tensors with its FLOPs and the bytes it reads and writes; "
                  "each op takes max(FLOPs / peak, bytes / bandwidth), i.e. every convolution at the card's full "
                  "peak and every other op at full memory bandwidth). Eager: the ops as PyTorch runs them; fused: "
                  "every op without FLOPs (BatchNorm, ReLU, residual adds, pooling) free, the ceiling of any fusion.",
                  "", "| model | size | batch | card | fastest step (eager) | MFU bound, eager | MFU bound, fused | "
                  "where the eager time goes |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in g["roofline"]:
            where = ", ".join(f"{k} {1e3 * t:.2f} ms" for k, t in r["top_ops"][:4])
            lines.append(f"| {r['model']} | {r['size']}^3 | {r['batch']} | {r['card']} | {1e3 * r['seconds']:.2f} ms | "
                         f"{_pct(r['mfu_bound'])} | {_pct(r['mfu_bound_fused'])} | {where} |")
        lines.append("")
    return lines


def render(results: dict, notes: str = "") -> str:
    """The whole RESULTS.md."""
    meta = results["meta"]
    lines = ["# medvox benchmarks", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['mode']} mode, "
             f"{meta['duration_s'] / 60:.1f} min). Every figure is a median over interleaved runs on the same "
             "machine in one process tree; the load average shows how busy the machine was.", ""]
    lines += _machine(results["machine"], meta)
    lines += _targets(results)
    for key, fn, needs in (("augmentation", _augmentation, "methods"), ("startup", _startup, None),
                           ("training", _training, "configs"), ("memory", _memory, "rows"), ("gpu", _gpu, None)):
        if results.get(key) and (needs is None or needs in results[key]):
            lines += fn(results[key])
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)
