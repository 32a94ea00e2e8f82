""""mean": adaptive average pooling of the projected visual tokens on their 2-D grid to a `kh x kw` grid with
`kh * kw = K` (`grid_shape`: the factorisation closest to the patch grid's aspect ratio)."""

from typing import Sequence

import torch
from torch.nn import functional as F

from .grid import grid_shape, subsample_index
from .registry import BaselineMethod, register_method

__all__ = ["MeanPooling", "mean_pool"]


def mean_pool(features: torch.Tensor, grid: Sequence[int], num_tokens: int) -> torch.Tensor:
    """Adaptive average pooling of `(I, gh * gw, C)` grid tokens to `(I, K, C)` (row-major `kh x kw`)."""
    gh, gw = grid
    kh, kw = grid_shape(num_tokens, grid)
    images, _, channels = features.shape
    x = features.transpose(1, 2).reshape(images, channels, gh, gw)
    return F.adaptive_avg_pool2d(x, (kh, kw)).flatten(2).transpose(1, 2)  # (I, K, C)


class ProjectedReduction(BaselineMethod):
    """A method that reduces the projector's output `(images, N, H)` to `(images, K, H)` while images are encoded."""

    reduces_while_encoding = True

    def needs_grid(self, config) -> bool:
        return True

    def install(self, model) -> list:
        return [model._baseline_projector().register_forward_hook(model._baseline_reduce_projected)]

    def reduce_projected(self, features: torch.Tensor, config, geometry) -> torch.Tensor:
        raise NotImplementedError


@register_method
class MeanPooling(ProjectedReduction):
    name = "mean"
    label = "mean pooling"

    def reduce_projected(self, features, config, geometry):
        return mean_pool(features, geometry.grid, config.num_tokens)

    def reduce_image(self, tokens, grid, config, evidence):
        """The cells' means; each stands for its cell's centre token (`subsample_index`)."""
        pooled = mean_pool(tokens[None], grid, config.num_tokens)[0]
        return pooled, subsample_index(grid, config.num_tokens, tokens.device)
