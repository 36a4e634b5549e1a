"""Serving a trained run: Predictor, predict, explain, export."""
