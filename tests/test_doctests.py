"""The runnable examples in docstrings stay true.

Each module below has self-contained examples (no files needed); they are run with :mod:`doctest`. The
other modules' examples are usage sketches that need a dataset or a run folder on disk (``prepare``,
``train``, ``write_report``, ``export_model``, ...) or write one (``make_demo_data``): their behaviour is tested by the rest of the suite.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

RUNNABLE = (
    "medvox", "medvox.api", "medvox.config", "medvox.losses", "medvox.recipe", "medvox.engine.budget",
    "medvox.engine.timing",
    "medvox.metrics.calibration", "medvox.descriptors", "medvox.metrics.classification",
    "medvox.plots", "medvox.metrics.decision", "medvox.metrics.stats",
    "medvox.models", "medvox.models.base", "medvox.models.catalog", "medvox.models.densenet", "medvox.models.mil",
    "medvox.models.registry", "medvox.models.resnet", "medvox.models.swin",
    "medvox.transforms", "medvox.transforms.affine", "medvox.transforms.batch", "medvox.transforms.flips",
    "medvox.transforms.intensity", "medvox.transforms.mixup", "medvox.transforms.tta",
)


@pytest.mark.parametrize("name", RUNNABLE)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no examples: remove it from RUNNABLE"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (see above)"
