"""Image I/O: one axis convention for NIfTI and DICOM, spacing in array order, no patient tags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvox.data.io import ImageError, read_image
from tests.data.conftest import PATIENT_TAGS, write_dicom_series, write_nifti

# Voxel i runs towards Posterior (0.9 mm), j towards Right (0.7 mm), k towards Superior (2.5 mm):
# a "PRS" file, neither RAS nor LPS, with anisotropic spacing.
AFFINE = np.array([[0.0, 0.7, 0.0, 10.0], [-0.9, 0.0, 0.0, 20.0], [0.0, 0.0, 2.5, -30.0], [0, 0, 0, 1]])
SHAPE = (6, 8, 5)  # (i, j, k)
MARK = (2, 5, 3)  # voxel (i, j, k) of the marker
# RAS canonical index: x = j, y = (6 - 1 - i) (P flipped to A), z = k; array (D, H, W) = (z, y, x)
EXPECTED = (3, 3, 5)


def _marked() -> np.ndarray:
    data = np.zeros(SHAPE, np.int16)
    data[MARK] = 1000
    data[0, 0, 0] = 7  # a second, weaker marker: checks the full permutation, not one point
    return data


def test_nifti_reoriented_to_ras_with_spacing_in_array_order(tmp_path):
    array, meta = read_image(write_nifti(tmp_path / "v.nii.gz", _marked(), AFFINE))
    assert array.dtype == np.float32 and array.shape == (5, 6, 8)  # (D, H, W) = (k, i flipped, j)
    assert np.unravel_index(np.argmax(array), array.shape) == EXPECTED
    assert meta["spacing"] == pytest.approx([2.5, 0.9, 0.7])
    assert meta["source_orientation"] == "PRS" and meta["orientation"] == "RAS"
    # the array affine maps the marker's array index to the same world point as the file's affine
    world = AFFINE @ [*MARK, 1]
    assert np.asarray(meta["affine"]) @ [*EXPECTED, 1] == pytest.approx(world)
    # the weak marker (i=0: most posterior) lands at the highest H index (H runs posterior -> anterior)
    assert array[0, 5, 0] == 7


def test_dicom_series_gives_the_same_array_as_nifti(tmp_path):
    nifti, nmeta = read_image(write_nifti(tmp_path / "v.nii.gz", _marked(), AFFINE))
    dicom, dmeta = read_image(write_dicom_series(tmp_path / "series", _marked(), AFFINE))
    np.testing.assert_array_equal(dicom, nifti)
    assert dmeta["spacing"] == pytest.approx(nmeta["spacing"], abs=1e-4)
    np.testing.assert_allclose(dmeta["affine"], nmeta["affine"], atol=1e-4)
    assert dmeta["modality"] == "CT" and dmeta["format"] == "dicom"


def test_dicom_meta_holds_no_patient_tags(tmp_path):
    _, meta = read_image(write_dicom_series(tmp_path / "series", _marked(), AFFINE))
    text = json.dumps(meta)  # also proves meta is JSON-safe
    for value in PATIENT_TAGS.values():
        assert value not in text
    assert set(meta) == {"format", "source_orientation", "modality", "spacing", "affine", "orientation",
                         "shape", "channels", "dtype", "shear_deg"}


def test_dicom_missing_slice_and_mixed_series_are_errors(tmp_path):
    gap = write_dicom_series(tmp_path / "gap", _marked(), AFFINE, skip=(2,))
    with pytest.raises(ImageError, match="missing slice"):
        read_image(gap)
    mixed = write_dicom_series(tmp_path / "mixed", _marked(), AFFINE, series="1")
    write_dicom_series(mixed, _marked(), AFFINE, series="2")
    with pytest.raises(ImageError, match="mixed DICOM series: 2 series"):
        read_image(mixed)


def test_4d_nifti_is_channels_first_and_npy_is_taken_as_is(tmp_path):
    data = np.stack([_marked(), 2 * _marked()], axis=-1)  # (i, j, k, c)
    array, meta = read_image(write_nifti(tmp_path / "v4.nii.gz", data, AFFINE))
    assert array.shape == (2, 5, 6, 8) and meta["channels"] == 2
    assert array[1][EXPECTED] == 2000
    np.save(tmp_path / "v.npy", np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    array, meta = read_image(tmp_path / "v.npy")
    assert array.shape == (2, 3, 4) and array[1, 2, 3] == 23 and meta["spacing"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(("shape", "message"), [((8, 8), "2D image"), ((8, 8, 1), "2D image"),
                                                ((4, 4, 4, 2, 2), "5D image")])
def test_not_3d_is_rejected(tmp_path, shape, message):
    with pytest.raises(ImageError, match=message):
        read_image(write_nifti(tmp_path / "bad.nii.gz", np.ones(shape, np.float32)))


def test_unreadable_files_say_why(tmp_path):
    (tmp_path / "text.nii.gz").write_text("patient list, not an image\n")
    with pytest.raises(ImageError, match="holds text"):
        read_image(tmp_path / "text.nii.gz")
    good = write_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)))
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated"):
        read_image(tmp_path / "cut.nii.gz")
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "nope.nii.gz")
