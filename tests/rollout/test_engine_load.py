"""The embedded server under load, over real HTTP on 127.0.0.1 (a `serve` subprocess).

256 concurrent clients each on its own connection must all be answered with exactly what
the same requests get when sent one by one; bad framing is refused before the body is
read; a client that hangs up frees its sequences; a taken port is a clear error.
"""

import http.client
import json
import socket
import threading
import time

import pytest

from erpo_mega.parallel.dist import free_port
from erpo_mega.rollout.engine import Engine, EngineHTTPServer
from erpo_mega.rollout.engine.http import PortInUseError
from erpo_mega.rollout.launch import launch_embedded_server
from tests.rollout.helpers import save_tiny_model

CLIENTS = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("load_model")
    save_tiny_model(path, "qwen2", seed=7)
    handle = launch_embedded_server(path, port=free_port(), log_path=path / "server.log", num_threads=1,
                                    extra_args=["--max-running-requests", "64", "--max-request-bytes", "100000"])
    yield handle
    handle.close()


def _post(url: str, path: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _request(i: int) -> dict:
    """Mixed load: greedy and seeded sampling, ragged prompts, some with n=2."""
    prompt = [3 + (i * 7 + k) % 90 for k in range(2 + i % 9)]
    sp = {"max_new_tokens": 4 + i % 5, "ignore_eos": True}
    sp |= {"temperature": 0} if i % 2 else {"temperature": 1.0, "sampling_seed": 1000 + i, "top_p": 0.9}
    if i % 16 == 0:
        sp["n"] = 2
    return {"input_ids": prompt, "sampling_params": sp, "return_logprob": True}


def _tokens(out) -> list:
    items = out if isinstance(out, list) else [out]
    return [(o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]) for o in items]


def test_256_concurrent_clients_all_answered_and_equal_to_one_by_one(server):
    results: dict[int, tuple[int, dict]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def client(i):
        try:
            start.wait(60)
            results[i] = _post(server.url, "/generate", _request(i))
        except BaseException as e:  # connection resets would land here
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(CLIENTS)) and all(s == 200 for s, _ in results.values())
    for i in range(0, CLIENTS, 5):      # every 5th again, alone: same tokens, same log-probs
        status, alone = _post(server.url, "/generate", _request(i))
        assert status == 200
        for (ids_c, lp_c), (ids_a, lp_a) in zip(_tokens(results[i][1]), _tokens(alone)):
            assert ids_c == ids_a, i
            assert lp_c == pytest.approx(lp_a, abs=1e-5), i


def _raw(url: str, data: bytes, read_timeout: float = 30) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except TimeoutError:
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)


def test_oversized_and_malformed_bodies_are_refused_before_reading(server):
    t0 = time.monotonic()
    # 1 GB announced, nothing sent: refused from the header alone (a server reading it would hang)
    reply = _raw(server.url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and b"exceeds the server's limit of 100000 bytes" in reply
    assert time.monotonic() - t0 < 10
    for bad in (b"abc", b"-5", b"1e3", b"12, 12"):
        reply = _raw(server.url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: " + bad + b"\r\n\r\n{}")
        assert reply.startswith(b"HTTP/1.1 400") and b"invalid Content-Length" in reply, bad
    reply = _raw(server.url, b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding" in reply
    # a real client sending a too-large body gets the 413 (the body is drained, not parsed)
    status, out = _post(server.url, "/generate", {"input_ids": [[5] * 100] * 400})
    assert status == 413 and "exceeds the server's limit of 100000 bytes" in out["error"]["message"]
    status, out = _post(server.url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}})
    assert status == 200 and len(out["output_ids"]) == 1  # the server is fine afterwards


def _info(url: str) -> dict:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/server_info")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_client_disconnect_aborts_its_request(server):
    body = json.dumps({"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 240, "n": 200,
                                                                   "ignore_eos": True}}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while _info(server.url)["num_running_reqs"] == 0:   # 200 x 240 tokens: many seconds if not aborted
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s.close()
    t0 = time.monotonic()
    while _info(server.url)["num_running_reqs"] + _info(server.url)["num_queued_reqs"] > 0:
        assert time.monotonic() - t0 < 5, "the hung-up client's sequences kept running"
        time.sleep(0.05)


def test_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=rf"127\.0\.0\.1:{port}: the port is already in use"):
            EngineHTTPServer(Engine("unused"), "127.0.0.1", port)


def test_one_request_with_large_n_respects_max_running_requests(tmp_path, monkeypatch):
    import erpo_mega.rollout.engine.engine as engine_mod

    peak = []

    class Recording(engine_mod.BatchRunner):
        def step(self, max_steps=1):
            peak.append(self.active)
            return super().step(max_steps)

    monkeypatch.setattr(engine_mod, "BatchRunner", Recording)
    save_tiny_model(tmp_path, "qwen2", seed=2)
    engine = Engine(str(tmp_path), max_batch_size=4, skip_tokenizer_init=True)
    engine.load()
    try:
        outs = engine.generate({"input_ids": [4, 5], "sampling_params": {"n": 10, "max_new_tokens": 6,
                                                                         "ignore_eos": True, "temperature": 1.0}})
    finally:
        engine.shutdown()
    assert len(outs) == 10 and all(len(o["output_ids"]) == 6 for o in outs)
    assert max(peak) == 4 and sum(peak) >= 10 * 5 // 4  # ran in parts, never more than 4 at once


def test_huge_text_is_refused_before_tokenizing(tmp_path):
    from erpo_mega.rollout.protocol import ProtocolError
    from tests.rollout.helpers import save_tiny_tokenizer

    save_tiny_model(tmp_path, "qwen2", seed=2)
    save_tiny_tokenizer(tmp_path / "tok")
    engine = Engine(str(tmp_path), tokenizer_path=str(tmp_path / "tok"))
    engine.load()
    try:
        calls = []
        real = engine.tokenizer.encode
        engine.tokenizer.encode = lambda text, *a, **k: (calls.append(len(text)), real(text, *a, **k))[1]
        with pytest.raises(ProtocolError, match=r"text: prompt 0 has 5000000 characters, more than the context"):
            engine.generate({"text": "x" * 5_000_000, "sampling_params": {"max_new_tokens": 1}})
        assert calls == []                                    # refused before the tokenizer saw it
        out = engine.generate({"text": "<t5> <t6>", "sampling_params": {"max_new_tokens": 2}})
        assert calls == [9] and len(out["output_ids"]) == 2
    finally:
        engine.shutdown()


def test_weight_updates_under_continuous_load_never_mix_versions(tmp_path):
    """Greedy completions run while the weights flip between two checkpoints: each one equals
    the pure output of the checkpoint its `weight_version` names (no completion spans both)."""
    save_tiny_model(tmp_path / "a", "qwen2", seed=11)
    save_tiny_model(tmp_path / "b", "qwen2", seed=12)
    prompts = [[5, 6, 7], [9, 10], [20, 21, 22, 23]]
    body = lambda p: {"input_ids": p, "sampling_params": {"max_new_tokens": 12, "temperature": 0,  # noqa: E731
                                                          "ignore_eos": True}}
    engine = Engine(str(tmp_path / "a"), skip_tokenizer_init=True)
    engine.load()
    try:
        ref = {}
        for name in ("b", "a"):
            assert engine.update_weights_from_disk({"model_path": str(tmp_path / name),
                                                    "weight_version": name})["success"]
            ref[name] = [engine.generate(body(p))["output_ids"] for p in prompts]
        assert ref["a"] != ref["b"]
        results, stop = [], threading.Event()

        def client(k):
            while not stop.is_set():
                out = engine.generate(body(prompts[k % 3]))
                results.append((k % 3, out["meta_info"]["weight_version"], out["output_ids"]))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for i in range(8):
            name = "ab"[i % 2 == 0]
            out = engine.update_weights_from_disk({"model_path": str(tmp_path / name), "weight_version": name})
            assert out["success"], out
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        engine.shutdown()
    assert len({v for _, v, _ in results}) == 2 and len(results) > 20
    for k, version, ids in results:
        assert ids == ref[version][k], (k, version)
