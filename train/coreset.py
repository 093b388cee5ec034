"""Greedy k-centre coreset selection: a bounded memory that still covers every kind of normal block.

PatchCore's selection (anomalib's KCenterGreedy): start from one item, then repeatedly add the item
farthest from everything chosen so far. The chosen set's covering radius is within twice the optimum, so
rare normal blocks are kept while the many near-copies of common ones go. Distances are taken on a
random projection (Johnson-Lindenstrauss: ranks of distances survive it), and the items are taken in
chunks of consecutive rows (consecutive images): each chunk keeps its share of the budget. A chunk's
items fit in the CPU's cache, so 5 000 images select in seconds instead of the hour that one pass over
every item per chosen item would take; the cost is that two chunks may both keep a block the other
already covers.
"""
from __future__ import annotations

import math
from typing import List

import torch

PROJECTION_DIMS = 64  # random projection the distances are taken on (PatchCore: 128; 64 ranks as well here)
CHUNK_ITEMS = 16384  # items per chunk: 16k x 64 floats = 4 MB, within a CPU's L2/L3 cache


def coreset_size(n_items: int, budget: float) -> int:
    """Items kept of `n_items` for a budget: a fraction in (0, 1], or a count above 1 (at most all)."""
    if budget <= 0:
        raise ValueError(f"coreset budget must be > 0, got {budget}")
    size = int(math.ceil(budget * n_items)) if budget <= 1.0 else int(budget)
    return max(1, min(n_items, size))


def random_projection(dims_in: int, dims_out: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(dims_in, dims_out, generator=gen) / math.sqrt(dims_out)).to(device)


@torch.no_grad()
def kcenter_greedy(items: torch.Tensor, size: int, seed: int = 0, projection_dims: int = PROJECTION_DIMS,
                   chunk_items: int = CHUNK_ITEMS) -> torch.Tensor:
    """Indices (sorted) of `size` rows of `items` (N, D) chosen by greedy k-centre, chunk by chunk.

    Runs on the items' device (a GPU where they are on one). Deterministic for a seed."""
    n = items.shape[0]
    if size >= n:
        return torch.arange(n, device=items.device)
    z = items.float()
    if z.shape[1] > projection_dims:
        z = z @ random_projection(z.shape[1], projection_dims, seed, items.device)
    chunks = max(1, math.ceil(n / chunk_items))
    bounds = [round(i * n / chunks) for i in range(chunks + 1)]
    shares = _shares([bounds[i + 1] - bounds[i] for i in range(chunks)], size)
    gen = torch.Generator().manual_seed(seed)
    chosen: List[torch.Tensor] = []
    for start, stop, share in zip(bounds, bounds[1:], shares):
        if share:
            first = int(torch.randint(start, stop, (1,), generator=gen))
            chosen.append(start + _greedy(z[start:stop], share, first - start))
    return torch.sort(torch.cat(chosen)).values


def _shares(sizes: List[int], total: int) -> List[int]:
    """`total` split over chunks in proportion to their sizes (largest remainders), each at most its size."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    shares = [min(s, int(e)) for s, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in order:
        if sum(shares) >= total:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
    return shares


def _greedy(z: torch.Tensor, size: int, first: int) -> torch.Tensor:
    """Greedy k-centre on one chunk (M, d): squared distances to the chosen set, updated per chosen item
    as |z|^2 + |c|^2 - 2 z.c (one matrix-vector product per item)."""
    norms = (z * z).sum(dim=1)
    picked = torch.empty(size, dtype=torch.long, device=z.device)
    nearest = torch.full_like(norms, float("inf"))
    current = first
    for i in range(size):
        picked[i] = current
        dist = norms + norms[current] - 2.0 * (z @ z[current])
        nearest = torch.minimum(nearest, dist)
        nearest[current] = -1.0  # chosen items are never chosen again (distance 0, clamped rounding aside)
        current = int(torch.argmax(nearest))
    return picked
