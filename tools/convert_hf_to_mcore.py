"""Convert a HuggingFace Qwen2/Llama directory into an erpo-mega megatron-core checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --out MCORE_DIR [--tp N --pp M] [--dtype bfloat16]

Same as `erpo-mega convert hf-to-mcore`; see docs/conversion.md.
"""

import sys

from erpo_mega.models.convert import main_hf_to_mcore

if __name__ == "__main__":
    sys.exit(main_hf_to_mcore(sys.argv[1:]))
