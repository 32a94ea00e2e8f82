"""The patch grid: how K tokens are laid out on an image's `gh x gw` grid (mean, subsample, instruction_merge's
spatial groups) and the cells' centres."""

import math
from typing import Sequence

import torch

__all__ = ["grid_shape", "spatial_groups", "subsample_index"]


def grid_shape(num_tokens: int, grid: Sequence[int]) -> tuple[int, int]:
    """`(kh, kw)` with `kh * kw == num_tokens`, `kh <= gh`, `kw <= gw`, whose aspect ratio is closest to the grid's
    (1 -> 1x1, 4 -> 2x2, 16 -> 4x4, 6 -> 2x3 on a square grid).

    Raises:
        ValueError: if no such factorisation exists (e.g. a prime K larger than the grid's sides).
    """
    gh, gw = grid
    best = None
    for kh in range(1, num_tokens + 1):
        if num_tokens % kh:
            continue
        kw = num_tokens // kh
        if kh > gh or kw > gw:
            continue
        mismatch = abs(math.log((kh * gw) / (kw * gh)))
        if best is None or mismatch < best[0] - 1e-12:
            best = (mismatch, kh, kw)
    if best is None:
        raise ValueError(
            f"num_tokens={num_tokens} cannot be laid out as a kh x kw grid within the {gh}x{gw} patch grid (no "
            f"factorisation kh * kw = {num_tokens} with kh <= {gh} and kw <= {gw}); pick e.g. a square number"
        )
    return best[1], best[2]


def spatial_groups(grid: Sequence[int], num_tokens: int, device=None) -> torch.Tensor:
    """`(N,)` group (0..K-1, row-major cells of a `kh x kw` partition of the grid) of each grid token."""
    gh, gw = grid
    kh, kw = grid_shape(num_tokens, grid)
    rows = torch.arange(gh, device=device) * kh // gh
    cols = torch.arange(gw, device=device) * kw // gw
    return (rows[:, None] * kw + cols[None, :]).flatten()


def subsample_index(grid: Sequence[int], num_tokens: int, device=None) -> torch.Tensor:
    """`(K,)` row-major token indices of the centres of a `kh x kw` partition of the grid."""
    gh, gw = grid
    kh, kw = grid_shape(num_tokens, grid)
    rows = (2 * torch.arange(kh, device=device) + 1) * gh // (2 * kh)
    cols = (2 * torch.arange(kw, device=device) + 1) * gw // (2 * kw)
    return (rows[:, None] * gw + cols[None, :]).flatten()
