"""ETC's compression sub-forward inside vLLM's language-model pass.

A request's prompt holds M compression-token slots per image and no visual tokens (`processing.py`). In the step
that computes an image's slots, the language model runs layer by layer over this step's tokens as usual, and beside
them over a side sequence `[V ; Z]` per image (N visual tokens, then the M compression tokens) that attends, at every
layer, to the request's earlier tokens read back from vLLM's paged cache (prefix, text, earlier images' compression
tokens) and causally to itself: exactly the first pass of etc-ext's segmented prefill (`etc_ext.compress`). Before
each layer, the compression-token rows of the main pass take the side sequence's hidden states for them, so the K/V
that vLLM writes to their cache slots are the compressed image's, and text after them (this step or any later one,
and any later request that hits them in the prefix cache) attends to prefix + Z + text only: the bottleneck mask.

Written for vLLM's Llama decoder layers (LLaVA-1.5's language model): pre-norm attention with fused QKV, RoPE, MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .paged_kv import PagedKVReader


@dataclass
class PendingImage:
    """An image whose compression-token slots are in this step (recorded by the model's `embed_input_ids`).

    rows: int64 `[S]`, the rows of this step's flattened tokens that hold its scheduled compression tokens;
    first_index: which compression token (0..M-1) the first of them is (> 0 when a prefix-cache hit or an earlier
        chunk of a chunked prefill covered some);
    visual: `[N, H]` its visual tokens' embeddings (the projector's output).
    """

    rows: torch.Tensor
    first_index: int
    visual: torch.Tensor


@dataclass
class SideSequence:
    """Where each pending image's `[V ; Z]` rows are in the side hidden states, and what they attend to."""

    spans: list[tuple[int, int]]  # (start, end) of each image's N + M rows
    positions: torch.Tensor  # int64 [rows]: RoPE positions (V keeps its place before Z, as in etc-ext's prefill)
    context_slots: list[torch.Tensor]  # int64 [C_i]: cache slots of the tokens before image i's first Z
    main_rows: torch.Tensor  # int64: rows of this step holding compression tokens ...
    side_rows: torch.Tensor  # ... and the side rows whose hidden states they take


def plan_side_sequence(pending: list[PendingImage], positions: torch.Tensor, attn_metadata, block_size: int,
                       num_visual: int, num_compression: int) -> SideSequence:  # fmt: skip
    """Lays out the side rows and finds each image's context in the paged cache from the step's attention metadata
    (`query_start_loc`, `seq_lens`, `block_table`)."""
    query_start = attn_metadata.query_start_loc.cpu()
    seq_lens = attn_metadata.seq_lens.cpu()
    block_table = attn_metadata.block_table
    spans, side_positions, context_slots, main_rows, side_rows = [], [], [], [], []
    start = 0
    for image in pending:
        first_row = int(image.rows[0])
        request = int(torch.searchsorted(query_start, first_row, right=True)) - 1
        computed_before_step = int(seq_lens[request]) - int(query_start[request + 1] - query_start[request])
        context = computed_before_step + first_row - int(query_start[request]) - image.first_index
        tokens = torch.arange(context, dtype=torch.int64)
        context_slots.append(block_table[request, tokens // block_size].to(torch.int64).cpu() * block_size
                             + tokens % block_size)  # fmt: skip
        first_z_position = int(positions[first_row]) - image.first_index
        side_positions.append(torch.arange(first_z_position - num_visual, first_z_position + num_compression))
        spans.append((start, start + num_visual + num_compression))
        main_rows.append(image.rows.cpu())
        side_rows.append(start + num_visual + image.first_index + torch.arange(image.rows.numel()))
        start += num_visual + num_compression
    device = positions.device
    return SideSequence(spans, torch.cat(side_positions).to(device), context_slots,
                        torch.cat(main_rows).to(device), torch.cat(side_rows).to(device))  # fmt: skip


def initial_side_hidden(pending: list[PendingImage], compression_tokens: torch.Tensor) -> torch.Tensor:
    """Layer-0 inputs of the side rows: each image's visual embeddings, then the M compression-token embeddings."""
    parts = []
    for image in pending:
        parts += [image.visual.to(compression_tokens.dtype), compression_tokens]
    return torch.cat(parts)


def context_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, scale: float):
    """Attention of `q [Q, H, D]` over `k, v [C + Q, Hkv, D]` (C context keys, then the queries' own keys): every
    query sees the context and its own row and the earlier ones. Returns `[Q, H * D]`."""
    num_queries, heads, _ = q.shape
    visible = torch.ones(num_queries, context + num_queries, dtype=torch.bool, device=q.device)
    visible[:, context:] = torch.ones(num_queries, num_queries, dtype=torch.bool, device=q.device).tril()
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1) if group > 1 else k
    v = v.repeat_interleave(group, dim=1) if group > 1 else v
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=visible, scale=scale)  # fmt: skip
    return out.transpose(0, 1).reshape(num_queries, -1)


class CompressionSubForward:
    """Runs the side sequences through vLLM's Llama decoder layers, one layer at a time, after the main pass of that
    layer has written this step's K/V (so every context token of every image is in the cache by then)."""

    def __init__(self):
        self._readers: dict[tuple, PagedKVReader] = {}

    def reader(self, attention_layer, kv_cache: torch.Tensor, num_kv_heads: int, head_size: int) -> PagedKVReader:
        key = (type(attention_layer.impl).__name__, getattr(attention_layer, "isa", None), kv_cache.dtype,
               tuple(kv_cache.shape[1:]))  # fmt: skip
        if key not in self._readers:
            self._readers[key] = PagedKVReader(attention_layer, kv_cache, num_kv_heads, head_size)
        return self._readers[key]

    def layer(self, decoder_layer, hidden: torch.Tensor, side: SideSequence, kv_cache: torch.Tensor,
              attention_layer) -> torch.Tensor:  # fmt: skip
        """One decoder layer on the side rows `hidden [rows, H]` (their inputs to this layer); returns its outputs."""
        attn = decoder_layer.self_attn
        heads, kv_heads, head_size = attn.num_heads, attn.num_kv_heads, attn.head_dim
        reader = self.reader(attention_layer, kv_cache, kv_heads, head_size)
        residual = hidden
        x = decoder_layer.input_layernorm(hidden)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(side.positions, q, k)
        out = torch.empty_like(q)
        for (start, end), slots in zip(side.spans, side.context_slots):
            context_k, context_v = reader.read(kv_cache, slots.to(kv_cache.device))
            keys = torch.cat([context_k.to(k.dtype), k[start:end].reshape(-1, kv_heads, head_size)])
            values = torch.cat([context_v.to(v.dtype), v[start:end].reshape(-1, kv_heads, head_size)])
            out[start:end] = context_causal_attention(q[start:end].reshape(-1, heads, head_size), keys, values,
                                                      slots.numel(), attn.scaling)  # fmt: skip
        attention_output, _ = attn.o_proj(out)
        hidden = residual + attention_output
        return hidden + decoder_layer.mlp(decoder_layer.post_attention_layernorm(hidden))


def override_rows(hidden: torch.Tensor, residual: torch.Tensor | None, side: SideSequence, side_hidden: torch.Tensor):
    """Make the main pass's compression-token rows carry the side sequence's hidden states: vLLM's Llama layers take
    `(hidden, residual)` and add them in their first norm, so the rows get the side states and a zero residual."""
    hidden[side.main_rows] = side_hidden[side.side_rows].to(hidden.dtype)
    if residual is not None:
        residual[side.main_rows] = 0
