"""Pure-PyTorch versions of every etc_ext op.

These functions are the specification: readable, device-agnostic, and the oracle the tests
compare the C++/CUDA kernels against. They are also "the PyTorch path" in the benchmarks.
They materialize every intermediate (for example the [B, H, T, N] attention probabilities),
which is exactly what the fused kernels avoid.
"""

from typing import Optional, Sequence

import torch

def _accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 accumulation like the kernels; float64 stays float64 (the tests' oracle)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


__all__ = [
    "cross_attn_scores",
    "aggregation_weights",
    "weighted_aggregate",
    "write_compressed_kv",
    "write_compressed_kv_layers",
]


def cross_attn_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: Optional[float] = None,
    kv_mask: Optional[torch.Tensor] = None,
    q_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention probabilities of every query on every key, float32 `(B, H, T, N)`.

    A query that sees no key gets an all-zero row (not NaN).
    """
    batch_size, num_heads, _, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    # GQA: query head h reads kv head h // (H / Hkv).
    dtype = _accumulate_dtype(q)
    k = k.to(dtype)
    if num_heads != num_kv_heads:
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
    logits = torch.matmul(q.to(dtype), k.transpose(-1, -2))  # (B, H, T, N)
    if scale != 1.0:  # the backward passes pre-scaled queries: skip a pass over the logits
        logits = logits * scale
    if kv_mask is None and q_pos is None:  # every key visible: no mask to build or apply
        return torch.softmax(logits, dim=-1)

    visible = torch.ones(batch_size, 1, 1, num_keys, dtype=torch.bool, device=q.device)
    if kv_mask is not None:
        visible = visible & kv_mask[:, None, None, :]
    if q_pos is not None:
        key_idx = torch.arange(num_keys, device=q.device)
        visible = visible & (key_idx[None, None, None, :] <= q_pos[:, None, :, None])
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # Rows with no visible key are all -inf and softmax gives NaN there.
    return torch.where(visible.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))


def cross_attn_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: Optional[float] = None,
    q_mask: Optional[torch.Tensor] = None,
    kv_mask: Optional[torch.Tensor] = None,
    q_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean text-to-image attention per key, float32 `(B, N)`.

    Args:
        q: `(B, H, T, D)` queries of the instruction tokens.
        k: `(B, Hkv, N, D)` keys; H % Hkv == 0.
        scale: softmax scale, defaults to D ** -0.5.
        q_mask: bool `(B, T)`, True = real text token.
        kv_mask: bool `(B, N)`, True = valid key.
        q_pos: int64 `(B, T)`, index in k of each query (key n visible iff n <= q_pos).

    score[b, n] is the attention probability of key n averaged over all heads and valid
    queries. A row with no valid query gets the uniform distribution over valid keys; a row
    with no valid key gets zeros.
    """
    batch_size, num_heads, num_queries, _ = q.shape
    num_keys = k.shape[2]
    probs = cross_attn_probs(q, k, scale=scale, kv_mask=kv_mask, q_pos=q_pos)
    dtype = probs.dtype

    if q_mask is None:
        q_valid = torch.ones(batch_size, num_queries, dtype=dtype, device=q.device)
    else:
        q_valid = q_mask.to(dtype)
    count = q_valid.sum(dim=1) * num_heads  # (B,)
    summed = (probs * q_valid[:, None, :, None]).sum(dim=(1, 2))  # (B, N)
    scores = summed / count.clamp_min(1.0)[:, None]

    if kv_mask is None:
        kv_valid = torch.ones(batch_size, num_keys, dtype=dtype, device=q.device)
    else:
        kv_valid = kv_mask.to(dtype)
    uniform = kv_valid / kv_valid.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.where(count[:, None] > 0, scores, uniform)


def aggregation_weights(
    logits: torch.Tensor,
    importance: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Merge weights, float32 `(B, K, N)`: softmax over valid n of logits + log(importance).

    Tokens with zero importance or mask False get exactly zero weight; a row with no
    such token left (or whose valid logits are all -inf) gets all zeros. Computed in
    float32, or float64 for float64 logits.
    """
    dtype = _accumulate_dtype(logits)
    z = logits.to(dtype)  # (B, K, N)
    valid = torch.ones(z.shape[0], z.shape[2], dtype=torch.bool, device=z.device)
    if importance is not None:
        valid = valid & (importance > 0)
        z = z + torch.log(importance.to(dtype).clamp_min(torch.finfo(dtype).tiny))[:, None, :]
    if mask is not None:
        valid = valid & mask
    z = z.masked_fill(~valid[:, None, :], float("-inf"))
    # Softmax of an all -inf row is NaN (and so is its gradient): such rows give zeros.
    alive = (z > float("-inf")).any(dim=-1, keepdim=True)  # (B, K, 1)
    weights = torch.softmax(torch.where(alive, z, torch.zeros_like(z)), dim=-1)
    return torch.where(alive, weights, torch.zeros_like(weights))


def weighted_aggregate(
    x: torch.Tensor,
    logits: torch.Tensor,
    importance: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """K weighted sums of the N tokens of x, `(B, K, C)` in the dtype of x.

    Args:
        x: `(B, N, C)` tokens.
        logits: `(B, K, N)` merge logits.
        importance: float32 `(B, N)` >= 0, biases the softmax by log(importance).
        mask: bool `(B, N)`, True = token may be merged.
    """
    weights = aggregation_weights(logits, importance, mask)  # (B, K, N)
    return torch.matmul(weights, x.to(weights.dtype)).to(x.dtype)


def write_compressed_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
    index: Optional[torch.Tensor] = None,
) -> None:
    """Write K compressed entries per batch row into a paged KV cache, in place.

    Args:
        key_cache, value_cache: `(num_blocks, block_size, Hkv, D)`, any strides. A Hugging
            Face per-layer cache `(B, Hkv, L, D)` is passed as `.transpose(1, 2)`
            (then slot = b * L + position).
        key, value: `(B, Hkv, N, D)` one layer's keys/values as attention saw them.
        slot_mapping: int64 `(B, K)`, flat destination slot of each entry, -1 = skip.
        weights: float32 `(B, K, N)`: entry k = sum_n weights[b, k, n] * key[b, :, n, :].
        index: int64 `(B, K)`: entry k copies source position index[b, k].
    """
    if (weights is None) == (index is None):
        raise ValueError("write_compressed_kv: pass exactly one of `weights` or `index`")
    batch_size, num_kv_heads, _, head_dim = key.shape
    block_size = key_cache.shape[1]

    if index is not None:
        # Skipped entries may carry any index; clamp so the gather stays in range.
        safe_index = torch.where(slot_mapping >= 0, index, torch.zeros_like(index))
        gather_idx = safe_index[:, None, :, None].expand(batch_size, num_kv_heads, -1, head_dim)
        new_keys = torch.gather(key, 2, gather_idx)  # (B, Hkv, K, D)
        new_values = torch.gather(value, 2, gather_idx)
    else:
        dtype = torch.promote_types(_accumulate_dtype(key), weights.dtype)
        new_keys = torch.einsum("bkn,bhnd->bhkd", weights.to(dtype), key.to(dtype))
        new_values = torch.einsum("bkn,bhnd->bhkd", weights.to(dtype), value.to(dtype))

    write = slot_mapping >= 0  # (B, K)
    slots = slot_mapping[write]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = new_keys.transpose(1, 2)[write].to(key_cache.dtype)
    value_cache[blocks, offsets] = new_values.transpose(1, 2)[write].to(value_cache.dtype)


def write_compressed_kv_layers(
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
    index: Optional[torch.Tensor] = None,
) -> None:
    """`write_compressed_kv` for every layer l: `key_caches[l]`, `value_caches[l]` from `keys[l]`, `values[l]`,
    with the same `slot_mapping` and `weights` / `index` for all layers, in place."""
    if not (len(key_caches) == len(value_caches) == len(keys) == len(values)):
        raise ValueError("write_compressed_kv_layers: key_caches, value_caches, keys and values must hold one tensor per layer")
    for key_cache, value_cache, key, value in zip(key_caches, value_caches, keys, values):
        write_compressed_kv(key_cache, value_cache, key, value, slot_mapping, weights=weights, index=index)
