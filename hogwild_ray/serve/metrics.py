"""The server's Prometheus metrics: vLLM's names where they mean the same, under `hogwild:`.

Request metrics (running, waiting, time to first token, inter-token latency, end-to-end
latency, tokens) are observed by the HTTP front, which sees every request. Engine metrics
(forward passes, rows per pass, K/V cache use, shared pages) come from the engine replicas'
own counters, which travel with their answers: the front keeps each replica's latest
snapshot and reports their sum, so an existing vLLM dashboard reads the same series.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # no `_created` series beside each counter and histogram (as vLLM's)

PREFIX = "hogwild:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0)
WORKER_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


# a replica reports every few seconds, changed or not (replica.HEARTBEAT_S); one silent for STALE_S is
# gone (replaced by Ray Serve after failed health checks, or scaled down): its gauges leave the sums, its
# counters stay in them
STALE_S = 30.0
# engine.metrics() counters that only grow, and the high-water mark: a gone replica's stay counted
COUNTERS = ("passes", "rows", "sessions", "prompt_pages_reused", "passes_launched_ahead", "launched_ahead_dropped",
            "graph_captures", "graph_capture_seconds")


class EngineSnapshots(Collector):
    """The replicas' latest engine counters (engine.metrics()), summed into Prometheus series: of
    the live replicas for gauges (pages, replicas), of every replica that ever reported for counters
    (so a counter never falls when a replica is replaced)."""

    def __init__(self, stale_s: float = STALE_S) -> None:
        self.stale_s = stale_s
        self._latest: dict[str, tuple[float, dict[str, Any]]] = {}
        self._retired = dict.fromkeys(COUNTERS, 0.0)
        self._retired_max_rows = 0
        self._lock = threading.Lock()

    def update(self, replica: str, metrics: dict[str, Any], now: float | None = None) -> None:
        with self._lock:
            self._latest[replica] = (time.monotonic() if now is None else now, dict(metrics))

    def _live(self, now: float | None) -> list[dict[str, Any]]:
        """The snapshots of replicas heard from within stale_s; the others' counters retired."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for replica, (seen, snap) in list(self._latest.items()):
                if now - seen > self.stale_s:
                    del self._latest[replica]
                    for name, value in _counters(snap).items():
                        self._retired[name] += value
                    self._retired_max_rows = max(self._retired_max_rows, snap["max_rows_per_pass"])
            return [snap for _, snap in self._latest.values()]

    def totals(self, now: float | None = None) -> dict[str, float]:
        snaps = self._live(now)
        count = {name: self._retired[name] + sum(_counters(s)[name] for s in snaps) for name in COUNTERS}
        passes, rows = count["passes"], count["rows"]
        total = sum(s["pages_total"] for s in snaps)
        return {
            "replicas": len(snaps), "passes": passes, "rows": rows, "sessions": count["sessions"],
            "rows_per_pass": rows / passes if passes else 0.0,
            "max_rows_per_pass": max([self._retired_max_rows, *(s["max_rows_per_pass"] for s in snaps)]),
            "pages_used": sum(s["pages_used"] for s in snaps), "pages_total": total,
            "kv_cache_usage": sum(s["pages_used"] for s in snaps) / total if total else 0.0,
            "pages_shared": sum(s["pages_shared"] for s in snaps),
            "prompt_pages_reused": count["prompt_pages_reused"],
            "launched_ahead": count["passes_launched_ahead"],
            "launched_ahead_dropped": count["launched_ahead_dropped"],
            "graph_captures": count["graph_captures"],
            "graph_capture_seconds": count["graph_capture_seconds"],
        }

    def collect(self) -> Iterator[Any]:
        t = self.totals()
        yield CounterMetricFamily(PREFIX + "forward_passes", "Forward passes run by the engines.", t["passes"])
        yield CounterMetricFamily(PREFIX + "pass_rows", "Query rows (tokens) over all forward passes.", t["rows"])
        yield CounterMetricFamily(PREFIX + "pass_sessions", "Sessions summed over all forward passes.",
                                  t["sessions"])
        yield GaugeMetricFamily(PREFIX + "rows_per_pass", "Mean query rows per forward pass.", t["rows_per_pass"])
        yield GaugeMetricFamily(PREFIX + "max_rows_per_pass", "Most query rows in one forward pass.",
                                t["max_rows_per_pass"])
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Fraction of the K/V cache pages in use (1 = full).",
                                t["kv_cache_usage"])
        yield GaugeMetricFamily(PREFIX + "kv_cache_pages_used", "K/V cache pages in use.", t["pages_used"])
        yield GaugeMetricFamily(PREFIX + "kv_cache_pages_total", "K/V cache pages of all engines.",
                                t["pages_total"])
        yield GaugeMetricFamily(PREFIX + "shared_prompt_pages",
                                "K/V pages held by more than one session or fork (read once per pass for all).",
                                t["pages_shared"])
        yield CounterMetricFamily(PREFIX + "prompt_pages_reused",
                                  "Prompt pages taken from other sessions' prompts instead of computed.",
                                  t["prompt_pages_reused"])
        yield CounterMetricFamily(PREFIX + "passes_launched_ahead",
                                  "Forward passes launched before the sessions asked for them, and used.",
                                  t["launched_ahead"])
        yield CounterMetricFamily(PREFIX + "passes_launched_ahead_dropped",
                                  "Passes launched ahead and dropped unused: the sessions asked for another "
                                  "(an injection, a request joining, a fork or a close).", t["launched_ahead_dropped"])
        yield CounterMetricFamily(PREFIX + "cuda_graph_captures",
                                  "CUDA graphs captured: each new pass shape's one-time cost, paid at start (the "
                                  "graph warm-up) or inside the pass that meets it.", t["graph_captures"])
        yield CounterMetricFamily(PREFIX + "cuda_graph_capture_seconds",
                                  "The host's seconds spent capturing CUDA graphs.", t["graph_capture_seconds"])
        yield GaugeMetricFamily(PREFIX + "engine_replicas",
                                f"Engine replicas reporting (heard from within {STALE_S:g} s).", t["replicas"])


def _counters(snap: dict[str, Any]) -> dict[str, float]:
    """One snapshot's counters (rows and sessions from their per-pass means)."""
    out = {name: snap[name] for name in COUNTERS if name not in ("rows", "sessions")}
    passes = snap["passes"]
    return {**out, "rows": snap["rows_per_pass"] * passes, "sessions": snap["sessions_per_pass"] * passes}


class ServerMetrics:
    """Every series the front exposes, in a registry of its own (not the process-global one)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge(PREFIX + "num_requests_running", "Requests whose sessions are running.", registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for K/V pages.", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first generated text.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between text pieces of one worker.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to end.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished sessions.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens the workers generated.", registry=r)
        self.success = Counter(PREFIX + "request_success", "Requests finished, by finish reason.",
                               ["finished_reason"], registry=r)
        self.failed = Counter(PREFIX + "request_failure", "Requests refused or failed, by HTTP status.",
                              ["status"], registry=r)
        self.workers = Histogram(PREFIX + "workers_per_request", "Workers per session of a request.",
                                 buckets=WORKER_BUCKETS, registry=r)
        self.steps = Counter(PREFIX + "steps_finished", "Hogwild! steps the workers finished.", registry=r)
        self.engines = EngineSnapshots()
        r.register(self.engines)

    def render(self) -> bytes:
        return generate_latest(self.registry)
