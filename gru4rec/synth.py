"""Seeded synthetic click sessions with the structure a session-based recommender should exploit.

Generative story (all numpy, vectorised over sessions, one step per event position):
- items have a Zipf global popularity (exponent `zipf`), over a random permutation of item ids;
- items are partitioned into `n_intents` clusters; each cluster has its own item distribution
  (the global popularity restricted to the cluster) and the clusters are Zipf-popular themselves;
- every item has a few fixed successors (any cluster) with decaying weights: the item-to-item
  transitions a last-item model can learn;
- a session draws one intent that persists to its end, and a log-normal length (>= 2, capped);
- its first item comes from the intent; every next item from a mixture of the intent's
  distribution (`p_intent`), a transition from the previous item (`p_transition`) and global
  popularity (the rest, noise). The last item alone reveals the intent only when it was drawn
  from it, so a model that reads the whole session predicts better than one reading only the last
  item;
- sessions start uniformly over `days` days; events are seconds to minutes apart (log-normal gaps).
Test = sessions starting in the last `test_days` days; their events of items unseen in train are
removed, then sessions left shorter than 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from gru4rec.data import ITEM, SESSION, TIME
from gru4rec.errors import UserError
from gru4rec.items import drop_short_sessions

DAY = 86_400
T0 = 1_700_000_000  # an arbitrary fixed epoch so the files look like real unix seconds


@dataclass(frozen=True)
class SynthConfig:
    zipf: float = 1.0  # global item popularity ~ 1 / rank^zipf
    items_per_intent: int = 25
    intent_zipf: float = 0.6
    n_successors: int = 4  # item-to-item transitions per item
    p_intent: float = 0.6
    p_transition: float = 0.25  # the remaining 0.15 is global-popularity noise
    length_mu: float = 1.3  # log-normal session length: exp(N(mu, sigma)), at least 2
    length_sigma: float = 0.6
    max_length: int = 50
    days: float = 30.0
    test_days: float = 2.0
    gap_median_s: float = 45.0  # log-normal gap between consecutive events
    gap_sigma: float = 1.0


MAX_SESSIONS, MAX_ITEMS = 10_000_000, 1_000_000


def generate(
    n_sessions: int, n_items: int, seed: int, cfg: SynthConfig = SynthConfig()
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, test) canonical frames; test items all occur in train, every session has >= 2 events."""
    for flag, value, most in (("--sessions", n_sessions, MAX_SESSIONS), ("--items", n_items, MAX_ITEMS)):
        if not 10 <= value <= most:  # the upper bounds keep a typo from filling memory
            raise UserError(f"{flag} must be between 10 and {most:,}, got {value}")
    rng = np.random.default_rng(seed)
    world = _World.draw(n_items, cfg, rng)
    lengths = _session_lengths(n_sessions, cfg, rng)
    items = _walk(world, lengths, cfg, rng)
    times = _timestamps(lengths, cfg, rng)
    session_ids = rng.permutation(n_sessions).astype(np.int64) + 1  # ids unrelated to time order
    events = pl.DataFrame(
        {SESSION: np.repeat(session_ids, lengths), ITEM: world.item_ids[items], TIME: times},
        schema={SESSION: pl.Int64, ITEM: pl.Int64, TIME: pl.Int64},
    )
    return _split(
        events.sort([SESSION, TIME], maintain_order=True), T0 + int(cfg.days * DAY) - int(cfg.test_days * DAY)
    )


@dataclass
class _World:
    item_ids: np.ndarray  # [N] public id of internal item k
    global_cdf: np.ndarray  # [N]
    intent_cdf: np.ndarray  # [N] per-cluster CDFs laid end to end, cluster c's values in (c, c+1]
    intent_items: np.ndarray  # [N] internal items ordered by cluster, aligned with intent_cdf
    intent_pop_cdf: np.ndarray  # [C]
    successors: np.ndarray  # [N, S]
    successor_cdf: np.ndarray  # [S]

    @classmethod
    def draw(cls, n_items: int, cfg: SynthConfig, rng: np.random.Generator) -> _World:
        # Internal item k has popularity rank k; the public id hides that order.
        pop = 1.0 / np.arange(1, n_items + 1) ** cfg.zipf
        pop /= pop.sum()
        item_ids = rng.choice(np.arange(1000, 1000 + 50 * n_items), size=n_items, replace=False).astype(
            np.int64
        )
        n_intents = max(2, n_items // cfg.items_per_intent)
        cluster = rng.permutation(np.arange(n_items) % n_intents)  # equal-size clusters, mixed popularity
        order = np.argsort(cluster, kind="stable")
        cluster_sorted = cluster[order]
        w = pop[order]
        cum = np.cumsum(w)
        starts = np.searchsorted(cluster_sorted, np.arange(n_intents))
        totals = np.add.reduceat(w, starts)
        before = np.concatenate(([0.0], cum))[starts]  # mass of all earlier clusters
        within = (cum - before[cluster_sorted]) / totals[cluster_sorted]
        intent_cdf = cluster_sorted + within
        intent_cdf[np.r_[starts[1:] - 1, n_items - 1]] = np.arange(1, n_intents + 1)  # exact ends
        intent_pop = 1.0 / rng.permutation(np.arange(1, n_intents + 1)) ** cfg.intent_zipf
        successors = rng.choice(n_items, size=(n_items, cfg.n_successors), p=pop)
        successor_w = 1.0 / np.arange(1, cfg.n_successors + 1)
        return cls(
            item_ids=item_ids,
            global_cdf=_cdf(pop),
            intent_cdf=intent_cdf,
            intent_items=order,
            intent_pop_cdf=_cdf(intent_pop),
            successors=successors,
            successor_cdf=_cdf(successor_w),
        )

    def from_intent(self, intents: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pos = np.searchsorted(self.intent_cdf, intents + rng.random(len(intents)), side="right")
        return self.intent_items[np.minimum(pos, len(self.intent_items) - 1)]


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return cdf


def _draw(cdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def _session_lengths(n: int, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    raw = np.rint(np.exp(rng.normal(cfg.length_mu, cfg.length_sigma, n)))
    return np.clip(raw, 2, cfg.max_length).astype(np.int64)


def _walk(world: _World, lengths: np.ndarray, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Internal item of every event, sessions laid end to end; one vectorised step per position."""
    n = len(lengths)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    out = np.empty(int(lengths.sum()), dtype=np.int64)
    intents = _draw(world.intent_pop_cdf, n, rng)
    prev = world.from_intent(intents, rng)
    out[offsets] = prev
    for t in range(1, int(lengths.max())):
        alive = np.flatnonzero(lengths > t)
        u = rng.random(len(alive))
        nxt = np.empty(len(alive), dtype=np.int64)
        src_intent = u < cfg.p_intent
        src_trans = (u >= cfg.p_intent) & (u < cfg.p_intent + cfg.p_transition)
        src_global = ~(src_intent | src_trans)
        nxt[src_intent] = world.from_intent(intents[alive[src_intent]], rng)
        k = _draw(world.successor_cdf, int(src_trans.sum()), rng)
        nxt[src_trans] = world.successors[prev[alive[src_trans]], k]
        nxt[src_global] = _draw(world.global_cdf, int(src_global.sum()), rng)
        prev[alive] = nxt
        out[offsets[alive] + t] = nxt
    return out


def _timestamps(lengths: np.ndarray, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Start uniform over the period (the session must end inside it); then gaps of >= 1 s."""
    n_events = int(lengths.sum())
    gaps = np.maximum(1, np.rint(cfg.gap_median_s * np.exp(rng.normal(0.0, cfg.gap_sigma, n_events))))
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    gaps[offsets] = 0  # the first event of a session sits at its start
    within = np.cumsum(gaps)
    within -= np.repeat(within[offsets], lengths)
    duration = within[offsets + lengths - 1]
    span = int(cfg.days * DAY)
    starts = T0 + (rng.random(len(lengths)) * np.maximum(span - duration, 1)).astype(np.int64)
    return (np.repeat(starts, lengths) + within).astype(np.int64)


def _split(events: pl.DataFrame, boundary: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    is_test = pl.col(TIME).min().over(SESSION) >= boundary
    train = events.filter(~is_test)
    test = events.filter(is_test)
    test = drop_short_sessions(test.filter(pl.col(ITEM).is_in(train[ITEM].unique().implode())))
    return train, test
