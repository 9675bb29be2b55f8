"""Thin command-line tools over ember.specs (run from the repository root: python -m export.<tool>)."""
