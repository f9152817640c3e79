"""The printed summary of a results JSON: one row per concurrency, the floors, batch 1, the HF baseline."""

from __future__ import annotations

from typing import Any


def _f(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def print_report(results: dict[str, Any]) -> None:
    runs = results.get("runs") or []
    if runs:
        print(
            "| concurrency | tokens/s/user | TPM/GPU | TTFT p50 / p99 ms | ITL p50 / p99 ms | cache hit % (warm) "
            "| steady | errors |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in runs:
            ttft, itl = r["ttft_ms"], r["itl_ms"]
            hit = (
                "n/a"
                if not r.get("cache_reported")
                else f"{_f(r['prefix_cache_hit_pct'])} ({_f(r.get('prefix_cache_hit_pct_warm'))})"
            )
            print(
                f"| {r['concurrency']} | {_f(r['tokens_per_s_per_user'])} | {_f(r['tpm_per_gpu'], '.0f')} | "
                f"{_f(ttft['p50'], '.0f')} / {_f(ttft['p99'], '.0f')} | {_f(itl['p50'])} / {_f(itl['p99'])} | {hit} | "
                f"{'yes' if r['steady_state'] else 'NO'} | {r['errors']}/{r['requests']} |"
            )
    if results.get("envelope_non_steady_runs"):
        print(
            f"note: envelope points from runs without a steady window (whole-run TPM, ramps included): "
            f"concurrency {results['envelope_non_steady_runs']}; lengthen --max-run-seconds or --conversations-per-slot"
        )
    for f in results.get("floors") or []:
        head = f"TPM/GPU at {f['floor_tokens_per_s']:g} tokens/s per user: "
        if not f["reached"]:
            print(head + f"NOT REACHED ({f['note']})")
            continue
        roof = ""
        if f.get("roofline_tpm_per_gpu"):
            frac = f.get("fraction_of_roofline")
            roof = f"; roofline {f['roofline_tpm_per_gpu']:.0f}" + (f" ({100 * frac:.0f}% of it)" if frac else "")
        print(head + f"{f['tpm_per_gpu']:.0f}{roof} [{f['note']}]")
    b1 = results.get("batch1")
    if b1:
        print(
            f"batch-1 decode: {b1['measured_tokens_per_s']:.1f} tokens/s measured vs {b1['tokens_per_s']:.1f} roofline "
            f"({100 * b1['fraction_of_roofline']:.0f}%) at {b1['context_tokens']:.0f} tokens of context, "
            f"{b1['bytes_per_token'] / 1e9:.2f} GB/token at {b1['copy_gbps']:.0f} GB/s copy bandwidth (no MTP)"
        )
    roof = results.get("roofline")
    if roof:
        hw = roof["hardware"]
        print(
            f"roofline: {roof['active_params_per_token'] / 1e9:.2f} B active params/token, "
            f"{roof['total_weight_bytes'] / 2**30:.1f} GiB weights, {roof['kv_bytes_per_token'] / 1024:.1f} KiB KV/token, "
            f"{hw['copy_gbps']:.0f} GB/s, {hw['matmul_tflops']:.0f} TFLOP/s ({hw['source']}), "
            f"batch cap by memory: {roof['max_batch_by_memory']}"
        )
    hf = results.get("hf_baseline")
    if hf:
        print(
            f"HF transformers generate (1 user, {hf['device']}, {hf['dtype']}): {_f(hf['tokens_per_s_per_user'])} tokens/s "
            f"per user, TTFT {_f(hf['ttft_ms_mean'], '.0f')} ms, load {hf['load_s']:.1f} s"
        )
