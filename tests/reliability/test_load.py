"""Load: ``medvox predict`` over 1,000 small volumes and a few unreadable files in one call keeps its memory
flat, predicts every readable volume and names each unreadable file (stderr and CSV), exit code 4."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.helpers import Payload

N_GOOD = 1000
MAX_GROWTH_MB = 50


def _write_inputs(folder: Path, marker: Path) -> dict[str, str]:
    """1,000 readable 16^3 volumes, and among them (by name order) bad files; returns ``{bad case id: reason}``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    volumes = rng.integers(0, 256, (N_GOOD, 16, 16, 16), dtype=np.uint8)
    for i, volume in enumerate(volumes):
        np.save(folder / f"vol_{i:04d}.npy", volume)
    (folder / "vol_0100_notes.npy").write_text("this is a text file, not an array\n")
    whole = (folder / "vol_0000.npy").read_bytes()
    (folder / "vol_0300_cut.npy").write_bytes(whole[: len(whole) // 3])
    np.save(folder / "vol_0500_slice.npy", volumes[0, 0])
    np.save(folder / "vol_0700_pickle.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    (folder / "vol_0900_empty.nii.gz").write_bytes(b"")
    return {
        "vol_0100_notes": "not an image: the file holds text, not .npy data",
        "vol_0300_cut": "truncated file (the data ends early; an interrupted copy or download?)",
        "vol_0500_slice": "a 2D image (shape (16, 16))",
        "vol_0700_pickle": "an array of Python objects, not numbers",  # from the .npy header: never unpickled
        "vol_0900_empty": "empty file (0 bytes)",
    }


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _rows_written(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


@pytest.mark.slow
def test_predict_1000_volumes_memory_flat_bad_files_reported(trained_run, tmp_path):
    marker = tmp_path / "pwned"
    bad = _write_inputs(tmp_path / "inputs", marker)
    total = N_GOOD + len(bad)
    out = tmp_path / "predictions.csv"
    with open(tmp_path / "stdout.txt", "wb") as so, open(tmp_path / "stderr.txt", "wb") as se:
        proc = subprocess.Popen([sys.executable, "-m", "medvox.cli", "predict", "--run", str(trained_run),
                                 str(tmp_path / "inputs"), "--out", str(out), "--batch-size", "8"],
                                stdout=so, stderr=se)
        samples = []  # (rows in the CSV, RSS MB): the CSV is flushed after every batch
        while proc.poll() is None:
            rss = _rss_mb(proc.pid)
            if rss is not None:
                samples.append((_rows_written(out), rss))
            time.sleep(0.02)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 4, err[-3000:]

    steady = [rss for rows, rss in samples if rows >= 0.2 * total]
    assert len(steady) >= 10, f"too few memory samples after 20 % progress: {samples[-5:]}"
    growth = max(steady) - steady[0]
    assert growth < MAX_GROWTH_MB, f"RSS grew by {growth:.1f} MB from 20 % to 100 % ({steady[0]:.0f} MB at 20 %)"

    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == total
    ok = [r for r in rows if r["status"] == "ok"]
    errors = {r["case_id"]: r for r in rows if r["status"] == "error"}
    assert sorted(r["case_id"] for r in ok) == [f"vol_{i:04d}" for i in range(N_GOOD)]
    prob_cols = [c for c in rows[0] if c.startswith("prob_")]
    assert all(abs(sum(float(r[c]) for c in prob_cols) - 1) < 1e-4 for r in ok)
    assert sorted(errors) == sorted(bad)
    assert f"{len(bad)} input(s) could not be read or were refused by the checks (status 'error' in the CSV):" in err
    for case_id, reason in bad.items():
        row = errors[case_id]
        assert row["error"].split(": ", 1)[1].startswith(reason), row  # "<path>: <reason> (<fix>)"
        assert all(row[c] == "" for c in prob_cols) and row["predicted"] == ""
        assert f"  {case_id} ({row['source']}): {row['error']}\n" in err  # each bad file named on stderr ...
        assert err.count(row["error"]) == 1  # ... once
        assert Path(row["source"]).name.startswith(case_id)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert (summary["predicted"], summary["failed"]) == (N_GOOD, len(bad))
    assert not marker.exists()  # the pickled .npy was refused, never unpickled
