"""Timeline of one sm90 MLA decode call, from a build with TOKENSPEED_MLA_TRACE=1.

Runs the op twice in a child process (the first call warms up), keeps the last call's
printf events per (kernel, CTA, thread, event) and prints, per traced CTA, the time of each
event after the earliest decode entry, then the phase summary (median over CTAs).

    TOKENSPEED_MLA_TRACE=1 python setup.py build_ext --inplace ...
    python scripts/dev/mla_trace.py 1 16 65536 1
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys

CHILD = """
import sys, torch, tokenspeed_kernels
sys.path.insert(0, "scripts/dev")
from profile_sm90 import make
q, kv, bt, sl = make({b}, {h}, {s}, {q_len})
for _ in range(2):
    torch.ops.tokenspeed.mla_decode(q, kv, bt, sl, 192 ** -0.5, True, 512, None)
    torch.cuda.synchronize()
"""
LINE = re.compile(r"mla_trace (\w+) cta (\d+) tid (\d+) ev (\d+) ns (\d+)")
PHASE = re.compile(r"mla_phase cta (\d+) tid (\d+) tiles (\d+) c ([\d ]+)")
BUCKETS = ("acquire", "wait PV", "wait QK", "softmax1", "bar max", "softmax2", "bar P", "other")
# TOKENSPEED_MLA_DECODE_SCHEDULE=seesaw: per warpgroup, per tile pair (mla_decode_sm90_trace.cuh)
SEESAW_WG0 = ("QK_a", "wait S_a", "softmax_a", "PV_aL", "wait PV_aL", "bar B", "PV_bL", "wait PV_bL+rest")
SEESAW_WG1 = ("QK_b", "wait S_b", "max_b+bar A", "softmax_b", "PV_aR", "wait PV_aR", "PV_bR", "wait PV_bR+rest")
PRODUCER = ("wait empty", "issue")
NAMES = {0: "entry", 1: "plan done", 2: "1st TMA issued", 3: "last TMA issued", 4: "1st tile full",
         5: "loop done", 6: "epilogue done", 7: "combine waited", 8: "combine done"}  # fmt: skip


def main() -> None:
    b, h, s, q_len = (int(x) for x in sys.argv[1:5])
    out = subprocess.run([sys.executable, "-c", CHILD.format(b=b, h=h, s=s, q_len=q_len)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    last: dict[tuple[str, int, int, int], int] = {}
    for m in LINE.finditer(out):
        key = (m[1], int(m[2]), int(m[3]), int(m[4]))
        last[key] = max(last.get(key, 0), int(m[5]))
    t0 = min(v for (k, _, _, e), v in last.items() if k == "decode" and e == 0)
    per_cta: dict[int, dict[int, float]] = {}
    for (kernel, cta, _tid, ev), ns in last.items():
        if kernel == "decode":
            per_cta.setdefault(cta, {})[ev] = (ns - t0) / 1e3
    print(f"B={b} H={h} S={s} q_len={q_len}: us after the first decode entry")
    print("cta  | " + " | ".join(f"{NAMES[e]:>15}" for e in range(7)))
    for cta in sorted(per_cta):
        print(f"{cta:4d} | " + " | ".join(f"{per_cta[cta].get(e, float('nan')):15.2f}" for e in range(7)))
    for e in range(1, 7):
        vals = [c[e] - c[0] for c in per_cta.values() if e in c and 0 in c]
        if vals:
            print(f"median {NAMES[e]:>15} - entry: {statistics.median(vals):7.2f} us")
    end = max(c.get(6, 0.0) for c in per_cta.values())
    print(f"decode: last epilogue at {end:.2f} us")
    print_phases(out)
    for kernel in ("combine_rows", "combine_splits"):
        for ev in (7, 8):
            vals = [(ns - t0) / 1e3 for (k, _, _, e), ns in last.items() if k == kernel and e == ev]
            if vals:
                print(f"{kernel} {NAMES[ev]}: first {min(vals):.2f}, last {max(vals):.2f} us")


def print_phases(out: str) -> None:
    """Cycles per tile in each bucket of the consumer loop (median over the traced threads of
    the last call; each thread prints once per call, so keep the second half of the lines)."""
    rows = [(int(m[2]), int(m[3]), [int(x) for x in m[4].split()]) for m in PHASE.finditer(out)]
    rows = rows[len(rows) // 2 :]
    roles = [("consumer", (128, 256), BUCKETS), ("producer", (0,), PRODUCER)]
    if os.environ.get("TOKENSPEED_MLA_DECODE_SCHEDULE", "seesaw") == "seesaw":
        roles = [("WG0 per pair", (128,), SEESAW_WG0), ("WG1 per pair", (256,), SEESAW_WG1), roles[1]]
    for role, tids, names in roles:
        per = [[c / max(n, 1) for c in cyc] for tid, n, cyc in rows if tid in tids]
        if not per:
            continue
        med = [statistics.median(col) for col in zip(*per, strict=True)]
        total = sum(med[: len(names)])
        parts = " | ".join(f"{name} {v:6.0f}" for name, v in zip(names, med[: len(names)], strict=True))
        print(f"{role} cycles (median of {len(per)}): {parts} | sum {total:6.0f}")


if __name__ == "__main__":
    main()
