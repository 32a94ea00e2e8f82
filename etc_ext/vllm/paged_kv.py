"""Reading K/V back from vLLM's paged KV cache, whatever layout the attention backend writes.

The compression sub-forward needs, at every layer, the keys and values of the tokens before an image (prefix, text,
earlier images' compression tokens), which vLLM has written to its paged cache (this step's tokens by the layer just
run, earlier steps' or prefix-cache hits before). The CPU backend packs each block in an ISA-specific way (its key
tiles are stored transposed, `[D, block_size]` per head), so rather than hard-coding one layout this module learns it
from the backend's own writer: it writes known values into a one-block scratch cache and records where each
(slot in block, head, channel) landed. The learnt map is exact for any layout that stays inside one block.
"""

from __future__ import annotations

import torch


_DIGIT_BITS = 4  # digits 1..16 per write: exact in fp32, bf16 and fp16 caches


class PagedKVReader:
    """Gathers `[T, Hkv, D]` keys and values of given slots from one layer's cache `[num_blocks, ...]`.

    Built from an attention layer whose `impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)` writes
    the cache (vLLM's CPU backend); one reader per (layer class, cache shape, dtype), the map learnt on first use.
    """

    def __init__(self, attention_layer, kv_cache: torch.Tensor, num_kv_heads: int, head_size: int):
        impl = getattr(attention_layer, "impl", None)
        if impl is None or not hasattr(impl, "do_kv_cache_update"):
            raise NotImplementedError(
                f"ETC's compression sub-forward reads K/V with the attention backend's cache writer; "
                f"{type(impl).__name__} has no do_kv_cache_update"
            )
        self.num_kv_heads, self.head_size = num_kv_heads, head_size
        self.block_size = self._block_size(kv_cache)
        self.key_index, self.value_index = self._learn_layout(attention_layer, impl, kv_cache)

    def _block_size(self, kv_cache: torch.Tensor) -> int:
        # vLLM's CPU cache: [num_blocks, Hkv, block_size, 2 * D]
        if kv_cache.dim() != 4 or kv_cache.shape[1] != self.num_kv_heads or kv_cache.shape[3] != 2 * self.head_size:
            raise NotImplementedError(
                f"ETC's compression sub-forward knows vLLM's CPU cache layout [num_blocks, {self.num_kv_heads}, "
                f"block_size, {2 * self.head_size}]; got a cache of shape {tuple(kv_cache.shape)} (another attention "
                "backend: not supported yet)"
            )
        return kv_cache.shape[2]

    @torch.no_grad()
    def _learn_layout(self, attention_layer, impl, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self._locate(attention_layer, impl, kv_cache, half) for half in ("key", "value"))

    def _locate(self, attention_layer, impl, kv_cache: torch.Tensor, half: str) -> torch.Tensor:
        """`[block_size, Hkv, D]`: the element of a block (flat index) holding each (slot, head, channel) of `half`."""
        bs, h, d = self.block_size, self.num_kv_heads, self.head_size
        ids = torch.arange(bs * h * d, dtype=torch.int64).view(bs, h, d)
        scratch = kv_cache.new_zeros((1, *kv_cache.shape[1:]))
        slots = torch.arange(bs, dtype=torch.int64)
        io_dtype = kv_cache.dtype if kv_cache.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        zeros = torch.zeros(bs, h, d, dtype=io_dtype)
        found = torch.zeros(scratch.numel(), dtype=torch.int64)
        written = torch.zeros(scratch.numel(), dtype=torch.bool)
        for shift in range(0, max(int(ids.max()).bit_length(), 1), _DIGIT_BITS):
            digit = ((ids >> shift) & ((1 << _DIGIT_BITS) - 1)) + 1  # 1..16: exact in every cache dtype; 0 = unwritten
            values = digit.to(io_dtype)
            scratch.zero_()
            key, value = (values, zeros) if half == "key" else (zeros, values)
            impl.do_kv_cache_update(attention_layer, key, value, scratch, slots)
            stored = scratch.reshape(-1).to(torch.float32).round().to(torch.int64)
            written |= stored > 0
            found += (stored - 1).clamp(min=0) << shift
        index = torch.full((bs * h * d,), -1, dtype=torch.int64)
        positions = torch.nonzero(written).squeeze(1)
        index[found[positions]] = positions
        if (index < 0).any() or positions.numel() != bs * h * d:
            raise NotImplementedError(
                f"could not learn where {type(impl).__name__} stores the {half}s in its KV cache (a write of "
                f"{bs * h * d} known values was not found back one to one): ETC's compression sub-forward cannot read it"
            )
        return index.view(bs, h, d)

    def read(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(key, value)`, each `[T, Hkv, D]` in the cache dtype, of the flat slots `slots` (int64 `[T]`)."""
        blocks = kv_cache.reshape(kv_cache.shape[0], -1)
        block, offset = slots // self.block_size, slots % self.block_size
        rows = block[:, None, None]
        return blocks[rows, self.key_index[offset]], blocks[rows, self.value_index[offset]]
