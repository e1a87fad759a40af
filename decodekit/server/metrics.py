"""Prometheus metrics of one server, in a registry of its own (so one process can hold several apps).

Names follow vLLM's (``vllm:`` becomes ``decodekit:``), so its dashboards work with the prefix changed.
"""

from __future__ import annotations

import time
from itertools import islice

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from decodekit.engine import GenerationStats

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
RECENT_LOSSES = 16  # the learning loss a scrape shows: the mean of the last steps'
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    """Request, latency, token and speculative-decoding counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        p, r = "decodekit:", self.registry
        self.requests = Counter(
            p + "requests",
            "HTTP requests by endpoint and status (499: client left)",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            p + "e2e_request_latency_seconds",
            "Request latency, until the last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "From arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of started generations", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting for a place in the batch", registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests being generated", registry=r)
        self.pool_bytes = Gauge(p + "drafter_pool_bytes", "Bytes held by idle drafters kept for reuse", registry=r)
        self.batch_width = Gauge(
            p + "speculation_width", "Tree nodes per request in the last step (1: no draft)", registry=r
        )
        self.drafts = Counter(p + "spec_decode_num_drafts", "Verification steps that checked a draft", registry=r)
        self.draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter(
            p + "spec_decode_num_accepted_tokens_per_pos",
            "Drafts accepted at least to this depth (0 = first draft token)",
            ["position"],
            registry=r,
        )

        self.learning_steps = Gauge(
            p + "online_learning_steps", "Optimiser steps of a trained part learning from traffic", ["part"], registry=r
        )
        self.learning_loss = Gauge(
            p + "online_learning_loss",
            f"Training loss of a part learning from traffic (mean of its last {RECENT_LOSSES} steps)",
            ["part"],
            registry=r,
        )

    def observe_learning(self, learners: list) -> None:
        """Set the learning gauges from the engine's online learners (``Engine.learners``: methods with ``learn=``)."""
        for learner in learners:
            part = learner.training.kind
            self.learning_steps.labels(part=part).set(learner.steps)
            recent = list(islice(reversed(learner.losses), RECENT_LOSSES))
            if recent:
                self.learning_loss.labels(part=part).set(sum(recent) / len(recent))

    def observe_generation(self, stats: GenerationStats) -> None:
        """Add a finished generation's speculative counters (a step that proposed no token is not a draft)."""
        for proposed, accepted in zip(stats.draft_sizes, stats.accepted_drafts, strict=True):
            if proposed:
                self.drafts.inc()
                self.draft_tokens.inc(proposed)
                self.accepted_tokens.inc(accepted)
                for position in range(accepted):
                    self.accepted_per_pos.labels(position=str(position)).inc()


class MetricsMiddleware:
    """Counts every request by endpoint and status and times it until its last byte (streams included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, complete = time.perf_counter(), "500", False

        async def send_and_watch(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            status, complete = "500", True
            raise
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=status if complete else "499").inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
