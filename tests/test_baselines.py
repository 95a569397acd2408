"""Each baseline against a brute-force reference written here with plain loops and dicts.

The references work on original item ids and Python containers, score every (session, position)
of a tiny random dataset, and rank with their own loops; the vectorised baselines must give the
same score for every item of every prediction and the same Recall@k / MRR@k in both tie modes.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from gru4rec.data import validate_events
from gru4rec.errors import UserError
from gru4rec.eval.baselines import make
from gru4rec.eval.baselines.base import evaluate, prepare_test, prepare_train

CUTOFFS = (1, 2, 3, 5, 10)


def _frame(sessions: dict[int, list[int]], start: dict[int, int]) -> pl.DataFrame:
    rows = [(s, it, start[s] + 10 * p) for s, items in sessions.items() for p, it in enumerate(items)]
    return validate_events(pl.DataFrame(rows, schema=["session_id", "item_id", "time"], orient="row"))


@pytest.fixture(scope="module")
def tiny():
    """~40 training sessions over 15 items (repeats included), 12 test sessions, one unknown item."""
    rng = np.random.default_rng(3)
    ids = [100 + 7 * k for k in range(15)]
    pop = rng.dirichlet(np.ones(15) * 0.7)
    train = {s: [int(x) for x in rng.choice(ids, size=rng.integers(2, 7), p=pop)] for s in range(1, 41)}
    test = {s: [int(x) for x in rng.choice(ids, size=rng.integers(2, 6), p=pop)] for s in range(100, 112)}
    test[105].insert(1, 999)  # unknown item: dropped as an event, its neighbours become consecutive
    test[106] = [999, ids[0]]  # becomes a one-event session: no prediction
    tstart = {s: int(rng.integers(0, 5)) * 100 for s in train}  # shared start times: tie order by id
    return train, test, _frame(train, tstart), _frame(test, {s: 10_000 + s for s in test})


# ---------------------------------------------------------------- reference helpers (plain Python)


def ordered_sessions(sessions: dict[int, list[int]], frame: pl.DataFrame) -> list[int]:
    """Session ids by (first event time, id), as the spec's replay orders them."""
    first = {}
    for s, t in zip(frame["session_id"].to_list(), frame["time"].to_list(), strict=True):
        first[s] = min(t, first.get(s, t))
    return sorted(sessions, key=lambda s: (first[s], s))


def first_appearance(train: dict[int, list[int]]) -> list[int]:
    seen: list[int] = []
    for s in sorted(train):
        for it in train[s]:
            if it not in seen:
                seen.append(it)
    return seen


def known_test(test: dict[int, list[int]], known: set[int]) -> dict[int, list[int]]:
    kept = {s: [it for it in items if it in known] for s, items in test.items()}
    return {s: items for s, items in kept.items() if len(items) >= 2}


def ref_metrics(
    preds: list[tuple[dict[int, float], int]], all_items: list[int], mode: str
) -> dict[str, float]:
    hits, rr = Counter(), Counter()
    for scores, target in preds:
        t = scores.get(target, 0.0)
        greater = sum(1 for it in all_items if scores.get(it, 0.0) > t + 1e-9)
        equal = sum(1 for it in all_items if abs(scores.get(it, 0.0) - t) <= 1e-9)
        rank = greater + 1 if mode == "standard" else greater + equal
        for k in CUTOFFS:
            if rank <= k:
                hits[k] += 1
                rr[k] += 1.0 / rank
    n = len(preds)
    return {**{f"recall@{k}": hits[k] / n for k in CUTOFFS}, **{f"mrr@{k}": rr[k] / n for k in CUTOFFS}}


def ref_pop(train, top_n):
    supp = Counter(it for items in train.values() for it in items)
    order = first_appearance(train)
    best = sorted(order, key=lambda it: (-supp[it], order.index(it)))[:top_n]
    return {it: supp[it] / (supp[it] + 1) for it in best}


def ref_spop(train, top_n):
    pop = ref_pop(train, top_n)

    def predict(prefix):
        out = dict(pop)
        for it in prefix:
            out[it] = out.get(it, 0.0) + 1.0
        return out

    return predict


def ref_itemknn(train, top_n, lam=20.0, alpha=0.5):
    supp = Counter(it for items in train.values() for it in items)
    order = first_appearance(train)
    c = defaultdict(Counter)
    for items in train.values():
        for a, i in enumerate(items):
            for b, j in enumerate(items):
                if a != b and i != j:
                    c[i][j] += 1
    neighbours = {}
    for i in c:
        sims = {j: c[i][j] / ((supp[i] + lam) ** alpha * (supp[j] + lam) ** (1 - alpha)) for j in c[i]}
        best = sorted(sims, key=lambda j: (-sims[j], order.index(j)))[:top_n]
        neighbours[i] = {j: sims[j] for j in best}
    return lambda prefix: dict(neighbours.get(prefix[-1], {}))


def ref_sknn(train, train_frame, k, sample_size, similarity, weighting):
    order = ordered_sessions(train, train_frame)
    last = {}
    for s, t in zip(train_frame["session_id"].to_list(), train_frame["time"].to_list(), strict=True):
        last[s] = max(t, last.get(s, t))
    recency = {s: (last[s], order.index(s)) for s in train}
    sets = {s: set(items) for s, items in train.items()}

    def weight(p, n):
        return {
            "same": 1.0,
            "linear": max(0.0, 1.0 - 0.1 * (n - p)),
            "div": p / n,
            "quadratic": (p / n) ** 2,
        }[weighting]

    def predict(prefix):
        n = len(prefix)
        w = {}
        for p, it in enumerate(prefix, start=1):
            w[it] = weight(p, n)  # later occurrences overwrite
        q = set(prefix)
        cands = [s for s in train if sets[s] & q]
        cands.sort(key=lambda s: recency[s], reverse=True)
        if sample_size:
            cands = cands[:sample_size]
        sims = {}
        for s in cands:
            common = sets[s] & q
            num = sum(w[it] for it in common)
            norm = {
                "cosine": math.sqrt(len(q) * len(sets[s])),
                "jaccard": len(q | sets[s]),
                "dot": 1.0,
                "vec": len(q),
            }[similarity]
            sims[s] = num / norm
        best = sorted(cands, key=lambda s: (sims[s], recency[s]), reverse=True)[:k]
        out: dict[int, float] = {}
        for s in sorted(best, key=lambda s: order.index(s)):
            for it in sets[s]:
                out[it] = out.get(it, 0.0) + sims[s]
        return out

    return predict


def ref_bprmf(train, train_frame, factors, epochs, lr, seed):
    """Sequential SGD with the same random draws as the implementation (seeded generator)."""
    order = ordered_sessions(train, train_frame)
    item_order = first_appearance(train)
    idx = {it: n for n, it in enumerate(item_order)}
    events = [(u, idx[it]) for u, s in enumerate(order) for it in train[s]]
    rng = np.random.default_rng(seed)
    user = rng.uniform(-0.05, 0.05, (len(order), factors)).tolist()
    item = rng.uniform(-0.05, 0.05, (len(item_order), factors)).tolist()
    for _ in range(epochs):
        perm = rng.permutation(len(events))
        neg_rows = rng.integers(0, len(events), len(events))
        for t, e in enumerate(perm):
            u, i = events[e]
            j = events[neg_rows[t]][1]
            pu, qi, qj = user[u][:], item[i][:], item[j][:]
            x = sum(pu[f] * (qi[f] - qj[f]) for f in range(factors))
            g = lr * (1.0 - 1.0 / (1.0 + math.exp(-x)))
            for f in range(factors):
                user[u][f] += g * (qi[f] - qj[f])
                item[i][f] += g * pu[f]
                item[j][f] -= g * pu[f]

    def predict(prefix):
        mean = [sum(item[idx[it]][f] for it in prefix) / len(prefix) for f in range(factors)]
        return {it: sum(item[idx[it]][f] * mean[f] for f in range(factors)) for it in item_order}

    return predict


# ---------------------------------------------------------------- comparison


def check(model, predict, tiny):
    train, test, train_frame, test_frame = tiny
    td, items = prepare_train(train_frame)
    ed = prepare_test(test_frame, items)
    model.fit(td)
    ids = items.ids.tolist()

    # Score vectors, prediction by prediction, against the reference.
    rows = np.arange(ed.n_predictions)
    raw = model.score(ed.batch(rows))
    ours = (
        raw.toarray()
        if sp.issparse(raw)
        else (raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw))
    )
    sids = ed.sessions.session_ids[ed.session]
    kept = known_test(test, set(ids))
    preds = []
    for r, (s, p) in enumerate(zip(sids.tolist(), ed.position.tolist(), strict=True)):
        ref = predict(kept[s][: p + 1])
        expected = np.array([ref.get(it, 0.0) for it in ids])
        np.testing.assert_allclose(ours[r], expected, rtol=1e-9, atol=1e-12, err_msg=f"session {s} pos {p}")
        preds.append((ref, kept[s][p + 1]))
    assert len(preds) == sum(len(v) - 1 for v in kept.values())

    # Metrics through the shared metric code, in both tie modes, against the reference's own ranks.
    # Sparse scores go through counts -> ranks; force_dense ranks them with target_ranks instead.
    for force_dense in (False, True):
        got = evaluate(model, ed, td.n_items, cutoffs=CUTOFFS, batch_size=7, force_dense=force_dense)
        for mode in ("standard", "conservative"):
            want = ref_metrics(preds, ids, mode)
            for key, value in want.items():
                assert got[mode][key] == pytest.approx(value, abs=1e-12), (mode, key, force_dense)
            assert got[mode]["n"] == len(preds)


def test_pop(tiny):
    train = tiny[0]
    check(make("pop", top_n=4), lambda prefix: ref_pop(train, 4), tiny)


def test_spop(tiny):
    check(make("spop", top_n=3), ref_spop(tiny[0], 3), tiny)


@pytest.mark.parametrize("top_n,alpha", [(3, 0.5), (100, 0.5), (2, 1.0)])
def test_itemknn(tiny, top_n, alpha):
    check(make("itemknn", top_n=top_n, alpha=alpha), ref_itemknn(tiny[0], top_n, alpha=alpha), tiny)


@pytest.mark.parametrize(
    "name,k,sample,similarity,weighting",
    [
        ("sknn", 3, 5, "cosine", "same"),
        ("sknn", 100, 0, "cosine", "same"),
        ("sknn", 4, 8, "jaccard", "same"),
        ("vsknn", 3, 6, "vec", "linear"),
        ("vsknn", 5, 0, "dot", "div"),
        ("vsknn", 2, 10, "cosine", "quadratic"),
    ],
)
def test_sknn(tiny, name, k, sample, similarity, weighting):
    model = make(name, k=k, sample_size=sample, similarity=similarity, weighting=weighting)
    check(model, ref_sknn(tiny[0], tiny[2], k, sample, similarity, weighting), tiny)


def test_bprmf_sequential_sgd(tiny):
    model = make("bprmf", factors=6, epochs=2, lr=0.05, batch_size=1, seed=5, score_dtype="float64")
    check(model, ref_bprmf(tiny[0], tiny[2], factors=6, epochs=2, lr=0.05, seed=5), tiny)


def test_bprmf_minibatch_learns(tiny):
    """Mini-batched SGD (the default) still fits: it ranks training co-occurrence above chance."""
    train_frame = tiny[2]
    td, items = prepare_train(train_frame)
    ed = prepare_test(train_frame, items)
    trained = evaluate(make("bprmf", factors=8, epochs=30, lr=0.05).fit(td), ed, td.n_items, cutoffs=(5,))
    untrained = evaluate(make("bprmf", factors=8, epochs=0).fit(td), ed, td.n_items, cutoffs=(5,))
    assert trained["standard"]["recall@5"] > untrained["standard"]["recall@5"] + 0.05


def test_random_sampling_without_limit_equals_all(tiny):
    td, items = prepare_train(tiny[2])
    ed = prepare_test(tiny[3], items)
    batch = ed.batch(np.arange(ed.n_predictions))
    a = make("sknn", k=4, sample_size=1000, sampling="random").fit(td).score(batch).toarray()
    b = make("sknn", k=4, sample_size=0).fit(td).score(batch).toarray()
    np.testing.assert_array_equal(a, b)


def test_bad_options():
    with pytest.raises(UserError, match="unknown baseline"):
        make("nope")
    with pytest.raises(UserError, match="similarity"):
        make("sknn", similarity="euclid")
    with pytest.raises(UserError, match="bad option"):
        make("pop", bogus=1)
