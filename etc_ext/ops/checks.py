"""The helpers of the ops' fake (meta) argument checks: the contract of csrc/torch_bindings.cpp, written for tracing
(each op module, e.g. `scores`, holds its own op's checks, built from these).

The C++ entries check every call that runs (csrc/torch_bindings.cpp, with csrc/checks.h's helpers: ValueError for
shapes, devices and values, TypeError for dtypes); under torch.compile / FakeTensor the fakes run instead, with these checks, so that a bad call fails the same
way with the same message in both. `torch._check_value` / `torch._check_type` accept symbolic shapes.
"""

import torch

# x, logits, key, value and caches: the three kernel dtypes, plus float64 (the gradcheck path).
KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SCORE_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether t has the shape, strides and dtype of ref (csrc/torch_bindings.cpp's same_layout)."""
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
