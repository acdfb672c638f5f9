"""Pure maths, no config and no I/O: balancing (C, D, λ), weighting, gradmtl, loss, metrics."""
