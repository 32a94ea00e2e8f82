""""subsample": the projected tokens at the centres of the cells of a `kh x kw` partition of the grid (rows
`floor((i + 1/2) gh / kh)`, same for columns), row-major."""

from .grid import subsample_index
from .mean import ProjectedReduction
from .registry import register_method

__all__ = ["Subsample", "subsample_index"]


@register_method
class Subsample(ProjectedReduction):
    name = "subsample"
    label = "uniform subsampling"

    def reduce_projected(self, features, config, geometry):
        return features[:, subsample_index(geometry.grid, config.num_tokens, features.device)]

    def reduce_image(self, tokens, grid, config, evidence):
        index = subsample_index(grid, config.num_tokens, tokens.device)
        return tokens[index], index
