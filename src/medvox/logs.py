"""The library's logging: records on ``logging.getLogger("medvox")``, never a handler of the host's touched.

The library prints nothing itself; the application (the ``medvox`` command line, a notebook, a pipeline)
chooses the handlers. What the library does while one of its public functions runs, and undoes after:

* :func:`library_logging`: when nobody chose a level for the ``medvox`` logger it is INFO for the call, so the
  run folder's ``train.log`` records every epoch (at Python's default WARNING it would hold warnings only) and
  a host that configured logging sees the progress; on DDP ranks other than 0 only warnings and errors pass,
  so a line is not logged once per process;
* :func:`train_log`: a fold's ``train.log``, a file handler on the ``medvox`` logger for the fold's duration.

Handlers, levels and propagation the host set are left as they are.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("medvox")


def rank_zero_or_warning(record: logging.LogRecord) -> bool:
    """True for a warning or worse, and for every record of the process of rank 0 (or without DDP)."""
    dist = sys.modules.get("torch.distributed")  # loaded by the training code; a filter never imports torch
    if record.levelno >= logging.WARNING or dist is None or not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == 0


@contextlib.contextmanager
def library_logging() -> Iterator[None]:
    """The ``medvox`` logger while a public function runs (see the module docstring); nests, and restores
    exactly what it changed."""
    unset = log.level == logging.NOTSET
    if unset:
        log.setLevel(logging.INFO)
    added = rank_zero_or_warning not in log.filters
    if added:
        log.addFilter(rank_zero_or_warning)
    try:
        yield
    finally:
        if added:
            log.removeFilter(rank_zero_or_warning)
        if unset:
            log.setLevel(logging.NOTSET)


@contextlib.contextmanager
def train_log(path: Path | None) -> Iterator[None]:
    """Copy the ``medvox`` logger's records to the file ``path`` (a fold's ``train.log``; None: nowhere, as on
    DDP ranks other than 0), one message per line; the handler is removed and closed after."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
