"""The server's Prometheus metrics, in a registry of their own (one per server, so several
servers in one process, as in the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
"""Upper bounds of the batch size histogram (sequences per decoded batch)."""


class ServerMetrics:
    """Requests, errors, batch sizes, forward passes and generated tokens of one server."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dgpt_requests", "API requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("dgpt_errors", "API requests answered with an error, by error type",
                              ["type"], registry=self.registry)
        self.batch_size = Histogram("dgpt_batch_size", "Sequences (requests x n) decoded together per batch",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("dgpt_batch_requests", "Requests decoded together per batch",
                                        buckets=BATCH_BUCKETS, registry=self.registry)
        self.forward_passes = Counter("dgpt_forward_passes", "Model forward passes of all batches",
                                      registry=self.registry)
        self.generated_tokens = Counter("dgpt_generated_tokens", "Answer tokens generated",
                                        registry=self.registry)
        self.decode_seconds = Counter("dgpt_decode_seconds", "Seconds spent decoding batches",
                                      registry=self.registry)
        self.tokens_per_second = Gauge("dgpt_tokens_per_second", "Answer tokens per second of the last batch",
                                       registry=self.registry)
        self.queued = Gauge("dgpt_queued_requests", "Requests waiting for a batch", registry=self.registry)

    def count_request(self, endpoint: str, status: int, error_type: str | None = None) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        if error_type is not None:
            self.errors.labels(type=error_type).inc()

    def count_batch(self, sequences: int, requests: int, nfe: int, tokens: int, seconds: float) -> None:
        """Record one decoded batch."""
        self.batch_size.observe(sequences)
        self.batch_requests.observe(requests)
        self.forward_passes.inc(nfe)
        self.generated_tokens.inc(tokens)
        self.decode_seconds.inc(seconds)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
