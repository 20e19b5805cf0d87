"""Prometheus metrics of one server: the batcher's running totals (read at scrape time, so they
are exactly the batcher's counters), its queue, and latency histograms (docs/server.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds; the same spread for both, from a fast GPU step to a long CPU prefill.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class _BatcherCollector:
    """Counters and gauges taken from the batcher when /metrics is read."""

    def __init__(self, batcher, model_name: str) -> None:
        self.batcher, self.model_name = batcher, model_name

    def describe(self):
        return []

    def collect(self):
        b, c, labels = self.batcher, self.batcher.counters, [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=["model_name"])
            m.add_metric(labels, value)
            return m

        yield gauge("resa_num_requests_running", "Requests holding a slot (prefilling or decoding).", b.num_running)
        yield gauge("resa_num_requests_waiting", "Requests queued for a slot.", b.num_waiting)
        yield gauge("resa_kv_blocks_in_use", "KV pool blocks held by requests.", b.blocks_in_use())
        yield counter("resa_prompt_tokens", "Prompt tokens of admitted requests.", c.prompt_tokens)
        yield counter("resa_generation_tokens", "Tokens generated (EOS not counted).", c.generation_tokens)
        yield counter("resa_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache.",
                      c.prefix_cache_hit_tokens)
        yield counter("resa_rectification_passes", "Dense rectification window passes (each may serve several "
                      "requests).", c.rectification_passes)
        yield counter("resa_rectifications", "Request windows rectified.", c.rectifications)
        yield counter("resa_kv_tokens_read", "KV tokens the decode attention read.", c.kv_tokens_read)
        yield counter("resa_kv_tokens_dense", "KV tokens dense decoding would have read.", c.kv_tokens_dense)
        yield gauge("resa_kv_read_fraction", "kv_tokens_read / kv_tokens_dense since start (1 before any decode).",
                    c.kv_tokens_read / c.kv_tokens_dense if c.kv_tokens_dense else 1.0)
        yield counter("resa_iterations", "Batcher iterations.", c.iterations)


class ServerMetrics:
    """A registry of its own per app (several apps in one process do not collide)."""

    def __init__(self, batcher, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_BatcherCollector(batcher, model_name))
        self.model_name = model_name
        kw = {"labelnames": ["model_name"], "registry": self.registry}
        self.ttft = Histogram("resa_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_TTFT_BUCKETS, **kw).labels(model_name)
        self.itl = Histogram("resa_inter_token_latency_seconds", "Time between two tokens of a request.",
                             buckets=_ITL_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram("resa_e2e_request_latency_seconds", "Arrival to the last token.",
                             buckets=_E2E_BUCKETS, **kw).labels(model_name)
        self.finished = Counter("resa_request_success", "Finished requests by OpenAI finish reason.",
                                labelnames=["model_name", "finish_reason"], registry=self.registry)
        self.http = Counter("resa_http_requests", "HTTP requests by status code.",
                            labelnames=["model_name", "status"], registry=self.registry)

    def observe(self, name: str, seconds: float) -> None:
        """The batcher's `observe` hook (called on its thread)."""
        (self.ttft if name == "ttft" else self.itl).observe(seconds)
