"""Bundled pretrained DEEP-ALIGN aligners (installed as ``modelmerge.pretrained``).

Each aligner is ``NAME.safetensors`` (weights, with its card in the metadata)
and ``NAME.json`` (its card: family, supported depths, sha256, training zoos and
command, hold-out numbers). See docs/pretrained.md.
"""
