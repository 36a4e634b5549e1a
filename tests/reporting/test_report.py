"""The HTML report: content from a real ``medvox cv`` run, self-containment, escaping, missing pieces,
and rendering in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from medvox.metrics.decision import Decision
from medvox.reporting.htmlpage import fmt
from medvox.reporting.report import GALLERY_SIZE, SAMPLES_PER_CLASS, write_report
from medvox.run import RunError, read_predictions
from tests.conftest_runs import assert_self_contained, decode_png, image_sources, write_synthetic_run

CHROMIUM = Path("/usr/bin/chromium")


def copy_run(run: Path, dest: Path) -> Path:
    """A light copy of a run folder (no checkpoints or TensorBoard logs) to damage in a test."""
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("*.pt", "tensorboard")))


@pytest.fixture(scope="module")
def resnet10_report(cv_runs, tmp_path_factory) -> Path:
    """The report of the real ResNet-10 run, written once for the tests that read it."""
    return write_report(cv_runs["resnet10"], tmp_path_factory.mktemp("resnet10_report") / "report.html")


def section(page: str, sid: str) -> str:
    found = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert found, f"no section {sid}"
    return found.group(1)


def table_rows(markup: str) -> list[list[str]]:
    """The body rows of the first table in ``markup``, as unescaped cell texts."""
    body = re.search(r"<tbody>(.*?)</tbody>", markup, re.S).group(1)
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def oof_errors(run: Path) -> tuple[object, list[int], np.ndarray]:
    """``(OOF predictions, the misclassified rows most confident first, decided class)`` at the run's recorded
    decision, from the CSV and cv_summary.json alone."""
    preds = read_predictions(run / "oof_predictions.csv")
    decision = Decision.from_json(json.loads((run / "cv_summary.json").read_text())["decision"])
    pred = decision.apply(preds.probs)
    wrong = [i for i in range(preds.n) if pred[i] != preds.labels[i]]
    return preds, sorted(wrong, key=lambda i: (-preds.probs[i, pred[i]], i)), pred


@pytest.mark.slow
def test_report_of_a_real_cv_run(cv_runs, resnet10_report):
    run = cv_runs["resnet10"]
    page = resnet10_report.read_text(encoding="utf-8")
    summary = json.loads((run / "cv_summary.json").read_text())
    assert_self_contained(page)
    # 2 learning curves + OOF (ROC, PR, confusion) + sample slices + gallery + test (ROC, PR, confusion) + reliability
    n_gallery = min(GALLERY_SIZE, len(oof_errors(run)[1]))
    assert n_gallery > 0
    assert len(image_sources(page)) == 9 + 1 + n_gallery
    for sid in ("samples", "gallery"):
        assert f'<a href="#{sid}">' in page
    auc = summary["cv"]["auc"]
    assert f"{fmt(auc['mean'])} ± {fmt(auc['std'])} [{fmt(auc['ci95'][0])}, {fmt(auc['ci95'][1])}]" in page
    assert f"<td>{fmt(summary['oof']['auc'])}</td>" in page
    for variant in ("ensemble", "ensemble_calibrated", "ensemble_tta", "ensemble_tta_calibrated"):
        assert f"<td>{fmt(summary['test'][variant]['auc'])}</td>" in page
    assert "fold ensemble" in page and "ensemble + TTA + temperature scaling" in page
    for k, calib in enumerate(summary["calibration"]):
        assert f"<td>fold {k}</td><td>{fmt(calib['temperature'])}</td>" in page
    assert "Dataset fingerprint" in page and "StratifiedGroupKFold" in page  # cache found, splits shown
    assert "<td>target_shape</td><td>28, 28, 28</td>" in page
    assert "<td>LDAM</td>" in page and "best_ema.pt" in page
    assert "No held-out test set" not in page and "best.pt), not the EMA" not in page
    # the threshold metrics at the run's decision: folds (each fold's validation cases), pooled OOF, test
    decision, at = summary["decision"], summary["cv_at_decision"]["balanced_accuracy"]
    assert html.escape(f"The run's figures at its decision: calibrated p(1) >= {decision['threshold']:.3f} (youden") in page
    row = (f"<tr><td>balanced_accuracy</td><td>{fmt(at['mean'])} ± {fmt(at['std'])} [{fmt(at['ci95'][0])}, "
           f"{fmt(at['ci95'][1])}]</td><td>{fmt(summary['oof']['balanced_accuracy'])}</td>"
           f"<td>{fmt(summary['test']['final_at_threshold']['balanced_accuracy'])}</td></tr>")
    assert row in page
    # the test figures with their 95 % intervals and counts; a 20-case test set is flagged as small
    from medvox.metrics.stats import delong_ci
    from medvox.run import read_predictions

    test = read_predictions(run / "test_predictions.csv")
    lo, hi = delong_ci(test.labels, test.probs[:, 1])
    assert f"<td>auc</td><td>{fmt(summary['test']['final_at_threshold']['auc'])}</td><td>[{fmt(lo)}, {fmt(hi)}]</td>" in page
    assert "Small test set: n = 20" in page and "Wilson" in page
    assert "fg_sample</td><td>" not in page or "values: min" in page


@pytest.mark.slow
def test_gallery_shows_the_most_confident_out_of_fold_errors(cv_runs, resnet10_report):
    """The gallery lists exactly the run's most confident OOF errors at its recorded decision (computed here
    from oof_predictions.csv), each with the CSV's probability and the map of the fold model that did not see
    it (the fold whose validation set holds the case in splits.json)."""
    run = cv_runs["resnet10"]
    preds, ranked, pred = oof_errors(run)
    expected = ranked[:GALLERY_SIZE]
    gallery = section(resnet10_report.read_text(encoding="utf-8"), "gallery")
    val_fold = {case: k for k, f in enumerate(json.loads((run / "fold_0" / "splits.json").read_text())["folds"])
                for case in f["val"]}
    rows = table_rows(gallery)
    assert [r[1] for r in rows] == [preds.ids[i] for i in expected]
    for rank, (row, i) in enumerate(zip(rows, expected, strict=True), 1):
        true, predicted = preds.classes[preds.labels[i]], preds.classes[pred[i]]
        assert row == [str(rank), preds.ids[i], str(val_fold[preds.ids[i]]), true, predicted,
                       fmt(preds.probs[i, pred[i]]), row[6]]
        assert row[6].startswith("Grad-CAM at layer")
    captions = [html.unescape(c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", gallery)]
    assert captions == [f"{rank}. {preds.ids[i]}: true {preds.classes[preds.labels[i]]}, predicted "
                        f"{preds.classes[pred[i]]}, calibrated p({preds.classes[pred[i]]}) = "
                        f"{fmt(preds.probs[i, pred[i]])}; map of fold {val_fold[preds.ids[i]]}'s model (the case was "
                        "in its validation set)" for rank, i in enumerate(expected, 1)]
    decision = Decision.from_json(json.loads((run / "cv_summary.json").read_text())["decision"])
    assert html.escape(f"misclassified at the run's decision ({decision.text()}), ranked by the calibrated") in gallery
    assert f"most confident of the {len(ranked)} pooled out-of-fold cases" in gallery
    for src in image_sources(gallery):  # the map in colour over a grey image
        pixels = decode_png(src)[..., :3]
        assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 0.2).mean() > 0.01


@pytest.mark.slow
def test_sample_slices_show_the_surest_cases_of_every_class(cv_runs, resnet10_report):
    run = cv_runs["resnet10"]
    preds, _, pred = oof_errors(run)
    samples = section(resnet10_report.read_text(encoding="utf-8"), "samples")
    rows = table_rows(samples)
    for c, name in enumerate(preds.classes):
        # correctly decided cases of the class by their probability of it, then the misclassified ones
        mine = sorted((i for i in range(preds.n) if preds.labels[i] == c),
                      key=lambda i: (pred[i] != c, -preds.probs[i, c], i))[:SAMPLES_PER_CLASS]
        assert mine
        assert [r[:4] for r in rows if r[0] == name] == [
            [name, preds.ids[i], str(preds.folds[i]), fmt(preds.probs[i, c])] for i in mine]
    assert {r[0] for r in rows} == set(preds.classes)
    (src,) = image_sources(samples)
    assert decode_png(src).shape[0] > 200


@pytest.mark.slow
def test_report_notes_ema_off_and_no_tta(cv_runs):
    from medvox.cli import main

    assert main(["report", str(cv_runs["mil"]), "--no-gallery"]) == 0
    out = cv_runs["mil"] / "report.html"
    page = out.read_text(encoding="utf-8")
    assert "raw weights at their best epoch (best.pt), not the EMA" in page and "TTA was off" in page
    assert "ensemble + TTA" not in page  # only the variants that ran are shown
    assert "gallery of the most confident errors was left out" in section(page, "gallery")
    assert image_sources(section(page, "gallery")) == [] and len(image_sources(section(page, "samples"))) == 1


@pytest.mark.slow
def test_report_tolerates_missing_pieces(cv_runs, tmp_path):
    run = copy_run(cv_runs["mil"], tmp_path / "damaged")
    shutil.rmtree(run / "fold_1")
    (run / "test_predictions.csv").unlink()
    for name in ("learning_curves.png", "loss_curve.png", "plan.json"):
        (run / "fold_0" / name).unlink()
    summary = json.loads((run / "cv_summary.json").read_text())
    summary["test"] = None
    (run / "cv_summary.json").write_text(json.dumps(summary))
    page = write_report(run).read_text(encoding="utf-8")
    assert_self_contained(page)
    for text in ("Only one fold", "No held-out test set", "fold_0: no learning-curve image", "plan.json is missing"):
        assert text in page
    gallery = section(page, "gallery")  # no checkpoints in the copy: each error listed, its map missing, said why
    assert image_sources(gallery) == [] and gallery.count("no map (") == len(table_rows(gallery)) > 0
    (run / "cv_summary.json").unlink()  # an interrupted CV: the folds still make a page
    page = write_report(run).read_text(encoding="utf-8")
    assert "cv_summary.json is missing" in page and "<td>fold_0</td>" in page


def test_report_escapes_case_ids_and_class_names(tmp_path, rng):
    classes = ["<b>benign</b>", 'mal"ig&nant']
    ids = [f"<script>alert({i})</script>" for i in range(30)] + [f"case_{i}" for i in range(30)]
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    labels[:5] = 1  # some errors with evil ids
    p1 = rng.uniform(0.3, 0.7, size=60)
    run = write_synthetic_run(tmp_path / "evil<run>", ids, labels.tolist(), np.c_[1 - p1, p1], classes=classes)
    page = write_report(run).read_text(encoding="utf-8")
    assert "<script" not in page and "<b>benign" not in page
    assert "&lt;script&gt;alert(" in page and "&lt;b&gt;benign&lt;/b&gt;" in page and "mal&quot;ig&amp;nant" in page
    assert "evil&lt;run&gt;" in page
    assert "No held-out test set" in page


def test_report_counts_errors_at_the_runs_decision_threshold(tmp_path):
    """A binary run with an OOF threshold: its confusion matrix and error list are at that threshold (the
    decisions its tables and `medvox predict` give), not at the argmax."""
    p1 = np.r_[np.linspace(0.05, 0.45, 40), np.linspace(0.15, 0.9, 20)]  # positives mostly below 0.5
    labels = [0] * 40 + [1] * 20
    from medvox.metrics.decision import Decision

    ids = [f"c{i}" for i in range(60)]
    run = write_synthetic_run(tmp_path / "run", ids, labels, np.c_[1 - p1, p1], classes=("benign", "malignant"))
    page = write_report(run).read_text(encoding="utf-8")
    argmax_errors = sum((v >= 0.5) != y for v, y in zip(p1, labels, strict=True))
    assert "Confusion matrix at the most probable class" in page and f"of {argmax_errors}</summary>" in page
    cut = Decision(("benign", "malignant"), "youden", threshold=0.3)
    run = write_synthetic_run(tmp_path / "run2", ids, labels, np.c_[1 - p1, p1], classes=("benign", "malignant"),
                              decision=cut)
    page = write_report(run).read_text(encoding="utf-8")
    errors = sum((v >= 0.3) != y for v, y in zip(p1, labels, strict=True))
    assert errors != argmax_errors
    assert "Confusion matrix at calibrated p(malignant) &gt;= 0.300" in page
    assert f"of {errors}</summary>" in page and "most probable class" not in page


def test_report_of_a_three_class_run_with_a_test_set(tmp_path, rng):
    ids, labels = [f"c{i}" for i in range(60)], [i % 3 for i in range(60)]
    test_ids, test_labels = [f"t{i}" for i in range(30)], [i % 3 for i in range(30)]
    run = write_synthetic_run(tmp_path / "run", ids, labels, rng.dirichlet(np.ones(3), size=60),
                              classes=("a", "b", "c"),
                              test=(test_ids, test_labels, rng.dirichlet(np.ones(3), size=30)))
    page = write_report(run).read_text(encoding="utf-8")
    assert_self_contained(page)
    assert len(image_sources(page)) == 6  # OOF and test: ROC, PR, confusion matrix (no fold PNGs, no calibration)
    assert "no calibration.json" in page and "config.json is missing" in page


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(RunError, match="not a medvox run folder"):
        write_report(tmp_path)


# ------------------------------------------------------------------ a real browser

_PROBE = """<script>
window.__problems = [];
window.addEventListener("error", function (e) {
  var t = e.target || {};
  __problems.push(t.tagName ? "failed to load " + t.tagName + " " + String(t.src || t.href).slice(0, 60) : "error: " + e.message);
}, true);
document.addEventListener("securitypolicyviolation", function (e) {
  __problems.push("CSP blocked " + e.blockedURI + " (" + e.violatedDirective + ")");
});
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0 || i.src.indexOf("data:image/png;base64,") !== 0; });
  var out = {images: imgs.length, bad: bad.length, problems: __problems, height: document.body.scrollHeight,
             widths: imgs.map(function (i) { return i.naturalWidth; })};
  var pre = document.createElement("pre");
  pre.id = "medvox-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed: apt-get install chromium")
def test_report_renders_in_headless_chromium(resnet10_report, tmp_path):
    report = resnet10_report
    page = report.read_text(encoding="utf-8")
    n_images = len(image_sources(page))

    # the page itself: a screenshot, and no console message (a blocked load or an error would log one)
    shot = tmp_path / "shot.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri(), tmp=tmp_path)
    assert shot.is_file(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.05 and (pixels.mean(axis=2) < 0.5).mean() > 0.01  # text and figures, not a blank page
    colour = np.abs(pixels[..., 0] - pixels[..., 2]) > 0.2  # the curves and matrices are coloured
    assert colour.mean() > 0.001

    # a test copy with a probe script (allowed by a relaxed CSP): every image decoded, no error, no blocked load
    probe_page = page.replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
    probe_page = probe_page.replace("<title>", _PROBE + "<title>", 1)
    probe = tmp_path / "probe.html"
    probe.write_text(probe_page, encoding="utf-8")
    run = _chromium("--dump-dom", "--virtual-time-budget=10000", probe.as_uri(), tmp=tmp_path)
    found = re.search(r'<pre id="medvox-probe">(.*?)</pre>', run.stdout, re.S)
    assert found, f"probe did not report: {run.stdout[-500:]} {run.stderr[-1500:]}"
    result = json.loads(html.unescape(found.group(1)))
    assert result["problems"] == []
    assert result["images"] == n_images and n_images > 10 and result["bad"] == 0
    assert min(result["widths"]) > 100 and result["height"] > 3000
