""""subsample": the projected tokens at the centres of the cells of a `kh x kw` partition of the grid (rows
`floor((i + 1/2) gh / kh)`, same for columns), row-major."""

from typing import Sequence

import torch

from .grid import grid_shape
from .mean import ProjectedReduction
from .registry import register_method

__all__ = ["Subsample", "subsample_index"]


def subsample_index(grid: Sequence[int], num_tokens: int, device=None) -> torch.Tensor:
    """`(K,)` row-major token indices of the centres of a `kh x kw` partition of the grid."""
    gh, gw = grid
    kh, kw = grid_shape(num_tokens, grid)
    rows = (2 * torch.arange(kh, device=device) + 1) * gh // (2 * kh)
    cols = (2 * torch.arange(kw, device=device) + 1) * gw // (2 * kw)
    return (rows[:, None] * gw + cols[None, :]).flatten()


@register_method
class Subsample(ProjectedReduction):
    name = "subsample"

    def reduce_projected(self, features, config, geometry):
        return features[:, subsample_index(geometry.grid, config.num_tokens, features.device)]
