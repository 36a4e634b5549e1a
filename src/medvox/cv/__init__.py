"""Cross-validation: every fold in turn, the pooled out-of-fold summary, the decision, calibration, fusion and the test ensemble."""
