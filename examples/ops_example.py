"""A small end-to-end example of etc_ext's ops against the plain PyTorch path.

Scores the 576 visual tokens of a LLaVA-1.5-7B-shaped final layer by text-to-image
attention, as ETC's instruction-aware target and FastV-style pruning do, with the fused
op and with eager PyTorch (which materializes every attention probability), keeps the top
tokens, merges the rest into one importance-weighted token (weighted_aggregate) and writes
the compressed keys/values into a paged KV cache (write_compressed_kv). Prints agreement
and time of the fused ops and the PyTorch path.

    python examples/ops_example.py [--batch 2] [--text 40] [--device cpu]
"""

import argparse
import time

import torch

import etc_ext
from etc_ext import ops, reference


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text", type=int, default=40, help="instruction tokens T")
    parser.add_argument("--keep", type=int, default=16, help="visual tokens to keep")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    heads, head_dim, prefix, visual = 32, 128, 35, 576  # LLaVA-1.5-7B, one 336 px image
    seq = prefix + visual + args.text
    # Keys of the whole sequence and queries of the instruction, as a hooked layer sees them.
    k = torch.randn(args.batch, heads, seq, head_dim, device=args.device)
    q = torch.randn(args.batch, heads, args.text, head_dim, device=args.device)
    text_pos = torch.arange(prefix + visual, seq, device=args.device).expand(args.batch, -1)

    fused, fused_ms = timed(lambda: ops.cross_attn_scores(q, k, q_pos=text_pos), args.repeats)
    eager, eager_ms = timed(lambda: reference.cross_attn_scores(q, k, q_pos=text_pos), args.repeats)
    visual_scores = fused[:, prefix : prefix + visual]
    keep = visual_scores.topk(args.keep, dim=1).indices.sort(dim=1).values
    keep_eager = eager[:, prefix : prefix + visual].topk(args.keep, dim=1).indices.sort(dim=1).values

    # Merge the visual tokens that were not kept into one token, weighted by their scores.
    dropped = torch.ones_like(visual_scores, dtype=torch.bool).scatter(1, keep, False)
    x = k[:, 0, prefix : prefix + visual]  # (B, N, D): any per-token features
    logits = torch.zeros(args.batch, 1, visual, device=args.device)
    merged = ops.weighted_aggregate(x, logits, visual_scores, dropped)
    merged_ref = reference.weighted_aggregate(x, logits, visual_scores, dropped)

    # A paged cache (blocks of 16 slots) receives the kept entries of each row, in order.
    block_size = 16
    num_blocks = (args.batch * args.keep + block_size - 1) // block_size
    caches = [torch.zeros(num_blocks, block_size, heads, head_dim, device=args.device) for _ in range(4)]
    slots = torch.arange(args.batch * args.keep, device=args.device).view(args.batch, args.keep)
    key = k[:, :, prefix : prefix + visual]
    ops.write_compressed_kv(caches[0], caches[1], key, key, slots, index=keep)
    reference.write_compressed_kv(caches[2], caches[3], key, key, slots, index=keep)

    probs_bytes = args.batch * heads * args.text * seq * 4
    print(f"etc_ext {etc_ext.__version__} (CUDA kernels: {etc_ext.built_with_cuda()}), device {args.device}")
    print(f"q {list(q.shape)}, k {list(k.shape)}: {visual} visual tokens, instruction of {args.text} tokens")
    print(f"{'path':<28}{'ms':>10}{'extra memory':>16}")
    print(f"{'fused cross_attn_scores':<28}{fused_ms:>10.2f}{args.batch * seq * 4 / 2**10:>13.1f} KiB")
    print(f"{'eager PyTorch':<28}{eager_ms:>10.2f}{probs_bytes / 2**20:>13.1f} MiB")
    print(f"max |fused - eager| = {(fused - eager).abs().max().item():.2e}")
    print(f"top-{args.keep} visual tokens identical: {torch.equal(keep, keep_eager)}")
    print(f"speed-up: {eager_ms / fused_ms:.2f}x")
    print(f"merged {int(dropped[0].sum())} dropped tokens into 1: max |fused - PyTorch| = {(merged - merged_ref).abs().max().item():.2e}")
    print(f"paged KV cache write of {args.keep} kept entries per row identical: {torch.equal(caches[0], caches[2])}")


if __name__ == "__main__":
    main()
