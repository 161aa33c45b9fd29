"""Batch-invariant matrix products: each row of a product comes out the same, to the bit, whatever other
rows share its call. Exact replay (``GenerationRequest.deterministic``) needs this.

A CPU BLAS picks its kernel, and how it splits the rows among threads, by the shape of the call: on
this project's AMD EPYC (MKL, float32), a one-row product is a matrix-vector kernel, two or three rows
another kernel, and in a five-row call the last row comes out unlike the others. Rounded up to a multiple
of four rows (zero rows added), every row of every call comes out the same, at any position and any row
count (checked up to 2,100 rows). So a ``RowPlan`` fixes the shapes of the calls:

* ``RowPlan(m)``: every call's row count is a multiple of ``m``. Rounding a one-row decode up to four rows
  costs it about 1.7x in float32 on that CPU (a matrix-vector kernel is faster than a small product).
* ``RowPlan(64, tiled=True)``: every call has exactly 64 rows (longer inputs in slices): every row is then
  computed by the same kernel at the same shape, the last resort.

``probe_plan`` tries them in that order on the model's own products with random rows, and keeps the first
under which a row computed alone, and first or last in calls of other sizes, gives the same bits.
Products from llama.cpp blocks are invariant by construction (each output sums its blocks in one order,
whatever the rows) as long as every call goes to the block kernel: under any plan they run in slices of
at most 64 rows instead of handing long inputs to the dense kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

PROBE_ROWS = (2, 3, 5, 17, 65)


@dataclass(frozen=True)
class RowPlan:
    """The shapes a product's calls take (see the module docstring)."""

    multiple: int  # every call's row count is a multiple of this (zero rows added)
    tiled: bool = False  # every call has exactly ``multiple`` rows (longer inputs in slices)


PLANS = [*(RowPlan(m) for m in (4, 8, 16, 32, 64)), RowPlan(64, tiled=True)]

Product = Callable[[torch.Tensor], torch.Tensor]
_plan: ContextVar[RowPlan | None] = ContextVar("gllm_invariant_products", default=None)


def current_plan() -> RowPlan | None:
    """The plan the products on this thread run under now (None: the fastest kernel for each shape)."""
    return _plan.get()


@contextlib.contextmanager
def invariant_products(plan: RowPlan | None) -> Iterator[None]:
    """Run the products inside the block under ``plan`` (``None``: as usual)."""
    token = _plan.set(plan)
    try:
        yield
    finally:
        _plan.reset(token)


def invariant_rows(x: torch.Tensor, product: Product) -> torch.Tensor:
    """``product(x)`` for ``x [..., K]``, in calls whose shapes the current plan fixes."""
    plan = _plan.get()
    lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if plan is None or rows == 0:
        return product(x)
    parts = flat.split(plan.multiple) if plan.tiled else [flat]
    outs = [product(_pad(part, -(-len(part) // plan.multiple) * plan.multiple)) for part in parts]
    return torch.cat(outs)[:rows].reshape(*lead, -1)


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if len(x) == rows else torch.cat([x, x.new_zeros(rows - len(x), x.shape[1])])


def dense(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` under the current plan."""
    return invariant_rows(x, lambda part: torch.nn.functional.linear(part, weight))


def probe_plan(products: list[tuple[Product, int, torch.dtype]]) -> RowPlan | None:
    """The first plan under which every ``(product, in_features, dtype)`` gives a row the same bits alone
    and first or last in calls of other sizes; None when no plan does."""
    for plan in PLANS:
        with invariant_products(plan):
            if all(_rows_agree(product, width, dtype) for product, width, dtype in products):
                return plan
    return None


def _rows_agree(product: Product, width: int, dtype: torch.dtype) -> bool:
    x = torch.randn(max(PROBE_ROWS), width, generator=torch.Generator().manual_seed(width)).to(dtype)
    alone = product(x[:1])[0]
    for rows in PROBE_ROWS:
        last = torch.cat([x[1:rows], x[:1]])  # the same row at the other end of the call
        if not (torch.equal(product(x[:rows])[0], alone) and torch.equal(product(last)[-1], alone)):
            return False
    return True
