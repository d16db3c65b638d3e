"""No one can take over the embedded engine: api key, allowlisted payloads, session timeout.

One real server subprocess, started as a launcher would (`--api-key` through the
environment, a short `--weight-update-timeout`), over real HTTP on 127.0.0.1.
"""

import base64
import pickle
import threading
import time

import pytest
import requests
import torch

from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.client import EngineError, SGLangClient, WeightUpdateError
from erpo_mega.rollout.launch import launch_embedded_server, launch_router
from erpo_mega.weights.transport import DistributedWeightSender, push_weights
from tests.rollout.helpers import save_tiny_model

KEY = "test-key-5d1f"
SESSION_TIMEOUT = 2.0
NAME = "model.layers.0.self_attn.q_proj.bias"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("secure")
    hf = save_tiny_model(path, "qwen2", seed=5)
    handle = launch_embedded_server(path, port=free_port(), log_path=path / "server.log", num_threads=1,
                                    api_key=KEY, extra_args=["--weight-update-timeout", str(SESSION_TIMEOUT)])
    yield handle, hf, path
    handle.close()


@pytest.fixture(scope="module")
def client(served):
    return served[0].client(timeout=60, max_retries=0)


def test_api_key_required_except_health(served, client):
    url = served[0].url
    for path in ("/generate", "/model_info", "/update_weights_from_tensor", "/begin_weight_update"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            resp = requests.post(url + path, json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}},
                                 headers=headers, timeout=10)
            assert resp.status_code == 401 and resp.json() == {"error": "Unauthorized"}, (path, headers)
    assert requests.get(url + "/health", timeout=10).status_code == 200    # probes stay open, as SGLang
    with pytest.raises(EngineError, match="HTTP 401 .*requires an api key"):
        SGLangClient(url, max_retries=0).model_info()
    resp = requests.post(url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}},
                         headers={"Authorization": f"bearer {KEY}"}, timeout=30)
    assert resp.status_code == 200 and len(resp.json()["output_ids"]) == 1
    assert client.engine_tp_size() == 1


class RunsCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_side_effects(served, client, tmp_path):
    _, hf, _ = served
    marker = tmp_path / "pwned"
    before = client.get_weights_by_name(NAME, truncate_size=1000)
    version = client.model_info()["weight_version"]
    evil = base64.b64encode(pickle.dumps([(NAME, RunsCommand(marker))])).decode()
    garbage = base64.b64encode(b"\x80\x04not a pickle at all").decode()
    with client.weight_update_session():
        for payload, load_format in ((evil, None), (evil, "flattened_bucket"), (garbage, None), ("!!", None)):
            resp = requests.post(served[0].url + "/update_weights_from_tensor",
                                 json={"serialized_named_tensors": [payload], "load_format": load_format,
                                       "abort_all_requests": True, "weight_version": "evil"},
                                 headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            assert resp.status_code == 400, resp.text
            body = resp.json()
            assert body["success"] is False and "refused" in body["message"], body
        with pytest.raises(WeightUpdateError, match="posix.system is not allowed"):
            client.update_weights_from_tensor([evil])
    assert not marker.exists()
    assert client.get_weights_by_name(NAME, truncate_size=1000) == before == hf.state_dict()[NAME].tolist()
    assert client.model_info()["weight_version"] == version
    out = client.generate([[5, 6, 7]], {"max_new_tokens": 3, "ignore_eos": True})[0]
    assert len(out.output_ids) == 3


def test_abandoned_weight_update_session_times_out(served, client):
    client.begin_weight_update()
    t0 = time.monotonic()
    done = {}

    def gen():
        done["out"] = client.generate([[3, 4]], {"max_new_tokens": 2, "ignore_eos": True})[0]
        done["t"] = time.monotonic() - t0

    th = threading.Thread(target=gen)
    th.start()
    time.sleep(0.5)
    assert "out" not in done                       # held while the session is open
    th.join(30)
    assert len(done["out"].output_ids) == 2
    assert SESSION_TIMEOUT - 0.5 <= done["t"] < SESSION_TIMEOUT + 10
    with pytest.raises(WeightUpdateError, match="no weight-update session is open"):
        client.end_weight_update()                 # already closed by the timeout


def test_refused_distributed_update_raises_instead_of_hanging(served, client):
    _, hf, _ = served
    sender = DistributedWeightSender([client], "127.0.0.1", free_port(), backend="gloo", timeout_s=120).connect()
    try:
        assert sender.world_size == 2 and sender.rank_offsets == [1]
        client.destroy_weights_update_group()      # the engine will refuse the next update
        named = [(NAME, torch.zeros_like(hf.state_dict()[NAME]))]
        t0 = time.monotonic()
        with pytest.raises(WeightUpdateError, match="no weight-update group"):
            push_weights(named, [client], method="distributed", sender=sender)
        assert time.monotonic() - t0 < 20
        with pytest.raises(WeightUpdateError, match="unusable"):
            push_weights(named, [client], method="distributed", sender=sender)
    finally:
        sender.close()
    # nothing was applied, generation is not left paused or held by a session
    assert client.get_weights_by_name(NAME, truncate_size=1000) == hf.state_dict()[NAME].tolist()
    assert len(client.generate([[5, 6]], {"max_new_tokens": 2, "ignore_eos": True})[0].output_ids) == 2


def test_router_with_the_same_key_authenticates_both_ways(served, client, tmp_path):
    """sglang-router --api-key: clients must send the key, and the router sends it to workers."""
    router = launch_router([served[0].url], port=free_port(), api_key=KEY, log_path=tmp_path / "router.log",
                           extra_args=["--log-level", "warn", "--shutdown-grace-period-secs", "1"])
    try:
        body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}
        assert requests.post(router.url + "/generate", json=body, timeout=30).status_code == 401
        out = router.client(timeout=60).generate([[1, 2]], {"max_new_tokens": 2, "ignore_eos": True})
        assert len(out[0].output_ids) == 2
    finally:
        router.close()


def test_serve_flags_and_defaults():
    from erpo_mega.rollout.serve import build_parser

    args = build_parser().parse_args(["--model-path", "m", "--api-key", "k", "--tp-size", "1",
                                      "--weight-update-timeout", "30"])
    assert (args.api_key, args.tp, args.weight_update_timeout) == ("k", 1, 30.0)
    assert build_parser().parse_args(["--model-path", "m"]).host == "127.0.0.1"  # never all interfaces by default
