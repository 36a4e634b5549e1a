"""Every command that reads a run, on wrong inputs: a one-line message naming the path and the fix, a
documented exit code, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

from medvox.cli import main

# the exit codes medvox documents: 1 bad data / checkpoint, 2 usage or config, 3 training refused, 5 run folder
DOCUMENTED = {1, 2, 3, 5}


def _bad_runs(root, cv_run):
    """name -> a wrong run folder (made here)."""
    empty = root / "empty"
    empty.mkdir()
    nonsense = root / "nonsense" / "resnet10"
    shutil.copytree(cv_run, nonsense, ignore=shutil.ignore_patterns("*.pt", "tensorboard"))
    for fold in nonsense.glob("fold_*"):
        (fold / "config.json").write_text("{not json")
    old = root / "old" / "resnet10"
    shutil.copytree(cv_run, old, ignore=shutil.ignore_patterns("*.pt", "tensorboard"))
    summary = json.loads((old / "cv_summary.json").read_text())
    summary.pop("format_version")
    (old / "cv_summary.json").write_text(json.dumps(summary))
    lost = root / "lost" / "resnet10"
    shutil.copytree(cv_run, lost, ignore=shutil.ignore_patterns("tensorboard"))
    (lost / "fold_1" / "best_ema.pt").unlink()
    return {"missing": root / "missing", "empty": empty, "nonsense config": nonsense, "old format": old,
            "lost member": lost}


@pytest.fixture(scope="module")
def bad(cv_runs, tmp_path_factory):
    return _bad_runs(tmp_path_factory.mktemp("bad_runs"), cv_runs["resnet10"])


def _commands(run, image, out):
    return {
        "report": ["report", str(run), "--out", str(out / "r.html")],
        "compare": ["compare", str(run), str(run), "--out", str(out / "cmp")],
        "predict": ["predict", "--run", str(run), str(image), "--out", str(out / "p.csv")],
        "explain": ["explain", "--run", str(run), str(image), "--out", str(out / "x")],
        "export": ["export", str(run), "--out", str(out / "e")],
    }


# report and compare read a run's figures and prediction files, not its config or checkpoints
MATRIX = [(case, command) for case in ("missing", "empty", "nonsense config", "old format", "lost member")
          for command in ("report", "compare", "predict", "explain", "export")
          if not (case in ("nonsense config", "lost member") and command in ("report", "compare"))]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "command"), MATRIX)
def test_a_wrong_run_folder_is_a_message_not_a_traceback(bad, cv_runs, case, command, tmp_path, capsys):
    image = sorted((cv_runs["resnet10"].parent.parent / "nifti").glob("*.nii.gz"))[:1] or [tmp_path / "none.nii.gz"]
    if not image[0].exists():
        import nibabel as nib
        import numpy as np

        nib.save(nib.Nifti1Image(np.zeros((28, 28, 28), np.float32), np.eye(4)), image[0])
    out = tmp_path / "out"
    out.mkdir()
    code = main(_commands(bad[case], image[0], out)[command])
    err = capsys.readouterr().err
    assert code in DOCUMENTED, (code, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("medvox: ")]
    assert lines and str(bad[case]) in lines[-1], err
    assert "Traceback" not in err
    assert not any(out.iterdir())  # nothing written


@pytest.mark.slow
def test_a_fold_folder_given_to_report_names_the_run_above_it(cv_runs, tmp_path, capsys):
    fold = cv_runs["resnet10"] / "fold_0"
    assert main(["report", str(fold), "--out", str(tmp_path / "r.html")]) == 5
    assert f"takes the run folder above it ({fold.parent})" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_predict_out_a_folder_is_refused_before_any_model_is_loaded(cv_runs, tmp_path, capsys, monkeypatch):
    import medvox.inference.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "taken").mkdir()
    code = main(["predict", "--run", str(cv_runs["resnet10"]), str(tmp_path), "--out", str(tmp_path / "taken")])
    assert code in DOCUMENTED and "is a folder" in capsys.readouterr().err
