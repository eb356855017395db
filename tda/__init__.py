"""The science: training data attribution as plain functions over tensors and tables.

No Ray, no MLflow, no engine here (outside `tda.steps`, which declares the step kinds).
"""
