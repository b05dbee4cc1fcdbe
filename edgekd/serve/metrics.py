"""The service's Prometheus metrics (prometheus-client, one registry per app) and the ASGI middleware that
counts every request by endpoint and status."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENDPOINTS = ("/predict", "/predict/batch", "/health", "/metadata", "/metrics")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServiceMetrics:
    """Requests by endpoint and status, errors (4xx/5xx), request latency, requests in flight, batch sizes,
    inference time, queue depth."""

    def __init__(self, max_batch: int, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgekd_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("edgekd_request_errors", "HTTP requests answered 4xx or 5xx", ["endpoint", "status"],
                              registry=r)
        self.latency = Histogram("edgekd_request_latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("edgekd_requests_in_flight", "HTTP requests being answered", registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_size = Histogram("edgekd_batch_size", "Images per inference call",
                                    buckets=[s for s in sizes if s <= max_batch], registry=r)
        self.inference = Histogram("edgekd_inference_seconds", "Seconds per inference call (a batch)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        Gauge("edgekd_queue_depth", "Images waiting for the model", registry=r).set_function(queue_depth)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)


class MetricsMiddleware:
    """Pure ASGI middleware (no body buffering): latency, status and in-flight count of every HTTP request."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        m = self.metrics
        m.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            m.in_flight.dec()
            m.latency.labels(endpoint).observe(time.perf_counter() - start)
            m.requests.labels(endpoint, str(status["code"])).inc()
            if status["code"] >= 400:
                m.errors.labels(endpoint, str(status["code"])).inc()
