"""Prometheus metrics of one engine, in a registry of its own so several engines (or tests) never collide.
Serve them with ``prometheus_client.start_http_server(port, registry=metrics.registry)`` or scrape
``metrics.render()`` from an existing endpoint."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.lookups = Counter("kvtier_lookup_chunks", "Chunks looked up, by tier that held them (or miss)",
                               ["tier", "result"], registry=r)
        self.bytes_moved = Counter("kvtier_bytes_moved", "Bytes moved, by direction", ["direction"], registry=r)
        self.evictions = Counter("kvtier_evictions", "Chunks evicted from a tier", ["tier"], registry=r)
        self.demotions = Counter("kvtier_demotions", "Chunks written to a lower tier on eviction", ["src", "dst"],
                                 registry=r)
        self.errors = Counter("kvtier_errors", "Failed tier operations (each became a miss or a skipped write)",
                              ["tier", "op"], registry=r)
        self.recomputed = Counter("kvtier_deadline_misses", "Chunks recomputed because a tier missed its deadline",
                                  ["tier"], registry=r)
        self.queue_depth = Gauge("kvtier_queue_depth", "Operations in flight per tier", ["tier"], registry=r)
        self.pinned_bytes = Gauge("kvtier_pinned_bytes", "Bytes held under pin leases per tier", ["tier"], registry=r)
        self.resident_bytes = Gauge("kvtier_resident_bytes", "Bytes held per tier", ["tier"], registry=r)

    def render(self) -> bytes:
        """The text exposition format, for an existing HTTP endpoint."""
        return generate_latest(self.registry)
