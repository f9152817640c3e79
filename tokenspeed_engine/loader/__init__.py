"""Weight loading: safetensors (bf16 / DeepSeek fp8 block-scale) and GGUF (Llama)."""
