"""Training throughput: the MONAI-tutorial pipeline (a), its best-tuned form (b) and medvox's engine.

Same model (medvox's ``create_model("resnet18")``, so only the pipeline differs), same volumes, same
batch, same augmentation ranges, same optimizer (Adam) and loss (CE). Each contender runs in its own
process; after one untimed warm-up step each, they take turns epoch by epoch (A, B, C, A, B, C, ...)
and the medians are reported. Per epoch: wall time, samples/s, the share of the epoch spent waiting
for the next batch, the share spent in augmentation (medvox: in-process; the peers augment in
their workers, in parallel), and CPU-seconds of the whole process tree per sample.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from benchmarks.common import TreeMemory, load_average, log, summary
from benchmarks.remote import Local, Remote

# name -> (label for the report, spec overrides). Each precision is compared with the peers in the same one:
# fp32 on every CPU, bf16 where the CPU runs it natively (or on a GPU); `medvox_amp` is what `--amp` chooses here.
CONFIGS: dict[str, tuple[str, dict]] = {
    "peer_a": ("(a) MONAI tutorial: CacheDataset + RandAffined + flips, 2 workers, fp32",
               {"side": "peer", "precision": "fp32", "channels_last": False, "persistent": False}),
    "peer_b_fp32": ("(b) MONAI tuned, fp32: (a) + channels_last_3d + persistent workers",
                    {"side": "peer", "precision": "fp32", "channels_last": True, "persistent": True}),
    "peer_b": ("(b) MONAI tuned, bf16: (a) + bf16 autocast (with medvox's bf16 Conv3d NaN guard) + channels_last_3d "
               "+ persistent workers",
               {"side": "peer", "precision": "bf16", "channels_last": True, "persistent": True}),
    "medvox_fp32": ("(c) medvox engine, fp32", {"side": "medvox", "precision": "fp32"}),
    "medvox_bf16": ("(c) medvox engine, bf16 (`--precision bf16`)", {"side": "medvox", "precision": "bf16"}),
    "medvox_amp": ("(c) medvox engine, `--amp` (the precision medvox chooses on this machine)",
                   {"side": "medvox", "precision": "auto", "amp": True}),
    "medvox_defaults": ("(c') medvox engine defaults: --amp, LDAM, accum 2, clip 0.5, EMA 0.999",
                        {"side": "medvox", "precision": "auto", "amp": True, "engine_defaults": True}),
    "medvox_compile": ("(c'') medvox engine, --amp + --compile",
                       {"side": "medvox", "precision": "auto", "amp": True, "compile": True}),
}
PEERS = ("peer_a", "peer_b_fp32", "peer_b")
MEDVOX = ("medvox_fp32", "medvox_bf16", "medvox_amp", "medvox_defaults", "medvox_compile")
# (ratio key, ours, theirs): like-for-like pairs, each ratio of samples/s (ours / theirs)
PAIRS = (("fp32_vs_peer_a", "medvox_fp32", "peer_a"), ("fp32_vs_peer_b_fp32", "medvox_fp32", "peer_b_fp32"),
         ("bf16_vs_peer_a", "medvox_bf16", "peer_a"), ("bf16_vs_peer_b", "medvox_bf16", "peer_b"),
         ("fp32_vs_amp", "medvox_fp32", "medvox_amp"))


def train_configs(full: bool, bf16_native: bool) -> list[str]:
    """The contenders for this machine: fp32 everywhere; the bf16 ones only where bf16 is native (emulated bf16
    is ~20x slower than fp32: its epochs would take most of the run and measure nothing a user would choose)."""
    names = ["peer_a", "peer_b_fp32", "medvox_fp32", "medvox_amp"]
    if bf16_native:
        names[2:2] = ["peer_b"]
        names.insert(names.index("medvox_amp"), "medvox_bf16")
    return names + (["medvox_defaults"] if full else [])


def make_case(spec: dict):
    if spec["side"] == "peer":
        from benchmarks.peer_monai import PeerTrainer

        return PeerTrainer(spec)
    from benchmarks.medvox_side import MedvoxTrainer

    return MedvoxTrainer(spec)


def specs(names: list[str], base: dict) -> list[dict]:
    """Full specs: the shared settings (data, model, batch, ...) plus each config's own."""
    return [{**base, **CONFIGS[name][1], "name": name} for name in names]


def _epoch_figures(epochs: list[dict]) -> dict:
    """Per-epoch rates and shares, then their medians."""
    rate = [e["samples"] / e["seconds"] for e in epochs]
    wait = [e["data_wait"] / e["seconds"] for e in epochs]
    aug = [e["aug_seconds"] / e["seconds"] for e in epochs if e.get("aug_seconds") is not None]
    cpu = [e["cpu_seconds"] / e["samples"] for e in epochs]
    return {"epoch_seconds": summary([e["seconds"] for e in epochs]), "samples_per_s": summary(rate),
            "data_wait_frac": summary(wait), "aug_frac": summary(aug) if aug else None,
            "cpu_seconds_per_sample": summary(cpu), "steps": epochs[0]["steps"] if epochs else None,
            "samples": epochs[0]["samples"] if epochs else None,
            "nonfinite_losses": sum(e.get("nonfinite_losses", 0) for e in epochs)}


def _call(handle, cmd: str, monitors: dict) -> dict:
    """One command; only the process being driven has its memory sampled (the idle ones cannot grow,
    and reading /proc/<pid>/smaps_rollup takes the target's memory-map lock)."""
    for name, m in monitors.items():
        m.active = name == handle.name
    try:
        return handle.call(cmd)
    finally:
        for m in monitors.values():
            m.active = False


def run_training(names: list[str], base: dict, rounds: int, log_dir: Path, local: bool = False) -> dict:
    """Start every contender, warm each up, then ``rounds`` interleaved epochs; returns the figures."""
    handles, monitors = {}, {}
    try:
        for spec in specs(names, base):
            name = spec["name"]
            handles[name] = Local(make_case(spec)) if local else Remote("benchmarks.train_bench", spec, log_dir)
            if not local:
                monitors[name] = TreeMemory(handles[name].pid).start()
        setups = {}
        for name, h in handles.items():  # one at a time: warm-ups do not compete with each other
            log(f"training: setting up {name} (data, model, one warm-up step)")
            setups[name] = _call(h, "setup", monitors)
        epochs: dict[str, list[dict]] = {name: [] for name in handles}
        for r in range(rounds):
            for name, h in handles.items():
                log(f"training: round {r + 1}/{rounds}, {name}: one epoch")
                result = _call(h, "epoch", monitors)
                result["load_1min"] = load_average()[0] if load_average() else None
                epochs[name].append(result)
                log(f"training:   {name}: {result['seconds']:.1f} s, {result['samples'] / result['seconds']:.2f} "
                    f"samples/s, data wait {100 * result['data_wait'] / result['seconds']:.1f} %")
        finals = {name: h.call("finish") for name, h in handles.items()}
    finally:
        for h in handles.values():
            h.close()
    out = {}
    for name in handles:
        memory = monitors[name].stop() if name in monitors else {}
        out[name] = {"label": CONFIGS[name][0], "setup": setups[name], "epochs": epochs[name],
                     **_epoch_figures(epochs[name]), "memory": {**memory, **finals[name]}}
    return out


def best(results: dict, names: tuple[str, ...]) -> str | None:
    """The fastest (median samples/s) of ``names`` among the results."""
    present = [n for n in names if n in results and results[n]["samples_per_s"]["median"]]
    return max(present, key=lambda n: results[n]["samples_per_s"]["median"]) if present else None


def ratios(results: dict) -> dict:
    """medvox against each peer in the same precision (:data:`PAIRS`): the ratio of the median rates, and
    (``paired_*``) the median of the per-round ratios, whose two epochs ran minutes apart and so shared most of the
    machine's load at the time. ``fp32_vs_amp`` is fp32's rate over ``--amp``'s, i.e. ``--amp``'s epoch time over
    fp32's. ``medvox``: the fastest medvox configuration that trains like the peers (not the engine defaults)."""
    out = {"medvox": best(results, ("medvox_fp32", "medvox_bf16", "medvox_amp", "medvox_compile"))}
    for key, ours, theirs in PAIRS:
        if ours not in results or theirs not in results:
            continue
        mine, peer = (results[n]["samples_per_s"] for n in (ours, theirs))
        if not mine.get("median") or not peer.get("median"):
            continue
        out[key] = mine["median"] / peer["median"]
        paired = [x / y for x, y in zip(mine.get("values", []), peer.get("values", []), strict=False) if y]
        if paired:
            out[f"paired_{key}"] = statistics.median(paired)
    return out


def precision_note(results: dict) -> str | None:
    """Which precision medvox ran faster here, with the factor."""
    f32, b16 = (results.get(n, {}).get("samples_per_s", {}).get("median") for n in ("medvox_fp32", "medvox_bf16"))
    if not f32 or not b16:
        return None
    faster = "bf16" if b16 > f32 else "fp32"
    return f"{faster} is faster here ({max(b16, f32) / min(b16, f32):.2f}x)"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        from benchmarks.remote import serve

        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        serve(make_case, sys.argv[2])
    else:
        sys.exit("usage: python -m benchmarks.train_bench serve SPEC_JSON (run benchmarks/run.py instead)")

