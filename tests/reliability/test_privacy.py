"""Privacy: patient tags of DICOM inputs (name, id, birth date, study date, ...) never reach any output:
not the run folder, not the preprocessing cache, not the predictions, not the logs, not stdout/stderr.
Case ids come from the manifest."""

from __future__ import annotations

import csv

import numpy as np

from medvox.cli import main
from tests.reliability.corpus import CLASSES, volume, write_dicom_series, write_manifest
from tests.reliability.helpers import FAST, MIL

# distinctive values, so that finding one anywhere can only mean it leaked
PATIENT_TAGS = {
    "0010|0010": "Quokkason^Zephyrine",  # PatientName
    "0010|0020": "MRN-90210-XQZ",  # PatientID
    "0010|0030": "19030417",  # PatientBirthDate
    "0008|0020": "19111130",  # StudyDate
    "0008|0030": "235959.123",  # StudyTime
    "0008|0080": "St Quibble Infirmary",  # InstitutionName
    "0008|0090": "Snorkelwhite^Bartholomew",  # ReferringPhysicianName
    "0008|0050": "ACC77341Q",  # AccessionNumber
    "0010|1040": "12 Wobbleton Lane",  # PatientAddress
}
# every form a value might take in an output: as stored, its parts, dates as ISO, upper/lower case
SECRETS = sorted({form for value in PATIENT_TAGS.values()
                  for form in (value, *value.split("^"), value.replace("^", " "), value.upper(), value.lower())}
                 | {"1903-04-17", "1911-11-30"})


def _leaks(blob: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in blob or s.encode("utf-16-le") in blob]


def test_patient_tags_never_reach_any_output(tmp_path, capfd):
    data, out, cache = tmp_path / "data", tmp_path / "out", tmp_path / "cache"
    rng = np.random.default_rng(5)
    rows = []
    for i in range(8):
        folder = f"series/s{i}"  # neutral names: the tags are the only place the secrets live
        write_dicom_series(data / folder, volume(rng, i % 2), series=str(i), tags=PATIENT_TAGS)
        rows.append({"id": f"case_{i}", "image": folder, "label": CLASSES[i % 2], "patient_id": f"anon_{i}"})
    manifest = write_manifest(data / "manifest.csv", rows)
    assert any(_leaks(p.read_bytes()) for p in (data / "series").rglob("*.dcm"))  # the inputs do carry them

    common = ["--folds", "2", "--cache-dir", str(cache)]
    assert main(["check", str(manifest), *common]) == 0
    assert main(["prepare", str(manifest), *common]) == 0
    assert main(["train", "--data", str(manifest), *common, "--epochs", "1", *MIL, *FAST, "--output", str(out)]) == 0
    predictions = tmp_path / "predictions.csv"
    assert main(["predict", "--run", str(out / "mil"), str(manifest), "--out", str(predictions)]) == 0
    streams = capfd.readouterr()

    outputs = [p for root in (out, cache) for p in root.rglob("*") if p.is_file()]
    outputs += [predictions, predictions.with_suffix(".json")]
    assert len(outputs) > 20 and any(p.suffix == ".pt" for p in outputs) and any(p.name == "train.log" for p in outputs)
    leaked = {str(p): _leaks(p.read_bytes()) for p in outputs}
    assert {p: found for p, found in leaked.items() if found} == {}
    assert [p for p in outputs if _leaks(str(p).encode())] == []  # nor in any file name
    assert _leaks(streams.out.encode()) == [] and _leaks(streams.err.encode()) == []

    with open(predictions, newline="", encoding="utf-8") as fh:
        predicted = list(csv.DictReader(fh))
    assert [r["case_id"] for r in predicted] == [f"case_{i}" for i in range(8)]  # ids from the manifest
    assert all(r["status"] == "ok" for r in predicted)
    with open(out / "mil" / "fold_0" / "val_predictions.csv", newline="", encoding="utf-8") as fh:
        val = list(csv.DictReader(fh))
    assert {r["case_id"] for r in val} <= {f"case_{i}" for i in range(8)}
    assert {r["patient_id"] for r in val} <= {f"anon_{i}" for i in range(8)}
