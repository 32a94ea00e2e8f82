"""Argument checks of the ops' fake (meta) implementations: the contract of csrc/checks.h, written for tracing.

The C++ kernels check every call that runs (csrc/checks.h: ValueError for shapes, devices and values, TypeError for
dtypes); under torch.compile / FakeTensor the fakes run instead, with these checks, so that a bad call fails the same
way with the same message in both. `torch._check_value` / `torch._check_type` accept symbolic shapes.
"""

import math

import torch

# x, logits, key, value and caches: the three kernel dtypes, plus float64 (the gradcheck path).
KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SCORE_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether t has the shape, strides and dtype of ref (csrc/checks.h's same_layout)."""
    return t.shape == ref.shape and t.stride() == ref.stride() and t.dtype == ref.dtype


def shape(t: torch.Tensor) -> list:
    return list(t.shape)


def require_tensor(t, op: str, name: str, layout: str) -> None:
    """Python values that are not tensors never reach the dispatcher with a message naming the argument otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")


def check_rank(t: torch.Tensor, rank: int, op: str, name: str, layout: str) -> None:
    require_tensor(t, op, name, layout)
    torch._check_value(
        t.dim() == rank, lambda: f"{op}: {name} must be a {rank}-D tensor {layout}, got shape {shape(t)}"
    )


def check_dtype_in(t: torch.Tensor, dtypes: tuple, op: str, name: str) -> None:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    allowed = ", ".join(names[:-1]) + f" or {names[-1]}"
    torch._check_type(t.dtype in dtypes, lambda: f"{op}: {name} must be {allowed}, got {t.dtype}")


def check_dtype(t: torch.Tensor, dtype: torch.dtype, op: str, name: str) -> None:
    torch._check_type(t.dtype == dtype, lambda: f"{op}: {name} must have dtype {dtype}, got {t.dtype}")


def check_same_dtype(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    torch._check_type(
        t.dtype == ref.dtype, lambda: f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}"
    )


def check_same_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    torch._check_value(
        t.device == ref.device,
        lambda: f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}",
    )


def check_shape(t: torch.Tensor, expected, op: str, name: str, layout: str) -> None:
    torch._check_value(
        tuple(t.shape) == tuple(expected),
        lambda: f"{op}: {name} must have shape {layout} = {list(expected)}, got {shape(t)}",
    )


def check_optional_2d(t, rows, cols, dtype: torch.dtype, ref: torch.Tensor, op: str, name: str, layout: str,
                      ref_name: str) -> None:  # fmt: skip
    """An optional per-row tensor such as a mask: shape [rows, cols], `dtype`, on ref's device."""
    if t is None:
        return
    check_rank(t, 2, op, name, layout)
    check_shape(t, (rows, cols), op, name, layout)
    check_dtype(t, dtype, op, name)
    check_same_device(t, ref, op, name, ref_name)


# --------------------------------------------------------------------------------------------- per op
def check_cross_attn_scores_args(q, k, scale, q_mask, kv_mask, q_pos) -> None:
    op = "cross_attn_scores"
    check_rank(q, 4, op, "q", "[B, H, T, D]")
    check_rank(k, 4, op, "k", "[B, Hkv, N, D]")
    check_dtype_in(q, SCORE_FLOATS, op, "q")
    check_same_dtype(k, q, op, "k", "q")
    check_same_device(k, q, op, "k", "q")
    batch, heads, queries, dim = q.shape
    torch._check_value(
        k.shape[0] == batch, lambda: f"{op}: k must have batch size B = {batch} like q, got k {shape(k)}"
    )
    torch._check_value(k.shape[3] == dim, lambda: f"{op}: k must have head_dim D = {dim} like q, got k {shape(k)}")
    torch._check_value(1 <= dim <= 256, lambda: f"{op}: head_dim D must be in [1, 256], got {dim}")
    torch._check_value(
        k.shape[1] >= 1 and heads % k.shape[1] == 0,
        lambda: f"{op}: the number of query heads H = {heads} must be a multiple of the number of kv heads Hkv = "
        f"{k.shape[1]}",
    )
    torch._check_value(
        scale is None or (scale > 0 and math.isfinite(scale)),  # inf: every probability NaN
        lambda: f"{op}: scale must be positive and finite, got {scale}",
    )
    check_optional_2d(q_mask, batch, queries, torch.bool, q, op, "q_mask", "[B, T]", "q")
    check_optional_2d(kv_mask, batch, k.shape[2], torch.bool, q, op, "kv_mask", "[B, N]", "q")
    check_optional_2d(q_pos, batch, queries, torch.int64, q, op, "q_pos", "[B, T]", "q")


def check_merge_args(logits, importance, mask, op: str, ref: torch.Tensor, ref_name: str) -> None:
    """logits [B, K, N], importance float32/float64 [B, N], mask bool [B, N], on ref's device."""
    check_rank(logits, 3, op, "logits", "[B, K, N]")
    check_dtype_in(logits, KERNEL_FLOATS, op, "logits")
    if ref is not logits:
        check_same_device(logits, ref, op, "logits", ref_name)
    batch, tokens = logits.shape[0], logits.shape[2]
    if importance is not None:
        check_rank(importance, 2, op, "importance", "[B, N]")
        check_shape(importance, (batch, tokens), op, "importance", "[B, N]")
        torch._check_type(
            importance.dtype in (torch.float32, torch.float64),
            lambda: f"{op}: importance must be float32 (or float64), got {importance.dtype}",
        )
        check_same_device(importance, ref, op, "importance", ref_name)
    if mask is not None:
        check_rank(mask, 2, op, "mask", "[B, N]")
        check_shape(mask, (batch, tokens), op, "mask", "[B, N]")
        check_dtype(mask, torch.bool, op, "mask")
        check_same_device(mask, ref, op, "mask", ref_name)


def check_weighted_aggregate_args(x, logits, importance, mask) -> None:
    op = "weighted_aggregate"
    check_rank(x, 3, op, "x", "[B, N, C]")
    check_rank(logits, 3, op, "logits", "[B, K, N]")
    check_dtype_in(x, KERNEL_FLOATS, op, "x")
    batch, tokens, _ = x.shape
    torch._check_value(
        logits.shape[0] == batch and logits.shape[2] == tokens,
        lambda: f"{op}: logits must have shape [B, K, N] with B = {batch} and N = {tokens} from x {shape(x)}, got "
        f"{shape(logits)}",
    )
    check_merge_args(logits, importance, mask, op, x, "x")


def check_write_compressed_kv_args(key_cache, value_cache, key, value, slot_mapping, weights, index) -> None:
    """The structural checks (the data-dependent ones are `kv_write.check_slots_and_indices`; the memory-overlap
    ones need real storage and exist in C++ only)."""
    op = "write_compressed_kv"
    check_rank(key, 4, op, "key", "[B, Hkv, N, D]")
    check_rank(value, 4, op, "value", "[B, Hkv, N, D]")
    check_rank(key_cache, 4, op, "key_cache", "[num_blocks, block_size, Hkv, D]")
    check_rank(value_cache, 4, op, "value_cache", "[num_blocks, block_size, Hkv, D]")
    check_dtype_in(key, KERNEL_FLOATS, op, "key")
    check_dtype_in(key_cache, KERNEL_FLOATS, op, "key_cache")
    check_same_dtype(value, key, op, "value", "key")
    check_same_dtype(value_cache, key_cache, op, "value_cache", "key_cache")
    check_shape(value, key.shape, op, "value", "[B, Hkv, N, D] like key")
    batch, kv_heads, tokens, dim = key.shape
    torch._check_value(
        key_cache.shape[2] == kv_heads and key_cache.shape[3] == dim,
        lambda: f"{op}: key_cache must have shape [num_blocks, block_size, Hkv, D] with Hkv = {kv_heads} and D = "
        f"{dim} from key {shape(key)}, got {shape(key_cache)}",
    )
    check_shape(value_cache, key_cache.shape, op, "value_cache", "[num_blocks, block_size, Hkv, D] like key_cache")
    check_same_device(value, key, op, "value", "key")
    check_same_device(key_cache, key, op, "key_cache", "key")
    check_same_device(value_cache, key, op, "value_cache", "key")

    check_rank(slot_mapping, 2, op, "slot_mapping", "[B, K]")
    torch._check_value(
        slot_mapping.shape[0] == batch,
        lambda: f"{op}: slot_mapping must have shape [B, K] with B = {batch} from key, got {shape(slot_mapping)}",
    )
    check_dtype(slot_mapping, torch.int64, op, "slot_mapping")
    check_same_device(slot_mapping, key, op, "slot_mapping", "key")
    entries = slot_mapping.shape[1]

    torch._check_value(
        (weights is None) != (index is None),
        lambda: f"{op}: pass exactly one of weights [B, K, N] or index [B, K], got "
        f"{'neither' if weights is None else 'both'}",
    )
    if index is not None:
        check_rank(index, 2, op, "index", "[B, K]")
        check_shape(index, (batch, entries), op, "index", "[B, K] like slot_mapping")
        check_dtype(index, torch.int64, op, "index")
        check_same_device(index, key, op, "index", "key")
    else:
        check_rank(weights, 3, op, "weights", "[B, K, N]")
        check_shape(weights, (batch, entries, tokens), op, "weights", "[B, K, N]")
        check_dtype(weights, torch.float32, op, "weights")
        check_same_device(weights, key, op, "weights", "key")


def check_write_compressed_kv_layers_args(key_caches, value_caches, keys, values, slot_mapping, weights, index) -> None:
    """write_compressed_kv's checks for every layer (prefixed with the layer), and the layers' common layout."""
    op = "write_compressed_kv_layers"
    lists = {"key_caches": key_caches, "value_caches": value_caches, "keys": keys, "values": values}
    for name, tensors in lists.items():
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(f"{op}: {name} must be a list of tensors (one per layer), got {type(tensors).__name__}")
    layers = len(keys)
    torch._check_value(layers > 0, lambda: f"{op}: keys must hold at least one layer, got an empty list")
    torch._check_value(
        len(values) == layers and len(key_caches) == layers and len(value_caches) == layers,
        lambda: f"{op}: key_caches, value_caches, keys and values must hold one tensor per layer, got "
        f"{len(key_caches)}, {len(value_caches)}, {len(keys)} and {len(values)}",
    )
    for layer in range(layers):
        try:
            check_write_compressed_kv_args(
                key_caches[layer], value_caches[layer], keys[layer], values[layer], slot_mapping, weights, index
            )
        except (TypeError, ValueError) as error:
            raise type(error)(f"{op}: layer {layer}: {error}") from None
    for name, tensors in lists.items():
        first = tensors[0]
        for layer in range(1, layers):
            t = tensors[layer]
            torch._check_value(
                same_layout(t, first),
                lambda: f"{op}: {name}[{layer}] must have the shape, strides and dtype of {name}[0] ({shape(first)}, "
                f"strides {list(first.stride())}, {first.dtype}), got {shape(t)}, strides {list(t.stride())}, "
                f"{t.dtype}; call write_compressed_kv per layer for layers that differ",
            )
