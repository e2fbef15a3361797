"""jaxtune: LLM post-training in JAX/Flax with Axolotl-style configs and HF round trips.

    model, tokenizer = jaxtune.load_pretrained("path/to/hf_dir", dtype="float32")
    logits = model(input_ids)                      # [batch, seq, vocab]
    jaxtune.save_pretrained(model, "out_dir", tokenizer=tokenizer)
"""

from jaxtune.checkpoint.hf import load_pretrained, save_pretrained
from jaxtune.errors import JaxtuneError, ModelLoadError

__version__ = "0.1.0"
__all__ = ["load_pretrained", "save_pretrained", "JaxtuneError", "ModelLoadError", "__version__"]
