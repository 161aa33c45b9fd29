"""Grouped low-rank products: one packed batch, different adapters on different rows.

The base matrix product runs once for every row of the batch (whatever kernel computes it); then each
site adds ``(x @ A) @ B`` for the rows of each adapter. How the rows are grouped decides the cost:

* a *large group* (a prompt chunk: many consecutive rows under one adapter) gets its own two products;
* the remaining rows (decodes: one row per request, each maybe with its own adapter) share one product
  against the *stack* of their adapters' ``A`` matrices side by side. Each row keeps only its own
  adapter's columns of ``x @ A_stack`` (a 0/1 mask), and one product with the stacked ``B`` adds every
  row's own update. The extra arithmetic (every row times every adapter's rank) is small next to what
  it saves: per site three products instead of two per adapter, each small product costing more in
  call overhead than in arithmetic on the CPU.

Stacks depend only on which adapters are in the batch; they are kept for the last few sets, since a
game's running requests keep the same adapters for many steps.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from gllm.lora.adapter import LoraAdapter, SitePart, SiteUpdate

LARGE_GROUP = 16  # rows of one adapter from which a group runs its own products
STACKS_KEPT = 4


def stack_sites(adapters: tuple[LoraAdapter, ...], device: torch.device) -> dict[str, SiteUpdate]:
    """Per site, the updates of ``adapters`` side by side: columns by output part, then by adapter (so each
    part's columns are one slice), with ``owners`` naming each column's adapter (its index in ``adapters``)."""
    layouts: dict[tuple[int, ...], torch.Tensor] = {}  # equal column layouts share one tensor (one mask a step)
    stacked = {}
    for site in dict.fromkeys(s for adapter in adapters for s in adapter.sites):
        by_out: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for k, adapter in enumerate(adapters):
            update = adapter.sites.get(site)
            for part in update.parts if update is not None else ():
                by_out.setdefault((part.out.start, part.out.stop), []).append((k, update.a[:, part.cols], part.b))
        a_cols, parts, owners = [], [], []
        for (start, stop), entries in sorted(by_out.items()):
            first = len(owners)
            for k, a, _ in entries:
                a_cols.append(a)
                owners += [k] * a.shape[1]
            b = torch.cat([b for _, _, b in entries])
            parts.append(SitePart(slice(start, stop), slice(first, len(owners)), b))
        key = tuple(owners)
        if key not in layouts:
            layouts[key] = torch.tensor(owners, device=device)
        stacked[site] = SiteUpdate(torch.cat(a_cols, dim=1).contiguous(), parts, layouts[key])
    return stacked


class StackCache:
    """Stacked updates of the last few adapter sets seen in a batch. ``forget`` may come from another
    thread than the engine's steps (an unload), hence the lock."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stacks: OrderedDict[tuple[int, ...], dict[str, SiteUpdate]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, adapters: tuple[LoraAdapter, ...]) -> dict[str, SiteUpdate]:
        key = tuple(a.uid for a in adapters)
        with self._lock:
            stacked = self._stacks.pop(key, None)
            self._stacks[key] = stacked if stacked is not None else stack_sites(adapters, self.device)
            if len(self._stacks) > STACKS_KEPT:
                self._stacks.popitem(last=False)
            return self._stacks[key]

    def forget(self, adapter: LoraAdapter) -> None:
        """Drop every stack holding ``adapter`` (it was unloaded)."""
        with self._lock:
            for key in [k for k in self._stacks if adapter.uid in k]:
                del self._stacks[key]


Rows = slice | torch.Tensor  # consecutive rows, or their indices


class LoraBatch:
    """The adapters of one step's rows. ``spans``: each chunk's adapter (or None) and row count, in
    packed order; consecutive chunks under one adapter form one group."""

    def __init__(self, spans: list[tuple[LoraAdapter | None, int]], stacks: StackCache, device: torch.device):
        runs: list[list] = []  # [adapter, start, stop]
        row = 0
        for adapter, n in spans:
            if runs and runs[-1][0] is adapter and runs[-1][2] == row:
                runs[-1][2] += n
            elif adapter is not None:
                runs.append([adapter, row, row + n])
            row += n
        self.groups: list[tuple[LoraAdapter, Rows]] = [(a, slice(s, e)) for a, s, e in runs if e - s >= LARGE_GROUP]
        small = [(a, s, e) for a, s, e in runs if e - s < LARGE_GROUP]
        self.mixed: tuple[dict[str, SiteUpdate], Rows, torch.Tensor] | None = None
        self._masks: dict[int, torch.Tensor] = {}
        if not small:
            return
        adapters = tuple(dict.fromkeys(a for a, _, _ in small))
        index = [r for _, s, e in small for r in range(s, e)]
        rows: Rows = slice(index[0], index[-1] + 1) if index[-1] - index[0] + 1 == len(index) else torch.tensor(index, device=device)
        if len(adapters) == 1:
            self.groups.append((adapters[0], rows))
            return
        owner_of = {a: k for k, a in enumerate(adapters)}
        owners = torch.tensor([owner_of[a] for a, s, e in small for _ in range(s, e)], device=device)
        self.mixed = (stacks.get(adapters), rows, owners)

    def apply(self, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add the updates of ``site`` to ``y`` (its base output for input ``x``), in place; return ``y``."""
        for adapter, rows in self.groups:
            update = adapter.sites.get(site)
            if update is not None:
                _add(update, x, y, rows)
        if self.mixed is not None:
            stacked, rows, owners = self.mixed
            update = stacked.get(site)
            if update is not None:
                _add(update, x, y, rows, self._mask(update.owners, owners, x.dtype))
        return y

    def _mask(self, columns: torch.Tensor, owners: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """1 where a row's adapter owns a column of the stack, else 0 (computed once per step and layout)."""
        mask = self._masks.get(id(columns))
        if mask is None:
            mask = self._masks[id(columns)] = (owners[:, None] == columns[None, :]).to(dtype)
        return mask


def _add(update: SiteUpdate, x: torch.Tensor, y: torch.Tensor, rows: Rows, mask: torch.Tensor | None = None) -> None:
    picked = isinstance(rows, torch.Tensor)
    u = (x.index_select(0, rows) if picked else x[rows]) @ update.a
    if mask is not None:
        u.mul_(mask)
    for part in update.parts:
        if picked:
            y[:, part.out].index_add_(0, rows, u[:, part.cols] @ part.b)
        else:
            y[rows, part.out].addmm_(u[:, part.cols], part.b)
