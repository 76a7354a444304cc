"""Prometheus metrics (``[mount] metrics = "127.0.0.1:9488"``) from the status report.

The same report ``imagefs status`` prints, rendered at each scrape by a collector (no second
set of counters to keep in step), served by prometheus_client's HTTP server in its own thread,
so a scrape never waits on the FUSE loop. Only store ids label the series: no image names
(unbounded cardinality) and no credentials.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

Report = dict[str, Any]


class _ReportCollector(Collector):
    def __init__(self, make_report: Callable[[], Report]) -> None:
        self.make_report = make_report

    def collect(self) -> Iterator[Any]:
        r = self.make_report()
        stores = r["stores"]

        def per_store(cls: Any, name: str, doc: str, key: str) -> Any:
            m = cls(name, doc, labels=["store"])
            for sid, s in stores.items():
                m.add_metric([sid], s[key])
            return m

        yield per_store(CounterMetricFamily, "imagefs_store_read_bytes",
                        "Bytes served to readers.", "read_bytes")
        yield per_store(CounterMetricFamily, "imagefs_store_written_bytes",
                        "Bytes writers handed to the mount.", "written_bytes")
        yield per_store(CounterMetricFamily, "imagefs_store_requests",
                        "Backend calls made.", "requests")
        errors = CounterMetricFamily("imagefs_store_errors", "Backend calls that failed, by "
                                     "the errno the caller got.", labels=["store", "errno"])
        hits = CounterMetricFamily("imagefs_cache_hits", "Block lookups a cache tier served.",
                                   labels=["store", "tier"])
        misses = CounterMetricFamily("imagefs_cache_misses", "Block lookups a cache tier did "
                                     "not hold.", labels=["store", "tier"])
        handles = GaugeMetricFamily("imagefs_open_handles", "Files open on the store.",
                                    labels=["store"])
        uploads = GaugeMetricFamily("imagefs_uploads_in_flight", "Images being written, not "
                                    "yet published.", labels=["store"])
        pending = GaugeMetricFamily("imagefs_upload_pending_bytes", "Bytes of the images "
                                    "being written so far.", labels=["store"])
        for sid, s in stores.items():
            for code, n in s["errors"].items():
                errors.add_metric([sid, code], n)
            for tier, c in s["cache"].items():
                hits.add_metric([sid, tier], c["hits"])
                misses.add_metric([sid, tier], c["misses"])
            handles.add_metric([sid], s.get("open_handles", 0))
            ups = s.get("uploads", [])
            uploads.add_metric([sid], len(ups))
            pending.add_metric([sid], sum(u["bytes"] for u in ups))
        yield from (errors, hits, misses, handles, uploads, pending)
        yield GaugeMetricFamily("imagefs_start_time_seconds", "When the mount started, "
                                "seconds since the epoch.", value=r["started"])
        yield GaugeMetricFamily("imagefs_resident_memory_bytes", "Resident memory of the "
                                "daemon.", value=r["rss_bytes"])


def start(host: str, port: int, make_report: Callable[[], Report]) -> Any:
    """Serve the metrics on ``host:port``; returns the server (``.shutdown()`` stops it).
    Raises OSError when the address cannot be bound."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReportCollector(make_report))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
