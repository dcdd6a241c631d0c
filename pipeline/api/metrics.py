"""Prometheus metrics, one registry per app (so several apps can live in one process, e.g. in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ApiMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "raglora_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "raglora_http_request_duration_seconds",
            "HTTP request latency (streams: until the last byte)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("raglora_inflight_requests", "HTTP requests being served", registry=r)
        self.completions = Counter(
            "raglora_chat_completions", "Chat completions by model and streaming", ["model", "stream"], registry=r
        )
        self.ttft = Histogram(
            "raglora_time_to_first_token_seconds", "Time to first token", ["mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.generation = Histogram(
            "raglora_generation_seconds", "Request time in generation", ["mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("raglora_prompt_tokens", "Prompt tokens", ["mode"], registry=r)
        self.completion_tokens = Counter("raglora_completion_tokens", "Generated tokens", ["mode"], registry=r)
        self.handoffs = Counter("raglora_handoffs", "Hand-offs to a person", ["reason"], registry=r)
        self.batch_size = Histogram(
            "raglora_batch_size",
            "Rows per decode step of the continuous batcher",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.rate_limited = Counter("raglora_rate_limited", "Requests refused by the rate limit", registry=r)
        self.auth_failures = Counter("raglora_auth_failures", "Requests with a missing or wrong API key", registry=r)
        self.ready = Gauge("raglora_ready", "1 when the model and index are loaded", registry=r)

    def observe_batch(self, size: int, stage: str | None, seconds: float) -> None:
        self.batch_size.observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
