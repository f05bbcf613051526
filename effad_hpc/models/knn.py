"""Exact k-nearest-neighbour search in chunks, with memory bounded whatever the bank size.

Distances are Euclidean, computed in float32 (a float16 bank is widened chunk by chunk). The
queries are processed ``query_chunk`` at a time against the bank ``bank_chunk`` rows at a time,
keeping a running top-k, so the largest temporary is a (query_chunk x bank_chunk) distance
block. Runs on whichever device the tensors are on.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 4096
BANK_CHUNK = 16_384


def _squared_distances(queries: torch.Tensor, query_norms: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """||q||^2 - 2 q.b + ||b||^2 in one (queries x bank) buffer, updated in place."""
    distances = torch.addmm(bank.pow(2).sum(1)[None], queries, bank.T, alpha=-2)
    return distances.add_(query_norms[:, None]).clamp_min_(0)


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, query_chunk: int = QUERY_CHUNK,
                       bank_chunk: int = BANK_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distances, indices)``, each (Q, k), of the k nearest bank rows of every query, nearest first."""
    if bank.shape[0] < k:
        raise ValueError(f"{k} neighbours were asked for from a bank of {bank.shape[0]} vectors")
    with torch.autocast(queries.device.type, enabled=False):  # distances by expansion need float32
        return _search(queries.float(), bank, k, query_chunk, bank_chunk)


def _search(queries: torch.Tensor, bank: torch.Tensor, k: int, query_chunk: int,
            bank_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    out_distances = torch.empty(queries.shape[0], k, device=queries.device)
    out_indices = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    for q_lo in range(0, queries.shape[0], query_chunk):
        block = queries[q_lo:q_lo + query_chunk]
        block_norms = block.pow(2).sum(1)
        best = torch.full((block.shape[0], k), torch.inf, device=queries.device)
        best_index = torch.zeros(block.shape[0], k, dtype=torch.long, device=queries.device)
        for b_lo in range(0, bank.shape[0], bank_chunk):
            part = bank[b_lo:b_lo + bank_chunk].float()  # a float16 bank is widened a chunk at a time
            distances = _squared_distances(block, block_norms, part)
            top = distances.topk(min(k, part.shape[0]), dim=1, largest=False)
            merged = torch.cat([best, top.values], dim=1)
            merged_index = torch.cat([best_index, top.indices + b_lo], dim=1)
            keep = merged.topk(k, dim=1, largest=False)
            best, best_index = keep.values, merged_index.gather(1, keep.indices)
        out_distances[q_lo:q_lo + query_chunk] = best.sqrt()
        out_indices[q_lo:q_lo + query_chunk] = best_index
    return out_distances, out_indices
