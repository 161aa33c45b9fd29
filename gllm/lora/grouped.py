"""Grouped low-rank products: one packed batch, different adapters on different rows.

The base matrix product runs once for every row of the batch (whatever kernel computes it); then each
site adds ``(x @ A) @ B`` for the rows of each adapter. How the rows are grouped decides the cost:

* a *large group* (a prompt chunk: many consecutive rows under one adapter) gets its own two products;
* the remaining rows (decodes: one row per request, each maybe with its own adapter) go through batched
  products over their adapters' *stacks*: per site, the A of every adapter of the step in one
  ``[adapters, in, rank]`` tensor and each projection's B in one ``[adapters, rank, out]``. The rows are
  laid out as ``[adapters, rows of the busiest adapter, in]`` (in the common case, one row per adapter
  in stack order, that is a view of the input, nothing copied), and two ``bmm`` per projection compute
  every row's own update only: each adapter's matrices are read once, and no row is multiplied by
  another adapter's. A projection that an adapter leaves alone, or a smaller rank, is zero padding.

Two kernels do the same without the padding and the gathered copies, reading each row's adapter in place
from the stacks: on the CPU those of ``lora_rows.cpp`` (when the C++ kernels build), where the attention
runs on Triton (CUDA) those of ``gllm.lora.triton_lora``. ``bmm`` is the fallback.

Stacks depend only on which adapters are in the batch; they are kept for the last few sets, since a
game's running requests keep the same adapters for many steps. What a step needs besides them (the
row layout) is computed once per step, not per site.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from gllm.lora.adapter import LoraAdapter, SitePart, SiteUpdate
from gllm.ops import cpu_kernels
from gllm.ops.cpu_kernels import cpu_lora_rows

LARGE_GROUP = 16  # rows of one adapter from which a group runs its own products
STACKS_KEPT = 4
CPU_KERNELS = True  # False: torch's products only (what ``benchmarks/lora_throughput.py`` compares with)


def stack_sites(adapters: tuple[LoraAdapter, ...]) -> dict[str, SiteUpdate]:
    """Per site, the updates of ``adapters`` for batched products: ``a`` ``[n, in, R]`` and, per output
    part, ``b`` ``[n, w, out]``, each part's columns of ``a`` as wide as its largest rank among them."""
    stacked = {}
    for site in dict.fromkeys(s for adapter in adapters for s in adapter.sites):
        updates = [adapter.sites.get(site) for adapter in adapters]
        widths: dict[tuple[int, int], int] = {}
        for update in filter(None, updates):
            for part in update.parts:
                key = (part.out.start, part.out.stop)
                widths[key] = max(widths.get(key, 0), part.cols.stop - part.cols.start)
        first = next(filter(None, updates)).a
        a = first.new_zeros(len(adapters), first.shape[0], sum(widths.values()))
        parts, col = {}, 0
        for (start, stop), width in sorted(widths.items()):
            parts[start] = SitePart(slice(start, stop), slice(col, col + width),
                                    first.new_zeros(len(adapters), width, stop - start))
            col += width
        for k, update in enumerate(updates):
            for part in update.parts if update is not None else ():
                into = parts[part.out.start]
                rank = part.cols.stop - part.cols.start
                a[k, :, into.cols.start : into.cols.start + rank] = update.a[:, part.cols]
                into.b[k, :rank] = part.b
        stacked[site] = SiteUpdate(a, list(parts.values()))
    return stacked


class StackCache:
    """Stacked updates of the last few adapter sets seen in a batch. ``forget`` may come from another
    thread than the engine's steps (an unload), hence the lock."""

    def __init__(self) -> None:
        self._stacks: OrderedDict[tuple[int, ...], dict[str, SiteUpdate]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, adapters: tuple[LoraAdapter, ...]) -> dict[str, SiteUpdate]:
        key = tuple(a.uid for a in adapters)
        with self._lock:
            stacked = self._stacks.pop(key, None)
            self._stacks[key] = stacked if stacked is not None else stack_sites(adapters)
            if len(self._stacks) > STACKS_KEPT:
                self._stacks.popitem(last=False)
            return self._stacks[key]

    def forget(self, adapter: LoraAdapter) -> None:
        """Drop every stack holding ``adapter`` (it was unloaded)."""
        with self._lock:
            for key in [k for k in self._stacks if adapter.uid in k]:
                del self._stacks[key]


Rows = slice | torch.Tensor  # consecutive rows, or their indices


class MixedRows:
    """Where the rows of several adapters sit in the batched products: ``rows`` of the batch, adapter
    by adapter (stack order), and ``slots``, their places in ``[adapters * depth]``; ``slots`` is None
    when each adapter has one row and ``rows`` is a slice (the input is then used as it is)."""

    def __init__(self, stacked: dict[str, SiteUpdate], by_adapter: list[list[int]], device: torch.device,
                 triton: bool = False):
        self.stacked = stacked
        self.count, self.depth = len(by_adapter), max(map(len, by_adapter))
        flat = [r for rows in by_adapter for r in rows]
        self.triton = triton
        self.on_cpu = device.type == "cpu"
        # each row with its adapter's place in the stacks, for the kernels
        self.row_index = torch.tensor(flat, device=device, dtype=torch.int32)
        self.row_slot = torch.tensor([k for k, rows in enumerate(by_adapter) for _ in rows], device=device,
                                     dtype=torch.int32)
        starts = [0]
        for rows in by_adapter:
            starts.append(starts[-1] + len(rows))
        self.group_starts = torch.tensor(starts, dtype=torch.int32)
        if self.depth == 1 and flat == list(range(flat[0], flat[0] + len(flat))):
            self.rows: Rows = slice(flat[0], flat[0] + len(flat))
            self.slots: torch.Tensor | None = None
        else:
            self.rows = torch.tensor(flat, device=device)
            slots = [k * self.depth + j for k, rows in enumerate(by_adapter) for j in range(len(rows))]
            self.slots = torch.tensor(slots, device=device)

    def apply(self, update: SiteUpdate, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.triton:  # imported here: Triton stays out of processes that never launch it
            from gllm.lora import triton_lora

            triton_lora.triton_add_updates(update, x if x.stride(-1) == 1 else x.contiguous(), y, self.row_index,
                                           self.row_slot)
            return
        if self.on_cpu and CPU_KERNELS and cpu_lora_rows(update, x, y, self.row_index, self.group_starts):
            return
        n, depth = self.count, self.depth
        if self.slots is None:
            xs = x[self.rows].unsqueeze(1)
        else:
            xs = x.new_zeros(n * depth, x.shape[1]).index_copy_(0, self.slots, x.index_select(0, self.rows))
            xs = xs.view(n, depth, -1)
        u = torch.bmm(xs, update.a)  # [n, depth, R]
        for part in update.parts:
            v = torch.bmm(u[:, :, part.cols], part.b).view(n * depth, -1)
            if self.slots is None:
                y[self.rows, part.out].add_(v)
            else:
                y[:, part.out].index_add_(0, self.rows, v.index_select(0, self.slots))


class LoraBatch:
    """The adapters of one step's rows. ``spans``: each chunk's adapter (or None) and row count, in
    packed order; consecutive chunks under one adapter form one group."""

    def __init__(self, spans: list[tuple[LoraAdapter | None, int]], stacks: StackCache, device: torch.device,
                 triton: bool = False):
        runs: list[list] = []  # [adapter, start, stop]
        row = 0
        for adapter, n in spans:
            if runs and runs[-1][0] is adapter and runs[-1][2] == row:
                runs[-1][2] += n
            elif adapter is not None:
                runs.append([adapter, row, row + n])
            row += n
        self.groups: list[tuple[LoraAdapter, Rows]] = [(a, slice(s, e)) for a, s, e in runs if e - s >= LARGE_GROUP]
        self.mixed: MixedRows | None = None
        by_adapter: dict[LoraAdapter, list[int]] = {}
        for a, s, e in runs:
            if e - s < LARGE_GROUP:
                by_adapter.setdefault(a, []).extend(range(s, e))
        kernels = CPU_KERNELS and device.type == "cpu" and cpu_kernels.available()  # one adapter's rows too
        if len(by_adapter) == 1 and not kernels:
            (adapter, index), = by_adapter.items()
            rows: Rows = (slice(index[0], index[-1] + 1) if index[-1] - index[0] + 1 == len(index)
                          else torch.tensor(index, device=device))
            self.groups.append((adapter, rows))
        elif by_adapter:
            self.mixed = MixedRows(stacks.get(tuple(by_adapter)), list(by_adapter.values()), device, triton)

    def apply(self, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add the updates of ``site`` to ``y`` (its base output for input ``x``), in place; return ``y``."""
        for adapter, rows in self.groups:
            update = adapter.sites.get(site)
            if update is not None:
                _add(update, x, y, rows)
        if self.mixed is not None:
            update = self.mixed.stacked.get(site)
            if update is not None:
                self.mixed.apply(update, x, y)
        return y


def _add(update: SiteUpdate, x: torch.Tensor, y: torch.Tensor, rows: Rows) -> None:
    """One adapter's update on its rows: two products per projection, added in place."""
    picked = isinstance(rows, torch.Tensor)
    u = (x.index_select(0, rows) if picked else x[rows]) @ update.a
    for part in update.parts:
        if picked:
            y[:, part.out].index_add_(0, rows, u[:, part.cols] @ part.b)
        else:
            y[rows, part.out].addmm_(u[:, part.cols], part.b)
