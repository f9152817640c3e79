"""Prometheus metrics in the text exposition format (no client library needed)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            acc += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {acc}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Counters and histograms updated by the serving loop; gauges come from a callback."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft = Histogram("tokenspeed_time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = Histogram("tokenspeed_inter_token_latency_seconds", "Time between tokens.", ITL_BUCKETS)
        self.counters = {
            "tokenspeed_requests_total": 0,
            "tokenspeed_requests_rejected_total": 0,
            "tokenspeed_prompt_tokens_total": 0,
            "tokenspeed_cached_prompt_tokens_total": 0,
            "tokenspeed_generation_tokens_total": 0,
        }
        # more exposition lines, read at each scrape (speculative decoding's acceptance stats)
        self.sources: list[Callable[[], list[str]]] = []

    def inc(self, name: str, value: int = 1) -> None:
        with self.lock:
            self.counters[name] += value

    def render(self, gauges: dict[str, float]) -> str:
        with self.lock:
            lines = []
            for name, value in self.counters.items():
                lines += [f"# TYPE {name} counter", f"{name} {value}"]
            for name, value in gauges.items():
                lines += [f"# TYPE {name} gauge", f"{name} {value}"]
            lines += self.ttft.render() + self.itl.render()
            for source in self.sources:
                lines += source()
        return "\n".join(lines) + "\n"
