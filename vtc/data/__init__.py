"""Datasets that need no files: :mod:`vtc.data.shapes` (procedural visual QA and classification)."""
