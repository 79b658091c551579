"""Datasets made from what devices captured (docs/capture.md): immutable, content-addressed, logged in MLflow."""
