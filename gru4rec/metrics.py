"""Ranks -> Recall@k / MRR@k. Every number this project reports comes from these functions.

Tie modes (spec §7), with s* the target's score:
  standard:     1 + #{s_i > s*}
  conservative: #{s_i >= s*}                      (the target counts itself)
  median:       1 + #{s_i > s*} + (#{s_i == s*} - 1) / 2
Recall@k = mean(rank <= k); MRR@k = mean(1[rank <= k] / rank); NDCG@k = mean(1[rank <= k] / log2(rank + 1))
(one relevant item, so the ideal DCG is 1), micro-averaged over all predictions.

Beyond accuracy (as session-rec reports them), from the top-k lists: coverage@k = share of the
catalog that appears in any top-k list; popularity@k = mean over lists of the mean normalised
training popularity (count / largest count) of the k recommended items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are ranked: scoring workers need only numpy
    import torch

TIE_MODES = ("standard", "conservative", "median")
DEFAULT_CUTOFFS = (1, 5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, mode: str = "standard") -> torch.Tensor:
    """Rank of each row's target among all columns of `scores` [B, N]; float (median may be x.5)."""
    import torch

    target_scores = scores.gather(1, targets.view(-1, 1))
    greater = (scores > target_scores).sum(1)
    if mode == "standard":
        return (greater + 1).to(torch.float64)
    equal = (scores == target_scores).sum(1)  # includes the target itself
    if mode == "conservative":
        return (greater + equal).to(torch.float64)
    if mode == "median":
        return greater.to(torch.float64) + 1 + 0.5 * (equal.to(torch.float64) - 1)
    raise ValueError(f"unknown tie mode {mode!r}; use one of {', '.join(TIE_MODES)}")


def ranks_from_counts(n_greater, n_equal, mode: str = "standard") -> np.ndarray:
    """Ranks from #{s_i > s*} and #{s_i == s*} (the latter counting the target itself)."""
    g = np.asarray(n_greater, dtype=np.float64)
    e = np.asarray(n_equal, dtype=np.float64)
    if mode == "standard":
        return g + 1
    if mode == "conservative":
        return g + e
    if mode == "median":
        return g + 1 + 0.5 * (e - 1)
    raise ValueError(f"unknown tie mode {mode!r}; use one of {', '.join(TIE_MODES)}")


@dataclass
class RankAccumulator:
    """Streams ranks in; keeps exact float64 sums of hits and reciprocal ranks per cut-off."""

    cutoffs: tuple[int, ...] = DEFAULT_CUTOFFS
    n: int = 0
    hits: dict[int, float] = field(default_factory=dict)
    rr: dict[int, float] = field(default_factory=dict)
    dcg: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cutoffs = tuple(sorted(set(int(k) for k in self.cutoffs)))
        for k in self.cutoffs:
            self.hits.setdefault(k, 0.0)
            self.rr.setdefault(k, 0.0)
            self.dcg.setdefault(k, 0.0)

    def add(self, ranks) -> None:
        r = np.asarray(
            ranks.detach().cpu() if hasattr(ranks, "detach") else ranks, dtype=np.float64
        )  # a tensor
        self.n += r.size
        for k in self.cutoffs:
            hit = r <= k
            self.hits[k] += float(hit.sum())
            self.rr[k] += float((hit / r).sum())
            self.dcg[k] += float((hit / np.log2(r + 1)).sum())

    def merge(self, other: RankAccumulator) -> RankAccumulator:
        """Add another accumulator's counts and sums into this one (a shard's, a worker's); returns self.

        Sums, not averages, are added, so merging the parts of a run gives its single-process
        figures: hits exactly, reciprocal ranks up to float64 summation order (~1e-16 relative)."""
        if other.cutoffs != self.cutoffs:
            raise ValueError(f"cannot merge accumulators with cut-offs {self.cutoffs} and {other.cutoffs}")
        self.n += other.n
        for k in self.cutoffs:
            self.hits[k] += other.hits[k]
            self.rr[k] += other.rr[k]
            self.dcg[k] += other.dcg[k]
        return self

    def state(self) -> dict:
        """Plain-data form (JSON/Arrow friendly) to send an accumulator between processes."""
        return {
            "cutoffs": list(self.cutoffs),
            "n": self.n,
            "hits": [self.hits[k] for k in self.cutoffs],
            "rr": [self.rr[k] for k in self.cutoffs],
            "dcg": [self.dcg[k] for k in self.cutoffs],
        }

    @classmethod
    def from_state(cls, state: dict) -> RankAccumulator:
        cutoffs = tuple(int(k) for k in state["cutoffs"])
        sums = [state["hits"], state["rr"], state["dcg"]]
        if list(cutoffs) != sorted(set(cutoffs)) or any(len(x) != len(cutoffs) for x in sums):
            raise ValueError("malformed accumulator state")
        return cls(cutoffs, int(state["n"]), *(dict(zip(cutoffs, map(float, x))) for x in sums))

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.cutoffs:
            out[f"recall@{k}"] = self.hits[k] / self.n if self.n else float("nan")
            out[f"mrr@{k}"] = self.rr[k] / self.n if self.n else float("nan")
            out[f"ndcg@{k}"] = self.dcg[k] / self.n if self.n else float("nan")
        out["n"] = self.n
        return out


def metrics_from_ranks(ranks, cutoffs=DEFAULT_CUTOFFS) -> dict[str, float]:
    acc = RankAccumulator(tuple(cutoffs))
    acc.add(ranks)
    return acc.result()


@dataclass
class BeyondAccuracy:
    """Streams top-k lists (item indices, best first) in; coverage@k and popularity@k per cut-off.

    `popularity`: training count of each item index divided by the largest count (None: coverage only)."""

    n_items: int
    cutoffs: tuple[int, ...]
    popularity: np.ndarray | None = None
    n_lists: int = 0
    seen: dict[int, np.ndarray] = field(default_factory=dict)
    pop_sum: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cutoffs = tuple(sorted(set(int(k) for k in self.cutoffs)))
        for k in self.cutoffs:
            self.seen[k] = np.zeros(self.n_items, dtype=bool)
            self.pop_sum[k] = 0.0

    def add(self, topk_idx: np.ndarray) -> None:
        top = np.asarray(topk_idx, dtype=np.int64)
        if top.shape[1] < max(self.cutoffs):
            raise ValueError(f"top-k lists of {top.shape[1]} items cannot give cut-off {max(self.cutoffs)}")
        self.n_lists += len(top)
        for k in self.cutoffs:
            self.seen[k][top[:, :k].ravel()] = True
            if self.popularity is not None:
                self.pop_sum[k] += float(self.popularity[top[:, :k]].mean(axis=1).sum())

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.cutoffs:
            out[f"coverage@{k}"] = float(self.seen[k].sum()) / self.n_items
            if self.popularity is not None:
                out[f"popularity@{k}"] = self.pop_sum[k] / self.n_lists if self.n_lists else float("nan")
        return out


def normalised_popularity(counts: np.ndarray) -> np.ndarray:
    """Training counts per item index -> count / largest count (session-rec's popularity)."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / counts.max() if counts.size and counts.max() > 0 else counts
