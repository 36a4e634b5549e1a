"""medvox: 3D classification of medical volumes, done correctly, fast and reproducibly.

The public API, each name imported on first use (PEP 562), so ``import medvox`` loads neither torch nor
numpy:

* :func:`check` (``medvox check``), :func:`prepare` (``medvox prepare``), :func:`train` (``medvox train``),
  :func:`cross_validate` (``medvox cv``): see :mod:`medvox.api`; configs as an :class:`ExperimentConfig`, a
  mapping of dotted keys or sections, or a YAML / JSON path;
* :class:`Run`: a run folder, read-only (:mod:`medvox.run`);
* :class:`Predictor`: a run's fold ensemble, to predict arrays and files (:mod:`medvox.inference.predictor`);
* :class:`ExperimentConfig`: the typed settings tree (:mod:`medvox.config`).

The library logs on ``logging.getLogger("medvox")`` and adds no handler to it except each fold's
``train.log``: configure logging to see its progress.

Example:
    >>> import medvox
    >>> report = medvox.check("demo_data/manifest.csv")  # doctest: +SKIP
    >>> summary = medvox.cross_validate({"data.path": "demo_data/manifest.csv", "train.recipe": "auto"})  # doctest: +SKIP
    >>> run = medvox.Run("results/resnet18")  # doctest: +SKIP
    >>> run.decision, run.folds  # doctest: +SKIP
    >>> predictor = medvox.Predictor.from_run("results/resnet18")  # doctest: +SKIP
    >>> prediction = predictor.predict(volume, spacing=(2.0, 1.0, 1.0))  # (D, H, W) array  # doctest: +SKIP
    >>> prediction.labels, prediction.calibrated  # doctest: +SKIP
    >>> cfg = medvox.ExperimentConfig()
    >>> cfg.train.recipe
    'original'
"""

from medvox._version import __version__  # re-exported: the one version string

# public name -> (module, attribute): imported when first asked for, then kept in the module's namespace
_LAZY = {
    "check": ("medvox.api", "check"),
    "prepare": ("medvox.api", "prepare"),
    "train": ("medvox.api", "train"),
    "cross_validate": ("medvox.api", "cross_validate"),
    "Run": ("medvox.run", "Run"),
    "Predictor": ("medvox.inference.predictor", "Predictor"),
    "ExperimentConfig": ("medvox.config", "ExperimentConfig"),
}

__all__ = ["ExperimentConfig", "Predictor", "Run", "__version__", "check", "cross_validate", "prepare", "train"]


def __getattr__(name: str):
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'medvox' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
