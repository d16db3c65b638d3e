"""Write a random-init HF model dir of a run config's architecture (or `bench.model` shape).

Engines started by the launcher (disaggregated or colocated with `ENGINE=embedded|sglang`)
need a model directory to serve before the trainer exists; for a random-init benchmark this
is it. The builtin character tokenizer is saved alongside when the config uses it, so the
trainer's vocabulary and the engine's agree.

    python -m erpo_mega.bench.make_model CONFIG [key=value ...] --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def make_model(cfg, out: Path) -> Path:
    import torch

    from erpo_mega.config import to_dict
    from erpo_mega.data.tokenizer import build_char_tokenizer
    from erpo_mega.models.config import ModelConfig
    from erpo_mega.models.torch_llm import TorchLLM
    from erpo_mega.weights.transport import save_hf_safetensors

    tok = None
    if cfg.bench.model:
        from erpo_mega.bench.shapes import model_config

        mcfg = model_config(cfg.bench.model, max_position_embeddings=max(4096, cfg.bench.prompt_len +
                                                                         cfg.bench.response_len))
    else:
        if cfg.model.arch is None:
            raise ValueError("make_model: the config has no model.arch (and no bench.model)")
        arch = to_dict(cfg.model.arch)
        if cfg.model.tokenizer == "builtin":
            with tempfile.TemporaryDirectory() as tmp:
                tok = build_char_tokenizer(tmp)
            arch.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
        if cfg.model.arch.head_dim == cfg.model.arch.hidden_size // cfg.model.arch.num_attention_heads:
            arch.pop("head_dim", None)
        mcfg = ModelConfig.from_dict(arch, source="model.arch")
    torch.manual_seed(cfg.seed)
    model = TorchLLM(mcfg)
    save_hf_safetensors([(n, t.detach()) for n, t in model.state_dict().items()], out)
    (out / "config.json").write_text(json.dumps(mcfg.to_hf_dict(), indent=1))
    if tok is not None:
        tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from erpo_mega.config import ConfigError
    from erpo_mega.run_config import load_run_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        out = make_model(cfg, Path(args.out))
    except (ConfigError, ValueError) as e:
        print(f"make_model: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
