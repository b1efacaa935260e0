"""Prometheus metrics under vLLM's names with a ``leanserve:`` prefix, one registry per app.

Gauges (running/waiting requests, KV-cache usage) and the prefix-cache counters are read at scrape
time from the engine thread's latest stats snapshot; the rest are counted by the HTTP layer as
requests finish.

Cost series (docs/cost.md) come from the server's CostBook at scrape time: billed $ and tokens of
the requests that left the engine (they agree with the ledger), the machine's busy and idle time,
and over two windows ("60s" and "total") utilization, $ per million tokens and the achieved
FLOP/s and weight bandwidth as fractions of the hardware's peak.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from leanserve.cost.accounting import BilledBook, CostBook

COST_WINDOW_S = 60.0

if TYPE_CHECKING:
    from leanserve.engine.async_engine import AsyncEngine, RequestStream
    from leanserve.types import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


def _merged(per_model: Iterable[Iterable[Metric]]) -> Iterator[Metric]:
    """One family per metric name, with every model's samples (a name may appear only once)."""
    families: dict[str, Metric] = {}
    for metrics in per_model:
        for m in metrics:
            if m.name in families:
                families[m.name].samples.extend(m.samples)
            else:
                families[m.name] = m
    yield from families.values()


class _EngineCollector(Collector):
    """Every local model's engine gauges and counters, one family each, a sample per model."""

    def __init__(self, engines: dict[str, AsyncEngine]) -> None:
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        yield from _merged(self._collect_one(model, engine) for model, engine in self.engines.items())

    def _collect_one(self, model: str, engine: AsyncEngine) -> Iterator[Metric]:
        s = engine.stats
        labels = ["model_name"]
        for name, doc, value in (
            ("num_requests_running", "Sequences in the running batch.", s.get("num_running", 0)),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", s.get("num_waiting", 0)),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (1 = full).", s.get("kv_cache_usage", 0.0)),
            ("num_requests_in_flight", "Requests accepted by the server and not finished (leanserve).",
             engine.num_requests_in_flight),
        ):
            g = GaugeMetricFamily(f"leanserve:{name}", doc, labels=labels)
            g.add_metric([model], float(value))
            yield g
        for name, doc, value in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.get("prefix_cache_queries", 0)),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.get("prefix_cache_hits", 0)),
            ("engine_step_failures", "Model steps that raised (their requests failed; serving went on).",
             engine.num_failed_steps),
        ):
            c = CounterMetricFamily(f"leanserve:{name}", doc, labels=labels)
            c.add_metric([model], float(value))
            yield c
        spec = s.get("spec_decode")
        if spec:  # vLLM's spec_decode names
            for name, doc, key in (
                ("spec_decode_num_drafts", "Sequence-steps that verified drafts.", "num_drafts"),
                ("spec_decode_num_draft_tokens", "Draft tokens verified.", "num_draft_tokens"),
                ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", "num_accepted_tokens"),
                ("spec_decode_propose_seconds", "Time spent proposing drafts (leanserve).", "propose_seconds"),
                ("spec_decode_verify_seconds", "Time of the steps that verified drafts (leanserve).", "verify_seconds"),
            ):
                c = CounterMetricFamily(f"leanserve:{name}", doc, labels=labels)
                c.add_metric([model], float(spec[key]))
                yield c
            c = CounterMetricFamily("leanserve:spec_decode_num_accepted_tokens_per_pos",
                                    "Draft tokens accepted, by position in the draft.", labels=[*labels, "position"])
            for pos, n in enumerate(spec["accepted_per_pos"]):
                c.add_metric([model, str(pos)], float(n))
            yield c
            for name, doc, key in (
                ("spec_decode_acceptance_rate", "Accepted / verified draft tokens since start (leanserve).",
                 "acceptance_rate"),
                ("spec_decode_mean_acceptance_length", "Tokens per verifying sequence-step: accepted + 1 (leanserve).",
                 "mean_acceptance_length"),
            ):
                g = GaugeMetricFamily(f"leanserve:{name}", doc, labels=labels)
                g.add_metric([model], float(spec[key]))
                yield g


class _CostCollector(Collector):
    """Every model's billed figures (and, for local models, its machine's), a sample per model."""

    def __init__(self, books: dict[str, BilledBook]) -> None:
        self.books = books

    def collect(self) -> Iterator[Metric]:
        yield from _merged(self._collect_one(model, book) for model, book in self.books.items())

    def _collect_one(self, m: str, book: BilledBook) -> Iterator[Metric]:
        total = book.report(None)
        window = book.report(COST_WINDOW_S)

        def counter(name: str, doc: str, value: float, extra: dict[str, str] | None = None) -> Metric:
            c = CounterMetricFamily(f"leanserve:{name}", doc, labels=["model_name", *(extra or {})])
            c.add_metric([m, *(extra or {}).values()], float(value))
            return c

        yield counter("cost_usd", "Dollars billed to requests that left the engine (the ledger's sum).", total["usd"])
        yield counter("cost_requests", "Requests billed (finished, aborted or failed after reaching the engine).",
                      total["requests"])
        tok = CounterMetricFamily("leanserve:cost_tokens", "Tokens of billed requests (input includes cached).",
                                  labels=["model_name", "kind"])
        for kind in ("input", "cached", "output"):
            tok.add_metric([m, kind], float(total["tokens"][kind]))
        yield tok
        saved = CounterMetricFamily("leanserve:saved_usd", "What each lever saved against the same requests without "
                                    "it (receipts; routing is negative when a cascade escalated).",
                                    labels=["model_name", "lever"])
        for lever in ("prefix_cache", "response_cache", "routing"):
            saved.add_metric([m, lever], float(total["saved"][lever]))
        yield saved
        yield counter("response_cache_hits", "Requests answered from the response cache ($0).", total["cache_hits"])
        g = GaugeMetricFamily("leanserve:cost_per_million_tokens", "$ per million tokens of billed requests "
                              "(input: prompt tokens, cached included; output: generated; NaN: no tokens).",
                              labels=["model_name", "kind", "window"])
        for label, r in (("60s", window), ("total", total)):
            for kind in ("input", "output", "total"):
                v = r["usd_per_million_tokens"][kind]
                g.add_metric([m, kind, label], float("nan") if v is None else float(v))
        yield g
        if not isinstance(book, CostBook):  # an upstream: no machine of ours
            return
        basis = book.basis
        yield counter("machine_busy_seconds", "Engine step time (the time billed to requests).", total["busy_seconds"])
        yield counter("machine_idle_seconds", "Wall time with no engine step (paid for, billed to no request).",
                      total["idle_seconds"])
        info = GaugeMetricFamily("leanserve:price_per_hour_usd", "The price basis: $ per machine hour.",
                                 labels=["model_name", "hardware", "default_price"])
        info.add_metric([m, basis.hardware.name, str(basis.default_price).lower()], basis.price_per_hour)
        yield info
        gauges = {
            "utilization": ("Busy seconds / wall seconds.", lambda r: r["utilization"]),
            "achieved_flops_per_second": ("2 x parameters x tokens computed / busy seconds.",
                                          lambda r: r["achieved"]["flops_per_second"]),
            "achieved_flops_fraction": ("Achieved FLOP/s / the hardware's peak for the dtype in use.",
                                        lambda r: r["achieved"]["flops_fraction_of_peak"]),
            "achieved_weight_bandwidth_bytes_per_second": ("Weight bytes x steps / busy seconds.",
                                                           lambda r: r["achieved"]["weight_bytes_per_second"]),
            "achieved_bandwidth_fraction": ("Achieved weight bandwidth / the hardware's peak memory bandwidth.",
                                            lambda r: r["achieved"]["bandwidth_fraction_of_peak"]),
        }
        for name, (doc, get) in gauges.items():
            g = GaugeMetricFamily(f"leanserve:{name}", doc, labels=["model_name", "window"])
            for label, r in (("60s", window), ("total", total)):
                v = get(r)
                g.add_metric([m, label], float("nan") if v is None else float(v))
            yield g


class ServerMetrics:
    """One registry for the whole server; every series carries its model's name."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self.prompt_tokens = Counter("leanserve:prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter("leanserve:generation_tokens", "Generated tokens of finished requests.", m,
                                         registry=r)
        self.request_success = Counter("leanserve:request_success", "Finished requests by finish reason "
                                       "(abort: the client went away or the request timed out).",
                                       m + ["finished_reason"], registry=r)
        self.request_failure = Counter("leanserve:request_failure", "Requests answered with an error, by kind "
                                       "(invalid, rejected, timeout, engine, upstream).", m + ["reason"], registry=r)
        self.ttft = Histogram("leanserve:time_to_first_token_seconds", "Request arrival to its first output.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("leanserve:time_per_output_token_seconds", "Per request: (e2e - ttft) / (tokens - 1).",
                              m, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("leanserve:e2e_request_latency_seconds", "Request arrival to its last output.", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("leanserve:request_queue_time_seconds", "Request arrival to its first scheduling.",
                                    m, buckets=LATENCY_BUCKETS, registry=r)
        self._engines: dict[str, AsyncEngine] = {}
        self._books: dict[str, BilledBook] = {}
        self.registry.register(_EngineCollector(self._engines))
        self.registry.register(_CostCollector(self._books))

    def add_model(self, model: str, engine: AsyncEngine | None = None, book: BilledBook | None = None) -> ModelMetrics:
        """Export a model's series (engine: a local model's; book: its cost figures); the handle its
        handlers count requests through."""
        if engine is not None:
            self._engines[model] = engine
        if book is not None:
            self._books[model] = book
        for reason in ("stop", "length", "abort"):  # export zeros so dashboards see the series from the start
            self.request_success.labels(model, reason)
        for reason in ("invalid", "rejected", "timeout", "engine"):
            self.request_failure.labels(model, reason)
        return ModelMetrics(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """A model's view of the server's metrics: what its request handlers count."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model

    def failure(self, reason: str) -> None:
        self.metrics.request_failure.labels(self.model, reason).inc()

    def finished(self, stream: RequestStream, out: RequestOutput | None, finished_reason: str, now: float) -> None:
        """Record one request that ended (completed, or aborted after it was accepted)."""
        m, s = self.model, self.metrics
        if out is not None:
            s.prompt_tokens.labels(m).inc(out.num_prompt_tokens)
            s.generation_tokens.labels(m).inc(out.num_generated_tokens)
        s.request_success.labels(m, finished_reason).inc()
        if stream.queue_time is not None:
            s.queue_time.labels(m).observe(stream.queue_time)
        if finished_reason == "abort" or out is None:
            return
        e2e = now - stream.arrival_time
        s.e2e.labels(m).observe(e2e)
        if stream.first_output_time is not None:
            ttft = stream.first_output_time - stream.arrival_time
            s.ttft.labels(m).observe(ttft)
            n = max(len(c.token_ids) for c in out.outputs) if out.outputs else 0
            if n > 1:
                s.tpot.labels(m).observe((e2e - ttft) / (n - 1))
