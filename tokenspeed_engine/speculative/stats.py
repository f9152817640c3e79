"""Acceptance statistics of speculative decoding, engine-wide (for /metrics) and per request.

The acceptance length of one verify is the number of tokens it emitted for a request:
accepted drafts + 1 (the corrected or bonus token), so 1 .. k+1. Its mean is the speed-up
over plain decoding in target forwards.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class RequestSpecStats:
    """One request's drafting so far."""

    verify_steps: int = 0  # target verify forwards that included the request
    draft_tokens: int = 0  # drafts proposed (k per verify)
    accepted_tokens: int = 0  # drafts accepted

    @property
    def acceptance_length(self) -> float:
        """Tokens emitted per verify (accepted + 1), 0 before the first verify."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0


class SpecStats:
    """Engine-wide counters and the histogram of acceptance lengths; read by other threads."""

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self._lock = threading.Lock()
        self.verify_steps = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.emitted_tokens = 0  # tokens the verifies produced (before EOS / length truncation)
        self.length_counts = [0] * (num_steps + 2)  # index = acceptance length 1 .. k+1

    def record(self, accepted: list[int]) -> None:
        """One verify forward: accepted drafts per request in it."""
        with self._lock:
            for n in accepted:
                self.verify_steps += 1
                self.draft_tokens += self.num_steps
                self.accepted_tokens += n
                self.emitted_tokens += n + 1
                self.length_counts[n + 1] += 1

    @property
    def mean_acceptance_length(self) -> float:
        with self._lock:
            return self.emitted_tokens / self.verify_steps if self.verify_steps else 0.0

    def prometheus_lines(self) -> list[str]:
        """The metrics in the Prometheus text format (counters, a gauge and a histogram)."""
        with self._lock:
            v, d, a, e = self.verify_steps, self.draft_tokens, self.accepted_tokens, self.emitted_tokens
            counts = list(self.length_counts)
        name = "tokenspeed_spec_acceptance_length"
        lines = [
            "# HELP tokenspeed_spec_num_steps Draft tokens proposed per verify (--speculative-num-steps).",
            "# TYPE tokenspeed_spec_num_steps gauge",
            f"tokenspeed_spec_num_steps {self.num_steps}",
        ]
        for metric, value, text in (
            ("tokenspeed_spec_verify_steps_total", v, "Request-verifies (one request in one target verify forward)."),
            ("tokenspeed_spec_draft_tokens_total", d, "Draft tokens proposed by the MTP layer."),
            ("tokenspeed_spec_accepted_tokens_total", a, "Draft tokens the target accepted."),
        ):
            lines += [f"# HELP {metric} {text}", f"# TYPE {metric} counter", f"{metric} {value}"]
        lines += [
            "# HELP tokenspeed_spec_mean_acceptance_length Tokens emitted per request-verify (accepted + 1).",
            "# TYPE tokenspeed_spec_mean_acceptance_length gauge",
            f"tokenspeed_spec_mean_acceptance_length {e / v if v else 0.0}",
            f"# HELP {name} Tokens emitted per request-verify.",
            f"# TYPE {name} histogram",
        ]
        acc = 0
        for length in range(1, self.num_steps + 2):
            acc += counts[length]
            lines.append(f'{name}_bucket{{le="{length}"}} {acc}')
        lines += [f'{name}_bucket{{le="+Inf"}} {v}', f"{name}_sum {e}", f"{name}_count {v}"]
        return lines
