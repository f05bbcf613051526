"""Greedy coreset (k-center) selection for memory banks, practical on a CPU.

PatchCore keeps a subset of its patch features such that every feature is close to a kept one:
greedy k-center repeatedly adds the point farthest from the points kept so far. Done naively that
is k passes over all n points (n x k distance computations: 200,000 x 20,000 with 128-dimensional
projections is hours of memory traffic on a small CPU). This implementation gives the same
greedy result on the projected features, but skips most of the work with the triangle inequality:

- the points are grouped around ``blocks`` random pivots; each block knows its radius (the
  largest distance of a member to its pivot) and an upper bound of its members' distances to
  the coreset;
- blocks are brought up to date lazily: only the block with the largest bound is updated, with
  every center chosen since its last update at once (one matrix product), until the block with
  the largest bound is up to date, which then holds the farthest point;
- a center c can only lower the distance of a member of block b if
  ||c - pivot_b|| - radius_b < the block's bound (triangle inequality); other centers are skipped.

The result is exactly the greedy sequence on the projected features. Memory: the projected
features (n x projection_dim float32), one permuted copy for contiguous blocks, and O(n)
bookkeeping; the input is read in chunks and may be float16.
"""

from __future__ import annotations

import math

import torch

PROJECTION_CHUNK = 65_536


def project(features: torch.Tensor, dim: int | None, generator: torch.Generator) -> torch.Tensor:
    """A Johnson-Lindenstrauss random projection to ``dim`` dimensions (float32), in chunks."""
    n, d = features.shape
    if dim is None or dim >= d:
        return features.float()
    matrix = torch.randn(d, dim, generator=generator) / math.sqrt(dim)
    out = torch.empty(n, dim)
    for lo in range(0, n, PROJECTION_CHUNK):
        out[lo:lo + PROJECTION_CHUNK] = features[lo:lo + PROJECTION_CHUNK].float() @ matrix
    return out


def _distances(points: torch.Tensor, squared_norms: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    return (squared_norms - 2 * (points @ center) + center.dot(center)).clamp_(min=0).sqrt_()


def greedy_coreset(features: torch.Tensor, k: int, projection_dim: int | None = 128, seed: int = 0,
                   blocks: int | None = None) -> torch.Tensor:
    """Indices of ``k`` of the ``n`` rows of ``features`` chosen by greedy k-center (farthest point
    first) on a random projection; the first center is a seeded random row."""
    n = features.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"coreset size {k} must be between 1 and the number of features {n}")
    generator = torch.Generator().manual_seed(seed)
    points = project(features, projection_dim, generator)
    blocks = blocks or max(1, min(n, int(2 * math.sqrt(n))))

    # Group the points around random pivots; store them block by block (contiguous rows).
    pivots = points[torch.randperm(n, generator=generator)[:blocks]]
    pivot_norms = pivots.pow(2).sum(1)
    assignment = torch.empty(n, dtype=torch.long)
    to_pivot = torch.empty(n)
    for lo in range(0, n, PROJECTION_CHUNK):
        chunk = points[lo:lo + PROJECTION_CHUNK]
        squared = chunk.pow(2).sum(1, keepdim=True) - 2 * chunk @ pivots.T + pivot_norms
        best = squared.min(dim=1)
        assignment[lo:lo + PROJECTION_CHUNK] = best.indices
        to_pivot[lo:lo + PROJECTION_CHUNK] = best.values.clamp(min=0).sqrt()
    order = torch.argsort(assignment, stable=True)
    points = points[order]
    norms = points.pow(2).sum(1)
    block_of = assignment[order]
    counts = torch.bincount(block_of, minlength=blocks)
    starts = torch.cumsum(counts, 0) - counts
    radius = torch.zeros(blocks).scatter_reduce_(0, block_of, to_pivot[order], "amax")
    del assignment, to_pivot

    # Lazy updates: a block applies the centers chosen since its last update only when it competes
    # for the farthest point (its stale maximum is an upper bound: more centers only lower it).
    # Blocks far from the frontier are never touched again, and an update applies many centers
    # at once, as one matrix product.
    to_coreset = torch.full((n,), math.inf)
    upper = torch.full((blocks,), math.inf)
    upper[counts == 0] = -math.inf
    applied = torch.zeros(blocks, dtype=torch.long)  # centers already applied to each block
    centers = torch.empty(k, points.shape[1])
    chosen = torch.empty(k, dtype=torch.long)
    index = int(torch.randint(n, (1,), generator=generator))
    for step in range(k):
        chosen[step], centers[step] = index, points[index]
        if step == k - 1:
            break
        while True:
            block = int(upper.argmax())
            if applied[block] == step + 1:
                break  # up to date and no other block can hold a farther point
            lo, hi = int(starts[block]), int(starts[block] + counts[block])
            pending = centers[applied[block]:step + 1]
            pivot_gap = (pending - pivots[block]).norm(dim=1) - radius[block]
            pending = pending[pivot_gap < upper[block]]  # the others cannot come closer to any member
            if len(pending):
                squared = norms[lo:hi, None] - 2 * points[lo:hi] @ pending.T + pending.pow(2).sum(1)
                nearest = squared.amin(dim=1).clamp_(min=0).sqrt_()
                torch.minimum(to_coreset[lo:hi], nearest, out=to_coreset[lo:hi])
            upper[block] = to_coreset[lo:hi].max()
            applied[block] = step + 1
        index = int(starts[block]) + int(to_coreset[int(starts[block]):int(starts[block] + counts[block])].argmax())
    return order[chosen]
