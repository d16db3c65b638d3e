"""Resume serves the restored weights from the first rollout on (issue 13, defect 4).

A run starts from an HF `model.init_from` with external engines (as under Slurm, where the
engines are launched from MODEL_DIR): nothing is exported at start. After one step and a
checkpoint, the engine is restarted from MODEL_DIR (a requeued job's fresh engines) and the
run is resumed with no steps left to do: the only weights the engine can then hold are the
ones pushed at start, and they must equal the checkpoint's (the run's final export).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erpo_mega.observe.metrics import read_metrics
from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.client import SGLangClient
from erpo_mega.rollout.launch import launch_embedded_server

from .conftest import REPO, cli_env, tiny_config, write_config

pytestmark = pytest.mark.slow  # two CLI runs and two engine starts, ~40-80 s

PROBE = ("model.norm.weight", "model.layers.0.self_attn.q_proj.weight")


def _hf_model_dir(path):
    """A tiny random Qwen2 with the builtin character tokenizer, as an HF directory."""
    import transformers

    from erpo_mega.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(path)
    config = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def run_cli(*args, log: Path) -> None:
    """The CLI with output to a file: with the tensor sync path the trainer's torch_shm_manager
    outlives it while the (external) engine still maps the pushed tensors, and would hold a
    captured stdout pipe open."""
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "erpo_mega.cli", *map(str, args)], cwd=REPO, env=cli_env(),
                              stdout=out, stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"erpo-mega {' '.join(map(str, args))} failed ({proc.returncode}):\n{log.read_text()[-6000:]}")


def _engine(model_dir, port, log):
    return launch_embedded_server(model_dir, port=port, log_path=log, num_threads=1, timeout=120.0)


def _weights(url: str) -> dict:
    client = SGLangClient(url)
    try:
        return {n: torch.tensor(client.get_weights_by_name(n, truncate_size=4)) for n in PROBE}
    finally:
        client.close()


def test_resume_pushes_restored_weights_to_fresh_engines(tmp_path):
    model_dir = _hf_model_dir(tmp_path / "model")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    over = {"model.arch": None, "model.init_from": str(model_dir), "model.tokenizer": str(model_dir),
            "sft.steps": 0, "train.steps": 1, "eval.every": 0, "eval.num_prompts": 2,
            "rollout.engine": "external", "rollout.engine_urls": [url], "rollout.max_concurrency": 1,
            "reward": "tests.e2e.plugins:even_length_reward"}
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(run_dir, **over))
    engine = _engine(model_dir, port, tmp_path / "engine1.log")
    try:
        run_cli("train", cfg, log=tmp_path / "run1.log")
    finally:
        engine.close()
    assert not (run_dir / "engine_init").exists(), "exported weights at start that no engine reads"
    trained = {}
    for f in sorted((run_dir / "final_hf").glob("*.safetensors")):
        trained.update(load_file(str(f)))
    base = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        base.update(load_file(str(f)))
    assert not torch.equal(trained[PROBE[1]], base[PROBE[1]])  # the step changed the weights

    engine = _engine(model_dir, port, tmp_path / "engine2.log")  # the requeued job's fresh engine
    try:
        fresh = _weights(url)[PROBE[1]]
        assert torch.allclose(fresh.reshape(base[PROBE[1]][:4].shape), base[PROBE[1]][:4].float(), atol=1e-6)
        # step 1 of 1 is done: the start-up push is the only update that reaches the engine
        run_cli("train", cfg, "--resume", log=tmp_path / "run2.log")
        served = _weights(url)
    finally:
        engine.close()
    for name in PROBE:
        ref = trained[name][:4].float()
        assert torch.allclose(served[name].reshape(ref.shape), ref, atol=1e-6), name
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1]
