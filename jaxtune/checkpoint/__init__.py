"""Reading and writing checkpoints: HF safetensors, GGUF, PEFT adapters."""
