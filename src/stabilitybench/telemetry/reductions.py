"""Sums of squares, norms and dot products of long vectors, accurate to float64, at float32 cost.

A float32 reduction over a million values loses up to four significant digits on the CPU: its
kernels add the values one after another into a few accumulators. Here every `CHUNK` consecutive
values are reduced in float32 (a short sum, good to ~1e-7) and the partial results are added in
float64: the extra work is one small vector of partials per reduction (n / 128 values). A chunked
norm costs what the plain one does; a dot product forms its products before summing them (about
twice a float32 `mv` on the CPU). Everything stays on the tensor's device: no host sync. Inputs
are float32 or float64 (half precisions are reduced in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK = 128
"""Values reduced in float32 before the partial results are added in float64."""

SHORT = 1 << 16
"""A CPU float32 norm of up to this many values is good to ~2e-6; longer CPU tensors are reduced
by chunks (a GPU's reductions are trees, accurate at any length)."""


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64, except on Apple's MPS backend, which has no float64 (there: float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _partial_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _slice_width(device: torch.device) -> int:
    """Columns multiplied at once by `row_dots`: on the CPU a slice whose products stay in the
    cache; elsewhere large slices (few kernel launches, a temporary of at most rows × 2²³)."""
    return 1 << 16 if device.type == "cpu" else 1 << 23


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over the last dimension: (..., n) → (...), in float64 (float32 on MPS)."""
    n = x.shape[-1]
    body = n - n % CHUNK
    acc = accumulation_dtype(x.device)
    tail = x[..., body:].to(acc)  # (..., n mod CHUNK): summed in float64 directly
    if not body:
        return (tail * tail).sum(-1)
    chunks = x[..., :body].unflatten(-1, (-1, CHUNK))  # (..., C, CHUNK): a view
    partial = torch.linalg.vector_norm(chunks, dim=-1, dtype=_partial_dtype(x)).to(acc)  # (..., C)
    total = (partial * partial).sum(-1)
    return total + (tail * tail).sum(-1) if body < n else total


def norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over the last dimension: (..., n) → (...), in float64 (float32 on MPS)."""
    return sum_squares(x).sqrt()


def row_dots(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """rows (r, n) · x (n,) → (r,), in float64 (float32 on MPS).

    The products are formed in float32 slice by slice (a temporary of r × min(n, slice) values,
    reused), each `CHUNK` of them summed in float32 and the partial sums added in float64.
    """
    n = x.shape[-1]
    body = n - n % CHUNK
    acc = accumulation_dtype(x.device)
    if not body:
        return (rows.to(acc) * x.to(acc)).sum(-1)
    width = min(body, _slice_width(x.device))
    products = torch.empty(rows.shape[0], width, dtype=_partial_dtype(x), device=x.device)
    parts = []  # (r, ·) float32 partial sums, in order
    for start in range(0, body, width):
        stop = min(start + width, body)
        out = torch.mul(rows[:, start:stop], x[start:stop], out=products[:, : stop - start])
        parts.append(out.unflatten(-1, (-1, CHUNK)).sum(-1))
    total = torch.cat(parts, dim=-1).to(acc).sum(-1)
    if body < n:
        total = total + (rows[:, body:].to(acc) * x[body:].to(acc)).sum(-1)
    return total


def tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor, (len(tensors),), in float64 (float32 on MPS).

    One fused `_foreach_norm` over the tensors a float32 reduction gets right (on a GPU: all of
    them); each CPU tensor longer than `SHORT` is reduced by chunks (`norm`).
    """
    acc = accumulation_dtype(tensors[0].device)
    long = [t.device.type == "cpu" and t.numel() > SHORT for t in tensors]
    short = [t for t, is_long in zip(tensors, long, strict=True) if not is_long]
    # half precisions are reduced in float32; float64 tensors keep float64
    dtype = None if any(t.dtype == torch.float64 for t in short) else torch.float32
    fused = iter(torch._foreach_norm(short, 2, dtype=dtype) if short else ())
    norms = [
        norm(t.reshape(-1)) if is_long else next(fused)
        for t, is_long in zip(tensors, long, strict=True)
    ]
    return torch.stack(norms).to(acc)
