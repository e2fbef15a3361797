"""Parameter-efficient fine-tuning: LoRA adapters (PEFT-compatible) and quantized frozen weights."""
