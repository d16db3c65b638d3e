"""Convert an erpo-mega megatron-core checkpoint into a HuggingFace directory.

    python tools/convert_mcore_to_hf.py --mcore-dir MCORE_DIR --out HF_DIR [--hf-config ORIGINAL_HF_DIR]

Same as `erpo-mega convert mcore-to-hf`; see docs/conversion.md.
"""

import sys

from erpo_mega.models.convert import main_mcore_to_hf

if __name__ == "__main__":
    sys.exit(main_mcore_to_hf(sys.argv[1:]))
