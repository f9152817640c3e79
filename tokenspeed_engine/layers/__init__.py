"""Model building blocks: parallel linear layers, norms, rotary (incl. YaRN), vocab-parallel
embedding / LM head, activations, fused MoE experts, and registry-based kernel selection."""
