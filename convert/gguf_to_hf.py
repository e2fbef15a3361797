"""Convert a GGUF file to an HF directory: `python convert/gguf_to_hf.py MODEL.gguf OUT_DIR`.

Same as `jaxtune convert MODEL.gguf OUT_DIR`; `--bundled smollm2` prepares the embedded model.
"""

import sys

from jaxtune.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
