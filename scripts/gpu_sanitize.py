"""A short run of every CUDA kernel for compute-sanitizer (memcheck, racecheck): odd shapes, masks, GQA,
non-contiguous inputs, partial tiles, skipped and out-of-range slots; each result checked against the reference.

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize.py
    compute-sanitizer --tool racecheck python scripts/gpu_sanitize.py

Small on purpose: the sanitizer slows every kernel launch (torch's own too) by orders of magnitude.
"""

import sys

import torch

from etc_ext import ops, reference


def check(name, got, want, tol):
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    status = "ok" if err <= tol else "FAIL"
    print(f"{status:<5}{name:<58} max abs err {err:.2e}", flush=True)
    return status == "ok"


def scores_cases(device):
    ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for batch, heads, kv_heads, queries, keys, dim in ((2, 4, 2, 5, 77, 33), (1, 3, 3, 1, 1, 1), (2, 8, 2, 9, 130, 128), (1, 32, 32, 70, 600, 64)):
            q = torch.randn(batch, queries, heads, dim, device=device, dtype=dtype).transpose(1, 2)  # non-contiguous
            # keys with an odd row stride: the tensor-core kernel's element-wise (not vector) loads
            k = torch.randn(batch, kv_heads, keys, dim + 1, device=device, dtype=dtype)[..., :dim]
            q_mask = torch.rand(batch, queries, device=device) > 0.3
            kv_mask = torch.rand(batch, keys, device=device) > 0.2
            q_pos = torch.randint(0, keys, (batch, queries), device=device)
            got = ops.cross_attn_scores(q, k, q_mask=q_mask, kv_mask=kv_mask, q_pos=q_pos)
            want = reference.cross_attn_scores(q.double(), k.double(), q_mask=q_mask, kv_mask=kv_mask, q_pos=q_pos)
            ok &= check(f"cross_attn_scores {dtype} {tuple(q.shape)} x {tuple(k.shape)}", got, want, 1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.randn(2, 8, 33, 128, device=device, dtype=dtype)
        k = torch.randn(2, 4, 200, 128, device=device, dtype=dtype)
        got, want = ops.cross_attn_scores(q, k), reference.cross_attn_scores(q.double(), k.double())
        ok &= check(f"cross_attn_scores {dtype} contiguous {tuple(q.shape)} x {tuple(k.shape)}", got, want, 1e-4)
    q = torch.randn(2, 4, 3, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 40, 16, device=device, requires_grad=True)
    grad = torch.randn(2, 40, device=device)
    gq, gk = torch.autograd.grad(ops.cross_attn_scores(q, k), (q, k), grad)
    wq, wk = torch.autograd.grad(reference.cross_attn_scores(q, k), (q, k), grad)
    ok &= check("cross_attn_scores backward dq", gq, wq, 1e-4) & check("cross_attn_scores backward dk", gk, wk, 1e-4)
    return ok


def aggregate_cases(device):
    ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for batch, tokens, channels, rows in ((2, 77, 33, 3), (1, 1, 1, 1), (2, 130, 520, 16)):
            x = torch.randn(batch, channels, tokens, device=device, dtype=dtype).transpose(1, 2)  # non-contiguous
            logits = torch.randn(batch, rows, tokens, device=device)
            importance = torch.rand(batch, tokens, device=device) * (torch.rand(batch, tokens, device=device) > 0.2)
            mask = torch.rand(batch, tokens, device=device) > 0.1
            got = ops.weighted_aggregate(x, logits, importance, mask)
            want = reference.weighted_aggregate(x.double(), logits.double(), importance.double(), mask)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            ok &= check(f"weighted_aggregate {dtype} x{tuple(x.shape)} K={rows}", got, want, tol)
    return ok


def write_cases(device):
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        batch, kv_heads, tokens, dim, entries, blocks, block_size = 2, 3, 50, 72, 5, 7, 3
        key = torch.randn(batch, kv_heads, tokens, dim, device=device, dtype=dtype)
        value = torch.randn(batch, kv_heads, tokens, dim, device=device, dtype=dtype)
        slots = torch.randperm(blocks * block_size, device=device)[: batch * entries].view(batch, entries)
        slots[0, 1] = -1  # skipped
        index = torch.randint(0, tokens, (batch, entries), device=device)
        weights = torch.randn(batch, entries, tokens, device=device).softmax(-1)
        for form in ("index", "weights"):
            cache_k, cache_v = (torch.randn(blocks, block_size, kv_heads, dim, device=device, dtype=dtype) for _ in "kv")
            want_k, want_v = cache_k.clone(), cache_v.clone()  # every slot the op must not touch stays as is
            extra = {"index": index} if form == "index" else {"weights": weights}
            ops.write_compressed_kv(cache_k, cache_v, key, value, slots, **extra)
            reference.write_compressed_kv(want_k, want_v, key, value, slots, **extra)
            tol = 0 if form == "index" else (1e-4 if dtype == torch.float32 else 2e-2)
            ok &= check(f"write_compressed_kv {form} {dtype} keys", cache_k, want_k, tol)
            ok &= check(f"write_compressed_kv {form} {dtype} values", cache_v, want_v, tol)
        bad = slots.clone()
        bad[1, 0] = blocks * block_size + 5  # out of range: skipped with check=False, never written
        cache_k = torch.randn(blocks, block_size, kv_heads, dim, device=device, dtype=dtype)
        cache_v = cache_k.clone()
        want_k, want_v = cache_k.clone(), cache_v.clone()
        ops.write_compressed_kv(cache_k, cache_v, key, value, bad, index=index, check=False)
        bad[1, 0] = -1  # what the kernel must have done: skip it
        reference.write_compressed_kv(want_k, want_v, key, value, bad, index=index)
        ok &= check(f"write_compressed_kv out-of-range slot skipped {dtype}", cache_k, want_k, 0)
    return ok


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    torch.manual_seed(0)
    ok = scores_cases(device) & aggregate_cases(device) & write_cases(device)
    if device == "cuda":
        torch.cuda.synchronize()
    print("all ok" if ok else "FAILURES", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
