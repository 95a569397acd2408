"""Latency figures of a scoring run: per-step percentiles, throughput, wall time by phase.

Step times are taken around `backend.step`, which returns host arrays: every timed step therefore
ends device-synchronised, whatever the backend.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@dataclass
class LatencyRecorder:
    """Collects step times and phase wall times; `report()` gives the metrics-JSON `latency` dict."""

    phases: dict[str, float] = field(default_factory=lambda: {"load": 0.0, "replay": 0.0, "write": 0.0})
    steps: list[np.ndarray] = field(default_factory=list)
    widths: list[np.ndarray] = field(default_factory=list)  # rows per step (its batch bucket)
    full: list[np.ndarray] = field(default_factory=list)  # per step: did it run its replay's whole batch

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    def add_steps(
        self, seconds: np.ndarray, widths: np.ndarray | None = None, batch: int | None = None
    ) -> None:
        """Step times, each step's batch width (unknown: 0) and the replay's batch (its full width).

        A shard of a distributed run replays with its own batch (never more than its sessions), so
        "full" is decided here, where the batch is known, not later against a configured size."""
        seconds = np.asarray(seconds, dtype=np.float64)
        widths = np.zeros(len(seconds), np.int64) if widths is None else np.asarray(widths, np.int64)
        self.steps.append(seconds)
        self.widths.append(widths)
        self.full.append(widths == batch if batch is not None else np.zeros(len(seconds), bool))

    def merge(self, other: LatencyRecorder) -> LatencyRecorder:
        """Add another recorder's steps and phase times (phases become worker-seconds)."""
        self.steps += other.steps
        self.widths += other.widths
        self.full += other.full
        for name, seconds in other.phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + seconds
        return self

    def state(self) -> dict:
        """Plain lists and floats: what a remote worker sends back."""
        cat = lambda parts, dtype: np.concatenate(parts).tolist() if parts else np.zeros(0, dtype).tolist()  # noqa: E731
        return {"steps": cat(self.steps, np.float64), "widths": cat(self.widths, np.int64),
                "full": cat(self.full, bool), "phases": dict(self.phases)}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict) -> LatencyRecorder:
        return cls(
            phases={k: float(v) for k, v in state["phases"].items()},
            steps=[np.asarray(state["steps"], np.float64)],
            widths=[np.asarray(state["widths"], np.int64)],
            full=[np.asarray(state["full"], bool)],
        )

    def report(self, n_events: int, n_sessions: int, **run_info) -> dict:
        steps = np.concatenate(self.steps) if self.steps else np.zeros(0)
        p50, p95, p99 = (np.percentile(steps, [50, 95, 99]) * 1e3) if len(steps) else (float("nan"),) * 3
        replay = self.phases["replay"]
        # Steps whose batch has shrunk (the tail of every chunk) are fast and few, and how many there
        # are depends on the data, so percentiles over all steps jump between runs of an unchanged
        # model. Stable figures: percentiles over full-batch steps only, and the time per scored
        # event with every step counted at the median time of the steps of its batch width (one
        # stalled step moves a median, not the figure).
        widths = np.concatenate(self.widths) if self.widths else np.zeros(0, np.int64)
        full = steps[np.concatenate(self.full)] if self.full else steps[:0]
        f50, f95 = (np.percentile(full, [50, 95]) * 1e3) if len(full) else (float("nan"),) * 2
        robust = sum(np.median(steps[widths == w]) * np.sum(widths == w) for w in np.unique(widths))
        return {
            "step_ms_p50": float(p50),
            "step_ms_p95": float(p95),
            "step_ms_p99": float(p99),
            "events_per_s": n_events / replay if replay > 0 else float("nan"),
            "sessions_per_s": n_sessions / replay if replay > 0 else float("nan"),
            "load_s": self.phases["load"],
            "replay_s": replay,
            "write_s": self.phases["write"],
            "n_steps": int(len(steps)),
            "full_step_ms_p50": float(f50),
            "full_step_ms_p95": float(f95),
            "n_full_steps": int(len(full)),
            "ms_per_1k_events": 1e6 * robust / n_events if n_events and len(steps) else float("nan"),
            **run_info,
        }


def latency_table_rows(lat: dict) -> list[tuple[str, str]]:
    """(label, value) rows for the terminal table."""
    return [
        ("provider", f"{lat['provider']} ({lat['device']})"),
        ("mode / batch", f"{lat['mode']} / {lat['batch_size']}"),
        (
            "step p50 / p95 / p99",
            f"{lat['step_ms_p50']:.3f} / {lat['step_ms_p95']:.3f} / {lat['step_ms_p99']:.3f} ms",
        ),
        (
            "full-batch steps p50 / p95",
            f"{lat['full_step_ms_p50']:.3f} / {lat['full_step_ms_p95']:.3f} ms ({lat['n_full_steps']} steps)",
        ),
        ("replay time per 1,000 scored events", f"{lat['ms_per_1k_events']:.2f} ms"),
        ("scored events/s", f"{lat['events_per_s']:,.0f}"),
        ("sessions/s", f"{lat['sessions_per_s']:,.0f}"),
        (
            "wall: load / replay / write",
            f"{lat['load_s']:.2f} / {lat['replay_s']:.2f} / {lat['write_s']:.2f} s",
        ),
    ]
