"""The quantization residual as an exact two-conv operator (Theorem 1, docs/method.md section 2).

For a Conv2d weight W of shape (m, n/g, k1, k2) with g groups, the residual
dW = W - [W]_n is split into its g diagonal blocks; each block's mode-1 unfolding
M_j = dW_j.reshape(m/g, n/g*k1*k2) has the thin SVD U_j diag(S_j) V_j^T with
R = min(m/g, n/g*k1*k2). Keeping r triplets per group gives

    A = (diag(S^1/2) V^T)[:r] -> (g*r, n/g, k1, k2)   kxk conv, groups g, W's stride/padding
    B = (U diag(S^1/2))[:, :r] -> (m, r, 1, 1)        1x1 conv, groups g

and conv(x, W) = conv(x, [W]_n) + conv(conv(x, A), B) exactly at r = R.
"""
from __future__ import annotations

import torch


class ResidualFactors(torch.nn.Module):
    """Per-group thin SVD of a conv residual, stored as constant buffers.

    Buffers: ``U`` (g, m/g, R), ``S`` (g, R), ``Vh`` (g, R, n/g*k1*k2). They are the
    search's constants; `convert_cora` drops them. With ``whitening`` L (g, d, d), the
    factorization minimizes the output error instead (``svd="activation"``, rounding.py):
    ``Vh`` is then V^T L^-1, no longer orthonormal, and U diag(S) Vh is still exactly dW.
    ``factored=False`` (a layer without adapter: nothing ever truncates it) skips the SVD and keeps dW as
    U = I, S = the row norms, Vh = the normalized rows: still exactly dW for the float teacher and the rounding,
    at a fraction of the cost on a wide Linear layer.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def __init__(self, residual: torch.Tensor, groups: int,
                 whitening: torch.Tensor | list[torch.Tensor] | None = None, factored: bool = True) -> None:
        super().__init__()
        m, n_per_group, k1, k2 = residual.shape
        if m % groups:
            raise ValueError(f"out_channels {m} is not divisible by groups {groups}")
        self.groups = groups
        self.weight_shape = tuple(residual.shape)
        self.whitened = whitening is not None
        blocks = residual.detach().to(torch.float64, copy=True).reshape(groups, m // groups, n_per_group * k1 * k2)
        if not factored:
            U, S, Vh = _rows(blocks)
        elif whitening is None:
            U, S, Vh = thin_svd(blocks)
        else:  # output-aware: SVD of dW L with H = L L^T, then V^T L^-1 (rounding.py)
            factors = [whitening] if isinstance(whitening, torch.Tensor) else list(whitening)
            blocks = _block_apply(blocks, factors, torch.bmm)  # the float64 residual is dropped here
            U, S, Vh = thin_svd(blocks)
            del blocks
            Vh = _block_apply(Vh, factors, _solve_right)
        self.register_buffer("U", U.to(torch.float32))
        self.register_buffer("S", S.to(torch.float32))
        self.register_buffer("Vh", Vh.to(torch.float32))

    @property
    def max_rank(self) -> int:
        """R: the largest rank per group."""
        return int(self.S.shape[1])

    @property
    def params_per_rank(self) -> int:
        """Adapter parameters per unit of rank: m + n*k1*k2 (n = all input channels)."""
        m, n_per_group, k1, k2 = self.weight_shape
        return m + self.groups * n_per_group * k1 * k2

    def is_zero(self) -> bool:
        return bool(self.S.max() == 0) if self.S.numel() else True

    def adapter_weights(self, rank: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float (A, B) conv weights keeping the first ``rank`` triplets per group.

        ``mask`` (length R, e.g. the NBK Phi of the soft search) multiplies S^1/2 in both
        A and B, so the effective singular values become mask^2 * S (docs/method.md section 3).
        """
        g = self.groups
        m, n_per_group, k1, k2 = self.weight_shape
        root = self.S[:, :rank].clamp_min(0).sqrt()
        if mask is not None:
            root = root * mask[:rank]
        a = (root.unsqueeze(-1) * self.Vh[:, :rank]).reshape(g * rank, n_per_group, k1, k2)
        b = (self.U[:, :, :rank] * root.unsqueeze(1)).reshape(m, rank, 1, 1)
        return a, b

    def folded_delta(self, mask: torch.Tensor) -> torch.Tensor:
        """fold(B o A) = U diag(mask^2 S) V^T reshaped to W's shape (docs/method.md section 4)."""
        scaled = self.U * (mask * mask * self.S).unsqueeze(1)
        return torch.bmm(scaled, self.Vh).reshape(self.weight_shape)


def _rows(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dW = I diag(row norms) (rows / norms): an exact factorization without an SVD (``factored=False``)."""
    S = blocks.norm(dim=-1)
    eye = torch.eye(blocks.shape[1], dtype=blocks.dtype, device=blocks.device).expand(blocks.shape[0], -1, -1)
    return eye.contiguous(), S, blocks / S.clamp_min(1e-300).unsqueeze(-1)


def _block_apply(x: torch.Tensor, factors: list[torch.Tensor], op) -> torch.Tensor:
    """``op(x, L)`` for a block-diagonal L = diag(L_1, ..., L_k), one column slice of ``x`` per block.

    With several blocks the result overwrites ``x`` slice by slice (each slice is read before it is
    written), so a wide layer needs no second copy of it; callers pass a tensor of their own."""
    if len(factors) == 1:
        return op(x, factors[0].to(x.dtype))
    start = 0
    for factor in factors:
        stop = start + factor.shape[-1]
        x[..., start:stop] = op(x[..., start:stop], factor.to(x.dtype))
        start = stop
    return x


def _solve_right(x: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """x L^-1 for a lower-triangular L."""
    return torch.linalg.solve_triangular(lower, x, upper=False, left=False)


#: Above this many elements, a matrix at least 4x wider than tall (or taller than wide) is
#: decomposed through its small Gram matrix (`gram_svd`) instead of LAPACK's gesdd.
GRAM_ELEMENTS = 1 << 24


def gram_svd(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of wide (g, m, d) matrices from the eigendecomposition of M M^T (m x m).

    Memory beyond the input is one (g, m, d) result; U S V^T reproduces M to float64 precision
    (directions with singular value below 1e-12 of the largest carry none of M and are zeroed).
    """
    evals, evecs = torch.linalg.eigh(torch.bmm(blocks, blocks.mT))
    order = torch.argsort(evals, dim=-1, descending=True)
    S = evals.gather(-1, order).clamp_min(0).sqrt()
    U = evecs.gather(-1, order.unsqueeze(1).expand_as(evecs))
    keep = S > 1e-12 * S[..., :1].clamp_min(1e-300)
    inverse = torch.where(keep, 1.0 / S.clamp_min(1e-300), torch.zeros_like(S))
    Vh = torch.bmm(U.mT, blocks).mul_(inverse.unsqueeze(-1))
    return U, torch.where(keep, S, torch.zeros_like(S)), Vh


def thin_svd(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched thin SVD; wide matrices are decomposed through their tall transpose.

    LAPACK's gesdd is several times faster on the tall transpose (resnet18 prepare: 48 s ->
    ~10 s on 2 cores): M^T = U' S V'^T gives M = V' S U'^T, the same factors up to sign.
    Large, very unbalanced matrices (a conv with fan-in 65,536) go through `gram_svd`.
    """
    m, d = blocks.shape[-2:]
    if m * d >= GRAM_ELEMENTS and 4 * min(m, d) <= max(m, d):
        if m < d:
            return gram_svd(blocks)
        u, s, vh = gram_svd(blocks.mT)
        return vh.mT, s, u.mT
    if blocks.shape[-2] < blocks.shape[-1]:
        ut, s, vht = torch.linalg.svd(blocks.mT, full_matrices=False)
        return vht.mT, s, ut.mT
    return torch.linalg.svd(blocks, full_matrices=False)


def nbk_mask(rank: torch.Tensor, max_rank: int, order: float) -> torch.Tensor:
    """Normalized Butterworth kernel Phi_i(r) = 1 / sqrt(1 + (i / r)^(2k)), i = 0..R-1.

    Phi_0 = 1, so the kernel is already normalized to a maximum of 1 (docs/method.md section 3).
    """
    i = torch.arange(max_rank, dtype=rank.dtype, device=rank.device)
    return torch.rsqrt(1.0 + (i / rank) ** (2.0 * order))


def fold_two_conv(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """Weight of the single conv equal to conv(conv(x, A), B) for a 1x1 grouped B."""
    g = groups
    rank = a.shape[0] // g
    _, n_per_group, k1, k2 = a.shape
    m = b.shape[0]
    a_g = a.reshape(g, rank, n_per_group * k1 * k2)
    b_g = b.reshape(g, m // g, rank)
    return torch.bmm(b_g, a_g).reshape(m, n_per_group, k1, k2)
