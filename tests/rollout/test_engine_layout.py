"""Weight-group layout from what each engine reports: tp_size from server info, dp 1 enforced.

Small HTTP servers answer `/server_info` (SGLang 0.5.23) or only the older `/get_server_info`
with a given layout; the sender's world size and rank offsets must follow SGLang's
`rank = rank_offset + tp_rank` with the trainer as rank 0.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from erpo_mega.rollout.client import SGLangClient, WeightUpdateError
from erpo_mega.weights.transport import DistributedWeightSender


def serve_info(info: dict, path: str = "/server_info"):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            code, body = (200, info) if self.path == path else (404, {"detail": "Not Found"})
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def engines():
    servers = [serve_info({"tp_size": 2, "dp_size": 1}), serve_info({"tp_size": 1}, "/get_server_info"),
               serve_info({"tp_size": 4, "dp_size": 1})]
    yield [SGLangClient(f"http://127.0.0.1:{s.server_port}", max_retries=0) for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def test_group_layout_follows_each_engines_tp_size(engines):
    assert [e.engine_tp_size() for e in engines] == [2, 1, 4]
    sender = DistributedWeightSender(engines, "127.0.0.1", 1, backend="gloo")
    try:
        # trainer rank 0; engine 0 ranks 1-2, engine 1 rank 3, engine 2 ranks 4-7
        assert sender.rank_offsets == [1, 3, 4] and sender.world_size == 8
    finally:
        sender.close()


def test_dp_size_above_one_is_refused_before_any_weight_update():
    server = serve_info({"tp_size": 1, "dp_size": 8})
    try:
        client = SGLangClient(f"http://127.0.0.1:{server.server_port}", max_retries=0)
        with pytest.raises(WeightUpdateError, match="dp_size=8.*dp_size == 1"):
            DistributedWeightSender([client], "127.0.0.1", 1, backend="gloo")
    finally:
        server.shutdown()
        server.server_close()
