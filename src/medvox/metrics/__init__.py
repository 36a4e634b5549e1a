"""Metric maths only: classification metrics, decisions, calibration, statistics. Imports nothing above it."""
