"""Speculative decoding with the model's MTP (NextN) head.

``EngineConfig(speculative_num_steps=k)`` (``--speculative-num-steps k`` on ``tokenspeed
serve``, ``LLM(..., speculative_num_steps=k)``) drafts k tokens per decoding request with
the MTP layer, verifies them in one target forward of k+1 tokens, and emits the accepted
prefix plus one token from the target. Modules:

* ``decoder``: the engine step (draft, verify, accept, MTP pass, report), per-request state.
* ``acceptance``: greedy acceptance and rejection sampling.
* ``batches``: DECODE batches of q_len tokens per sequence.
* ``report``: multi-token stop / length / detokenise / ``advance``.
* ``stats``: acceptance-length counters for /metrics and per-request stats.
* ``graphs``: CUDA graphs of the verify step and the MTP forwards.
"""
