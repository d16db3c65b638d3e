"""SGLangClient against the embedded engine over real HTTP on 127.0.0.1.

Log-probs are checked against a transformers forward pass over prompt + completion, so the
engine's KV-cache decoding, batching and sampling bookkeeping are all under test.
"""

import threading
import time

import pytest
import requests
import torch

from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.client import EngineError, SGLangClient, WeightUpdateError
from erpo_mega.rollout.engine import Engine, EngineHTTPServer
from erpo_mega.rollout.launch import launch_embedded_server
from tests.rollout.helpers import save_tiny_model, save_tiny_tokenizer

EOS = 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    hf = save_tiny_model(path, "qwen2", seed=3)
    save_tiny_tokenizer(path / "tokenizer")  # own dir: AutoTokenizer would follow config.json's model_type
    handle = launch_embedded_server(path, port=free_port(), log_path=path / "server.log", num_threads=1,
                                    enable_memory_saver=True, tokenizer_path=path / "tokenizer")
    yield handle, hf
    handle.close()


@pytest.fixture(scope="module")
def client(served):
    return served[0].client(timeout=60, max_retries=2, backoff=0.05)


def hf_logprobs(hf, prompt, output, temperature):
    """log p(output_t | prefix) from transformers, with logits divided by the temperature."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + output])).logits[0].float()
    lps = torch.log_softmax(logits / temperature, dim=-1)
    return [float(lps[len(prompt) - 1 + t, tok]) for t, tok in enumerate(output)]


PROMPTS = [[5, 17, 33, 8], [9, 4], [60, 61, 62, 63, 64, 65, 66]]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_logprobs_equal_transformers_recomputation(served, client, temperature):
    _, hf = served
    outs = client.generate(PROMPTS, {"max_new_tokens": 6, "temperature": temperature, "ignore_eos": True,
                                     "sampling_seed": 11})
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.output_ids) == 6 and out.finish_reason == {"type": "length", "length": 6}
        ref = hf_logprobs(hf, prompt, out.output_ids, temperature if temperature > 0 else 1.0)
        torch.testing.assert_close(torch.tensor(out.output_token_logprobs), torch.tensor(ref),
                                   atol=1e-4, rtol=1e-4)
        if temperature == 0:  # greedy: every token is the argmax of the reference logits
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([prompt + out.output_ids])).logits[0]
            assert out.output_ids == logits[len(prompt) - 1:-1].argmax(-1).tolist()


def test_one_request_with_a_padded_batch_matches_reference(served, client):
    """A multi-prompt /generate body runs as one left-padded batch through the KV cache."""
    _, hf = served
    raw = client.generate_raw({"input_ids": PROMPTS, "sampling_params": {"max_new_tokens": 5, "temperature": 0,
                                                                          "ignore_eos": True},
                               "return_logprob": True, "logprob_start_len": 0})
    assert isinstance(raw, list) and len(raw) == 3
    for prompt, item in zip(PROMPTS, raw):
        out = [t[1] for t in item["meta_info"]["output_token_logprobs"]]
        assert out == item["output_ids"]
        got = [t[0] for t in item["meta_info"]["output_token_logprobs"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(hf_logprobs(hf, prompt, out, 1.0)),
                                   atol=1e-4, rtol=1e-4)
        inp = item["meta_info"]["input_token_logprobs"]
        assert inp[0][0] is None and [t[1] for t in inp] == prompt
        ref_in = hf_logprobs(hf, prompt[:1], prompt[1:], 1.0)
        torch.testing.assert_close(torch.tensor([t[0] for t in inp[1:]]), torch.tensor(ref_in), atol=1e-4,
                                   rtol=1e-4)


def test_sampling_seed_reproducible(client):
    sp = {"max_new_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    a = client.generate([PROMPTS[0]], {**sp, "sampling_seed": 5})[0]
    b = client.generate([PROMPTS[0]], {**sp, "sampling_seed": 5})[0]
    c = client.generate([PROMPTS[0]], {**sp, "sampling_seed": 6})[0]
    assert a.output_ids == b.output_ids and a.output_token_logprobs == b.output_token_logprobs
    assert a.output_ids != c.output_ids


def test_stop_token_ids_and_eos(client):
    base = client.generate([PROMPTS[0]], {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True})[0]
    stop = base.output_ids[3]
    first = base.output_ids.index(stop)
    out = client.generate([PROMPTS[0]], {"max_new_tokens": 10, "temperature": 0, "stop_token_ids": [stop],
                                         "ignore_eos": True})[0]
    assert out.output_ids == base.output_ids[: first + 1]          # the stop token is kept, as SGLang does
    assert out.finish_reason == {"type": "stop", "matched": stop}
    # eos: a logit_bias makes eos the argmax at once; ignore_eos lets generation run on
    out = client.generate([PROMPTS[0]], {"max_new_tokens": 5, "temperature": 0, "logit_bias": {str(EOS): 50.0}})[0]
    assert out.output_ids == [EOS] and out.finish_reason == {"type": "stop", "matched": EOS}
    out = client.generate([PROMPTS[0]], {"max_new_tokens": 5, "temperature": 0, "logit_bias": {str(EOS): 50.0},
                                         "min_new_tokens": 2})[0]
    assert out.output_ids[2:] == [EOS] and EOS not in out.output_ids[:2]


def test_stop_strings_with_tokenizer(client):
    body = {"text": "<t5> <t17> <t33>", "sampling_params": {"max_new_tokens": 10, "temperature": 0,
                                                           "ignore_eos": True}}
    base = client.generate_raw(body)
    stop_text = f"<t{base['output_ids'][2]}>"
    cut = next(k for k in range(10) if f"<t{base['output_ids'][k]}>" == stop_text)
    out = client.generate_raw({**body, "sampling_params": {**body["sampling_params"], "stop": stop_text}})
    assert out["output_ids"] == base["output_ids"][: cut + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_text}
    assert stop_text not in out["text"] and out["text"] == base["text"][: base["text"].find(stop_text)]


def test_validation_errors_are_400_with_field_names(client):
    with pytest.raises(EngineError, match=r"HTTP 400: .*'seed'") as e:
        client.generate([[1, 2]], {"seed": 1})
    assert e.value.status == 400
    with pytest.raises(EngineError, match=r"HTTP 400: .*sampling_params.top_p"):
        client.generate([[1, 2]], {"top_p": 0.0})
    with pytest.raises(EngineError, match=r"HTTP 400: .*token id 10000"):
        client.generate([[1, 10000]], {})
    with pytest.raises(EngineError, match=r"HTTP 400: .*exactly one of 'text' or 'input_ids'"):
        client.generate_raw({"sampling_params": {}})


def test_weight_ops_outside_session_fail_like_sglang(client):
    # SGLang 0.5.23: HTTP 400 with {"success": false, "message"} -> WeightUpdateError
    for path, body in (("/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"]}),
                       ("/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": []})):
        resp = requests.post(client.base_url + path, json=body, timeout=10)
        assert resp.status_code == 400
        assert resp.json()["success"] is False and "begin_weight_update" in resp.json()["message"]
        with pytest.raises(WeightUpdateError, match="begin_weight_update") as info:
            client._post(path, body)
        assert info.value.status == 400
    with pytest.raises(WeightUpdateError, match="no weight-update session"):
        client.end_weight_update()


def test_weight_version_and_get_weights(served, client):
    _, hf = served
    client.update_weight_version("v42")
    assert client.model_info()["weight_version"] == "v42"
    out = client.generate([[3, 4]], {"max_new_tokens": 1})[0]
    assert out.weight_version == "v42"
    got = client.get_weights_by_name("model.layers.1.self_attn.k_proj.bias", truncate_size=1000)
    assert got == hf.state_dict()["model.layers.1.self_attn.k_proj.bias"].tolist()
    with pytest.raises(EngineError, match="HTTP 400: .*unknown parameter"):
        client.get_weights_by_name("model.nope.weight")


def test_update_from_a_truncated_checkpoint_names_the_file_and_keeps_the_weights(served, client, tmp_path):
    _, hf = served
    save_tiny_model(tmp_path, "qwen2", seed=4)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    name = "model.layers.1.self_attn.k_proj.bias"
    with pytest.raises(WeightUpdateError, match=r"Failed to update weights from .*model\.safetensors"):
        client.update_weights_from_disk(tmp_path, weight_version="damaged")
    assert client.get_weights_by_name(name, truncate_size=1000) == hf.state_dict()[name].tolist()
    assert client.model_info()["weight_version"] != "damaged"


def test_pause_abort_and_continue(client):
    client.pause_generation(mode="in_place")
    results = []
    t = threading.Thread(target=lambda: results.append(
        client.generate([[7, 8]], {"max_new_tokens": 3, "ignore_eos": True}, rids=["held"])[0]))
    t.start()
    time.sleep(0.5)
    assert not results                         # held while paused
    client.abort(rid="held")
    client.continue_generation()
    t.join(30)
    assert results[0].finish_type == "abort"


def test_release_and_resume_memory(served, client):
    _, hf = served
    client.release_memory_occupation()
    with pytest.raises(EngineError, match="HTTP 409: .*resume_memory_occupation"):
        client.generate([[1, 2]], {"max_new_tokens": 1})
    client.resume_memory_occupation()
    got = client.get_weights_by_name("lm_head.weight", truncate_size=2)
    assert got == hf.state_dict()["lm_head.weight"][:2].tolist()


def test_health_is_503_while_loading(served):
    engine = Engine(str(served[0].url))  # never loaded
    server = EngineHTTPServer(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = SGLangClient(f"http://127.0.0.1:{server.server_port}", max_retries=0)
        assert not c.health()
        with pytest.raises(EngineError, match="HTTP 503.*loading"):
            c.model_info()
    finally:
        server.shutdown()
        server.server_close()


def test_timeout_gives_clear_error(served):
    slow = served[0].client(timeout=0.05, max_retries=0)
    with pytest.raises(EngineError, match=r"no reply within 0\.1s \(timeout\)"):
        # 200 sequences to the context limit: longer than 0.05 s even for the native engine
        slow.generate([[1] * 50] * 200, {"max_new_tokens": 2000, "ignore_eos": True})
    served[0].client(timeout=30).abort(abort_all=True)  # not the 0.05 s client: a busy CPU may take longer


def test_dead_server_error_names_url(served, client):
    """Runs last in this module: it kills the server."""
    handle = served[0]
    handle.close()
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=rf"{handle.url}/generate: server unreachable or failing after 3 "
                                          r"attempt\(s\): cannot connect"):
        client.generate([[1, 2]], {})
    assert time.monotonic() - t0 < 5


def test_launch_reports_startup_failure(tmp_path):
    with pytest.raises(EngineError, match="exited with code 1 before becoming healthy"):
        launch_embedded_server(tmp_path / "missing", port=free_port(), log_path=tmp_path / "log")
