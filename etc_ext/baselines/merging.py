"""Merging groups of tokens into one (visionzip's contextual tokens, instruction_merge): group logits for the fused
`weighted_aggregate`."""

import torch
from torch.nn import functional as F

from .. import ops

__all__ = ["group_logits", "merge_groups", "similarity_groups"]

# Merge logit of a token outside a group: exp(-1e4 - anything in-group) is exactly 0 in float32, and unlike -inf it
# keeps every softmax row finite (each group holds at least one token).
_OUTSIDE_GROUP = -1.0e4


def _weighted_aggregate(x, logits, importance=None, mask=None):
    """The one call site of weighted_aggregate (the fused op; `etc_ext.reference` has the same contract)."""
    return ops.weighted_aggregate(x, logits, importance, mask)


def similarity_groups(keys: torch.Tensor, importance: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Groups around the K most important tokens: `(I, N)` group of each token.

    Args:
        keys: `(I, N, D)` a representation of each token (e.g. head-averaged keys); cosine similarity decides.
        importance: `(I, N)`; the K largest are the centres, group k is the k-th centre in token order.
    """
    centres = importance.topk(num_tokens, dim=-1).indices.sort(dim=-1).values  # (I, K)
    unit = F.normalize(keys.float(), dim=-1)
    centre_keys = unit.gather(1, centres[..., None].expand(-1, -1, unit.shape[-1]))  # (I, K, D)
    groups = torch.bmm(unit, centre_keys.transpose(1, 2)).argmax(-1)  # (I, N)
    # A centre is in its own group even if another centre's key is as similar (duplicates).
    groups.scatter_(1, centres, torch.arange(num_tokens, device=keys.device).expand_as(centres))
    return groups


def group_logits(groups: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Merge logits float32 `(I, K, N)` from `(I, N)` group ids: 0 inside group k, a large negative elsewhere."""
    inside = groups[:, None, :] == torch.arange(num_tokens, device=groups.device)[None, :, None]
    return torch.zeros(inside.shape, dtype=torch.float32, device=groups.device).masked_fill(~inside, _OUTSIDE_GROUP)


def merge_groups(x: torch.Tensor, groups: torch.Tensor, num_tokens: int, importance: torch.Tensor) -> torch.Tensor:
    """The importance-weighted mean of each group, `(I, K, C)`: `weighted_aggregate(x, group_logits, importance)`.

    Args:
        x: `(I, N, C)`; groups: `(I, N)` (every group non-empty); importance: `(I, N)` >= 0.
    """
    # Floor the importance so that a group whose scores all underflowed to 0 still averages its own tokens.
    importance = importance.float().clamp_min(1e-30)
    return _weighted_aggregate(x, group_logits(groups, num_tokens), importance)
