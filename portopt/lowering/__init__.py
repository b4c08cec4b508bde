"""Lowering: from a checked spec to a step function over lists of tensors."""
