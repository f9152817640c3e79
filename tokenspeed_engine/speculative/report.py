"""Reporting a step that emitted several tokens per request: stops, lengths, text, ``advance``.

The multi-token form of the engine's single-token report. Tokens are taken one at a time,
so a request stops exactly where plain decoding would have: at an EOS / stop token, at a
stop string, or at ``max_tokens``; the accepted tokens after that point are dropped, and
the scheduler is told only the kept ones (it rewinds the KV extent past them).
"""

from __future__ import annotations

from typing import Any

from tokenspeed_engine.engine import RequestOutput
from tokenspeed_engine.speculative.stats import RequestSpecStats


def report_tokens(
    engine: Any, emitted: list[tuple[int, list[int]]], spec_stats: dict[int, RequestSpecStats]
) -> list[RequestOutput]:
    """Detokenise ``emitted`` (request id, tokens; plan order), advance the scheduler, build outputs."""
    events: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    stopped: set[int] = set()
    for rid, tokens in emitted:
        req = engine._requests.get(rid)
        if req is None:
            continue
        kept: list[int] = []
        text = ""
        for tok in tokens:
            req.generated.append(tok)
            kept.append(tok)
            eos = (tok in engine.eos_token_ids and not req.params.ignore_eos) or tok in req.params.stop_token_ids
            at_length = len(req.generated) >= req.params.max_tokens
            text += req.detok.push([] if eos else [tok], final=eos or at_length)
            if eos or req.detok.stopped:
                stopped.add(rid)
                break
            if at_length:
                break
        events[rid], texts[rid] = kept, text
    done = dict(engine.scheduler.advance(events, finished=list(stopped)))
    outputs: list[RequestOutput] = []
    for rid in events:
        if rid in done:
            continue
        req = engine._requests[rid]
        out = RequestOutput(rid, events[rid], texts[rid], prompt_tokens=req.prompt_len, completion_tokens=len(req.generated))
        outputs.append(_with_stats(out, spec_stats.get(rid)))
    for rid, reason in done.items():
        if rid in engine._requests:
            out = engine._finish(rid, "stop" if rid in stopped else reason, events.get(rid, []), texts.get(rid, ""))
            outputs.append(_with_stats(out, spec_stats.get(rid)))
    return outputs


def _with_stats(out: RequestOutput, stats: RequestSpecStats | None) -> RequestOutput:
    if stats is not None:
        out.spec_verify_steps = stats.verify_steps
        out.spec_accepted_tokens = stats.accepted_tokens
    return out
