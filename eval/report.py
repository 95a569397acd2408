"""Markdown for people: the benchmark table (the 2016 paper's Table 1 / 3 layout) and the nightly summary."""

from __future__ import annotations

from collections.abc import Sequence

HEADLINE = ("recall@20", "mrr@20")
# The GRU4Rec parameters a report lists for each model (the rest are in results.json / the metadata).
KEY_PARAMS = ("loss", "layers", "embedding", "batch_size", "learning_rate", "momentum", "n_sample", "logq",
              "dropout_p_embed", "dropout_p_hidden", "n_epochs", "optimizer")  # fmt: skip
# Baselines trained for fewer epochs than their defaults are under-trained: the report says so.
EPOCH_DEFAULTS = {"bprmf": 10}


def settings_text(settings: dict) -> str:
    """`key=value` pairs of a model's settings, in the order given."""
    return ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None) or "defaults"


def weak_setting_note(kind: str, settings: dict) -> str:
    """Why a baseline may score below what it can do, from its settings (empty when nothing stands out)."""
    default = EPOCH_DEFAULTS.get(kind)
    epochs = settings.get("epochs")
    if default is not None and isinstance(epochs, int) and epochs < default:
        return (
            f" Trained {epochs} epochs here, fewer than its default {default}: it is under-trained, its figures "
            "are a lower bound (it may score below POP), not a fair estimate of the method."
        )
    return ""


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:+.1f}%"


def _secs(x: float | None) -> str:
    return "–" if x is None else (f"{x:.2f} s" if x < 100 else f"{x:,.0f} s")


def best_baseline(rows: Sequence[dict], mode: str, metric: str) -> dict | None:
    base = [r for r in rows if r["baseline"]]
    return max(base, key=lambda r: r["metrics"][mode][metric]) if base else None


def relative_change(value: float, reference: float) -> float | None:
    return None if not reference else 100.0 * (value - reference) / reference


def _method_label(row: dict) -> str:
    """GRU4Rec rows stand out in bold; the kind is added only when the name does not already say it."""
    if row["baseline"]:
        return row["model"]
    return f"**{row['model']}**" + ("" if "gru4rec" in row["model"].lower() else " (GRU4Rec)")


def benchmark_markdown(results: dict) -> str:
    mode, other = results["headline_mode"], [m for m in results["tie_modes"] if m != results["headline_mode"]]
    lines = [
        "# Benchmark: GRU4Rec and baselines",
        "",
        f"Generated {results['created']} with gru4rec {results['versions'].get('gru4rec', '?')} "
        f"on {results['host']}.",
        "",
        f"Next-item prediction over all items; Recall@20 and MRR@20 in tie mode **{mode}** "
        "(rank = 1 + number of items scoring strictly higher than the target; hit when rank ≤ 20).",
        "Δ = change relative to the best baseline for that metric (the 2016 paper's Table 3 layout).",
    ]
    if other:
        lines.append(
            f"Also shown: the **{other[0]}** tie mode (rank = number of items scoring at least as high), "
            "which does not flatter models that give many items the same score: baselines score most "
            "items exactly 0 (POP and S-POP rank only 100 items, Item-KNN 100 neighbours), so a target "
            "outside their lists can still land inside the top 20 in standard mode when fewer than 20 "
            "items score above 0. A gap between the two modes measures how much of a score comes from ties."
        )
    for ds, info in results["datasets"].items():
        rows = [r for r in results["results"] if r["dataset"] == ds]
        if not rows:
            continue
        lines += ["", f"## {ds}", ""]
        lines.append(
            f"train: {info['n_train_events']:,} events, {info['n_train_sessions']:,} sessions, "
            f"{info['n_items']:,} items · test: {info['n_predictions']:,} predictions "
            f"({info['n_test_sessions']:,} sessions, {info['n_unknown_dropped']:,} events of unknown items dropped)"
        )
        refs = {m: best_baseline(rows, mode, m) for m in HEADLINE}
        if all(refs.values()):
            lines.append(
                f"Best baseline: {refs['recall@20']['model']} (Recall@20), {refs['mrr@20']['model']} (MRR@20)."
            )
        lines.append("")
        head = ["Method", "Recall@20", "MRR@20", "NDCG@20", "ΔRecall@20", "ΔMRR@20"]
        head += [h for o in other[:1] for h in (f"Recall@20 ({o})", f"MRR@20 ({o})")]
        head += ["fit / train", "evaluation"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            m = r["metrics"][mode]
            cells = [
                _method_label(r),
                _f(m["recall@20"]),
                _f(m["mrr@20"]),
                _f(m.get("ndcg@20")),
            ]
            for metric in HEADLINE:
                ref = refs[metric]
                same = ref is not None and ref is r
                cells.append(
                    "best"
                    if same
                    else _pct(relative_change(m[metric], ref["metrics"][mode][metric]) if ref else None)
                )
            for o in other[:1]:
                cells += [_f(r["metrics"][o]["recall@20"]), _f(r["metrics"][o]["mrr@20"])]
            cells += [_secs(r.get("fit_s")), _secs(r.get("eval_s"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"![Recall@k and MRR@k on {ds}]({results['plots'][ds]['curves']})"]
        for r in rows:
            for kind, label in (("latency", "scorer latency"), ("training", "training loss")):
                p = r.get("plots", {}).get(kind)
                if p:
                    lines += ["", f"![{r['model']} {label} on {ds}]({p})"]
            lat = r.get("latency")
            if lat:
                lines.append(
                    f"\n{r['model']} scorer ({lat.get('provider', '?')}, {lat.get('device', '?')}, batch "
                    f"{lat.get('batch_size', '?')}): step p50 {_f(lat.get('step_ms_p50'), 3)} ms, p95 "
                    f"{_f(lat.get('step_ms_p95'), 3)} ms, p99 {_f(lat.get('step_ms_p99'), 3)} ms, "
                    f"{lat.get('events_per_s', float('nan')):,.0f} events/s."
                )
    lines += ["", "## Methods", ""]
    for r in results["results"]:
        if r["dataset"] == next(iter(results["datasets"])):
            settings = r.get("settings") or {}
            lines.append(
                f"- **{r['model']}** ({r['kind']}): {r.get('description', '')}. Settings: "
                f"{settings_text(settings)}.{weak_setting_note(r['kind'], settings)}"
            )
    return "\n".join(lines) + "\n"


def nightly_markdown(summary: dict, plots: dict[str, str]) -> str:
    cur = summary["current"]
    verdict = "REGRESSION" if summary["regressions"] else "PROMOTED" if summary.get("promoted") else "OK"
    lines = [
        f"# Nightly evaluation — {verdict}",
        "",
        f"Run `{cur['run_id']}` at {cur['time']} · model `{cur.get('model', '?')}` · data `{cur.get('test', '?')}` "
        f"· tie mode {cur.get('tie_mode', '?')} · {summary['n_runs']} run(s) in the history.",
        "",
    ]
    if summary["regressions"]:
        lines += ["## Regressions", ""] + [f"- {r}" for r in summary["regressions"]] + [""]
    if summary.get("latency_inconclusive"):
        lines += [f"Latency inconclusive ({', '.join(summary['latency_inconclusive'])}): repeats of one model "
                  "spread wider than the tolerance, or no model was run twice to measure the spread across "
                  "runs; reported, not a failure.", ""]  # fmt: skip
    if summary.get("promoted"):
        p = summary["promoted"]
        kept = (
            f" (previous champion kept as {', '.join(p['previous'])})"
            if p["previous"]
            else " (first champion)"
        )
        lines += [f"Promoted: the challenger {p['from']} is now the champion {p['champion']}{kept}.", ""]
    w = summary.get("window")
    if w:
        lines += [
            "## Window",
            "",
            f"As of {w['as_of']}: train {w['window_start']} .. {w['window_boundary']} ({w['train_days']} day(s); "
            f"{w['n_train_events']:,} events, {w['n_train_sessions']:,} sessions, {w['n_train_items']:,} items); "
            f"test from {w['window_boundary']} to {w['window_end']} ({w['test_days']} day(s); "
            f"{w['n_window_test_events']:,} events, {w['n_window_test_sessions']:,} sessions; "
            f"{w['n_test_dropped_unseen']:,} test events dropped: items unseen in training, then sessions "
            f"left too short). {w['n_files_read']} file(s) read.",
            "",
        ]
        if str(w.get("as_of_reason", "")).startswith("latest"):
            lines += [f"as_of {w['as_of_reason']}.", ""]
        if w.get("empty_test_days"):
            lines += [f"**Test day(s) without events: {w['empty_test_days']}** (as_of beyond the log?).", ""]
    champ = summary.get("champion")
    if champ:
        lines += ["## Challenger vs champion (same test sessions)", "",
                  "| figure | challenger | champion | Δ | verdict |", "|---|---|---|---|---|"]  # fmt: skip
        for c in summary["table"]:
            if "champion" in c:
                cur = c.get("challenger_paired", c["current"])
                verdict = c.get("verdict", "regression" if c.get("regressed") else "ok")
                if "pairs" in c:
                    verdict += f" (slower in {c['slower_pairs']}/{c['pairs']} pairs; spread {_f(c['spread'])} ms, allowed {_f(c['allowed'])} ms)"
                lines.append(
                    f"| {c['name']} | {_f(cur)} | {_f(c['champion'])} | {_pct(c.get('champion_change'))} | {verdict} |"
                )
        lines += ["", f"Champion: `{champ.get('model')}`. Latency figures here are medians of the interleaved "
                  "repeats (champion and challenger timed alternately in one process, after the same warm-up).", ""]  # fmt: skip
    lines += ["## This run against earlier runs", ""]
    lines += [
        "| figure | this run | previous | change | reference | change | reference is | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["table"]:
        gate = "trend" if c.get("verdict") == "trend" or "pairs" in c else c.get("verdict", "–")
        lines.append(
            f"| {c['name']} | {_f(c['current'])} | {_f(c.get('previous'))} | {_pct(c.get('previous_change'))} "
            f"| {_f(c.get('reference'))} | {_pct(c.get('reference_change'))} | {c.get('reference_kind', '–')} | {gate} |"
        )
    lines += ["", "Tolerances: " + summary["tolerances"], ""]
    if summary.get("model_settings"):
        lines += [f"Model settings: {settings_text(summary['model_settings'])}.", ""]
    for title, path in plots.items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)
