"""`write_compressed_kv` and `write_compressed_kv_layers` (the same for every layer of a cache in one call): the ops'
wrappers (with the data-dependent checks of slots and indices) and their fake (meta) implementations. The ops write
in place and have no autograd (they are not differentiable).

The kernels are csrc/cpu/write_compressed_kv.cpp and csrc/cuda/write_compressed_kv.cu, their schema and checks csrc/torch_bindings.cpp
(structure, and memory: no overlap between the written and the read tensors); the pure-PyTorch reference is
`etc_ext.reference.write_compressed_kv`.
"""

from typing import Optional, Sequence

import torch

from . import checks
from .checks import (
    KERNEL_FLOATS, check_dtype, check_dtype_in, check_rank, check_same_device, check_same_dtype, check_shape,
    same_layout, shape,
)

__all__ = ["write_compressed_kv", "write_compressed_kv_layers"]


def _first_bad(bad: torch.Tensor) -> tuple:
    """(b, k) of the first True entry of a [B, K] bool tensor."""
    return tuple(int(i) for i in bad.nonzero()[0])


def _check_slots_and_indices(key_cache, key, slot_mapping, index) -> None:
    """Data-dependent checks, before anything is written: every slot is -1 or in
    [0, num_blocks * block_size), no slot is written twice, every index of a written entry is
    in [0, N). One device-to-host sync in the common (valid) case."""
    op = "write_compressed_kv"
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    tokens = key.shape[2]
    bad_slot = (slot_mapping < -1) | (slot_mapping >= num_slots)  # (B, K)
    writes = slot_mapping >= 0
    flags = [bad_slot.any()]
    if index is not None:
        bad_index = writes & ((index < 0) | (index >= tokens))
        flags.append(bad_index.any())
    written = slot_mapping[writes]
    any_slot_bad, *rest = torch.stack(flags).tolist()
    if any_slot_bad:
        b, k = _first_bad(bad_slot)
        raise ValueError(
            f"{op}: slot_mapping[{b}, {k}] = {int(slot_mapping[b, k])} is out of range: slots must be -1 (skip) "
            f"or in [0, num_blocks * block_size) = [0, {num_slots}) for key_cache {checks.shape(key_cache)}"
        )
    if rest and rest[0]:
        b, k = _first_bad(bad_index)
        raise ValueError(
            f"{op}: index[{b}, {k}] = {int(index[b, k])} is out of range [0, N) = [0, {tokens}) for key "
            f"{checks.shape(key)} (slot_mapping[{b}, {k}] = {int(slot_mapping[b, k])})"
        )
    if written.numel() > 1 and torch.unique(written).numel() != written.numel():
        values, counts = torch.unique(written, return_counts=True)
        raise ValueError(f"{op}: slot_mapping writes slot {int(values[counts > 1][0])} more than once")


def write_compressed_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
    index: Optional[torch.Tensor] = None,
    check: bool = True,
) -> None:
    """Write K compressed entries per batch row of one layer into a paged KV cache, in place.

    Args:
        key_cache, value_cache: `(num_blocks, block_size, Hkv, D)`, any strides and a dtype
            of their own (the op converts). A vLLM-style paged cache as is, or a Hugging Face
            per-layer cache `(B, Hkv, L, D)` passed as `.transpose(1, 2)` (slot = b * L + position).
        key, value: `(B, Hkv, N, D)` the layer's keys/values as attention saw them (after RoPE).
        slot_mapping: int64 `(B, K)`, flat destination slot of each entry, -1 = skip.
        weights: float32 `(B, K, N)`: entry k = sum_n weights[b, k, n] * key[b, :, n, :]
            (fp32 accumulation), the merging compressors.
        index: int64 `(B, K)`: entry k copies source position index[b, k] (the ETC path:
            keep the prefix and compression tokens). Exactly one of weights / index.
        check: validate the slots and indices before writing (one device-to-host sync):
            out-of-range values or a slot written twice raise ValueError and the caches stay
            bit-for-bit unchanged. check=False skips that (CUDA graphs, or a caller that
            validated once for all layers); the kernels then skip out-of-range entries rather
            than write out of bounds. Under torch.compile the data-dependent check is skipped.

    Nothing outside the given slots is written. Memory shared by the written caches, or by a cache and key, value
    or weights, is refused (ValueError), as are tensors that require grad while grad mode is on: the op is not
    differentiable.
    """
    if check and not torch.compiler.is_compiling():
        # The value checks read the shapes, so the structure is checked first, with the fake's checks (the kernel
        # checks it again, as it does for callers of torch.ops.etc_ext directly): nothing is written when either fails.
        check_write_compressed_kv_args(key_cache, value_cache, key, value, slot_mapping, weights, index)
        _check_slots_and_indices(key_cache, key, slot_mapping, index)
    torch.ops.etc_ext.write_compressed_kv.default(
        key_cache, value_cache, key, value, slot_mapping, weights=weights, index=index
    )


@torch.library.register_fake("etc_ext::write_compressed_kv")
def _write_compressed_kv_fake(key_cache, value_cache, key, value, slot_mapping, *, weights=None, index=None):
    check_write_compressed_kv_args(key_cache, value_cache, key, value, slot_mapping, weights, index)
    return None


def write_compressed_kv_layers(
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
    index: Optional[torch.Tensor] = None,
    check: bool = True,
) -> None:
    """:func:`write_compressed_kv` for the L layers of a cache in one call, in place: for every layer l,
    the entries of `keys[l]` / `values[l]` go to `key_caches[l]` / `value_caches[l]`, with one `slot_mapping` and
    `weights` / `index` for all layers (ETC's compaction after the prefill keeps the same positions in every layer).

    One launch (CUDA, up to 64 layers per launch) or one parallel loop over (layer, b, h) (CPU) instead of L calls,
    and the slots and indices are validated once. Every layer must have the shapes, strides and dtypes of layer 0
    (the caches of one model do); otherwise call :func:`write_compressed_kv` per layer. No layer's cache may share
    memory with another layer's cache, key or value. Errors of one layer name it ("layer 3: ...") and nothing is
    written.

    Args:
        key_caches, value_caches: L tensors `(num_blocks, block_size, Hkv, D)` (see write_compressed_kv).
        keys, values: L tensors `(B, Hkv, N, D)`.
        slot_mapping, weights, index, check: as in write_compressed_kv, shared by all layers.
    """
    key_caches, value_caches, keys, values = (list(t) for t in (key_caches, value_caches, keys, values))
    if check and not torch.compiler.is_compiling():
        check_write_compressed_kv_layers_args(key_caches, value_caches, keys, values, slot_mapping, weights, index)
        _check_slots_and_indices(key_caches[0], keys[0], slot_mapping, index)
    torch.ops.etc_ext.write_compressed_kv_layers.default(
        key_caches, value_caches, keys, values, slot_mapping, weights=weights, index=index
    )


@torch.library.register_fake("etc_ext::write_compressed_kv_layers")
def _write_compressed_kv_layers_fake(key_caches, value_caches, keys, values, slot_mapping, *, weights=None, index=None):
    check_write_compressed_kv_layers_args(key_caches, value_caches, keys, values, slot_mapping, weights, index)
    return None


# ============================================================================ argument checks (the fake's)
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
