"""Errors medvox raises on purpose: the CLI prints them as one clear message, no traceback."""

from __future__ import annotations


class MedvoxError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class DataError(MedvoxError):
    """The input data has problems; the message lists every one (row, file, what, fix)."""

    exit_code = 1


class CheckpointError(MedvoxError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the model."""

    exit_code = 1


class TrainingError(MedvoxError):
    """Training cannot go on (e.g. a non-finite loss); nothing good on disk is overwritten."""

    exit_code = 3
