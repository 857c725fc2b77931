"""Tensor maths of the quantizer, no torch.fx and no data: observers' clipping ranges, the n-bit grid, the
residual's SVD factors and their two-conv form (Theorem 1), bit packing, and the modules a prepared graph calls."""
