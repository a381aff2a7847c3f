"""DEEP-ALIGN: the learned, equivariant weight-space aligner (model, losses, training, bundled weights)."""
