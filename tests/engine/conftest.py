"""Fixtures of the engine tests that train in this process."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture
def clean_process():
    """In-process training sets torch's thread count and attaches train.log handlers: undo both."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    logger = logging.getLogger("medvox")
    for handler in [h for h in logger.handlers if getattr(h, "_medvox", False)]:
        logger.removeHandler(handler)
        handler.close()
