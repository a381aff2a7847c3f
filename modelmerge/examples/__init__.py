"""Bundled example checkpoints (see modelmerge.zoo.examples)."""
