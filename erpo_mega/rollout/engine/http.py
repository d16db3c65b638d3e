"""SGLang's HTTP endpoints over the stdlib ThreadingHTTPServer, backed by an `Engine`.

Status codes follow SGLang 0.5.23: a refused weight operation is HTTP 400 with
`{"success": false, "message": ...}`, an invalid request 400 `{"error": {"message": ...}}`,
/health 503 while loading, and with `api_key` set a request without the right
`Authorization: Bearer` header 401 `{"error": "Unauthorized"}` before its body is read.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from erpo_mega.rollout.engine.auth import request_allowed
from erpo_mega.rollout.engine.engine import Engine, EngineUnavailable
from erpo_mega.rollout.protocol import ProtocolError

log = logging.getLogger("erpo_mega.engine.http")

# path -> (allowed methods, Engine method name taking the JSON body)
ROUTES = {
    "/generate": ({"POST"}, "generate"),
    "/update_weights_from_disk": ({"POST"}, "update_weights_from_disk"),
    "/update_weights_from_tensor": ({"POST"}, "update_weights_from_tensor"),
    "/init_weights_update_group": ({"POST"}, "init_weights_update_group"),
    "/update_weights_from_distributed": ({"POST"}, "update_weights_from_distributed"),
    "/destroy_weights_update_group": ({"POST"}, "destroy_weights_update_group"),
    "/begin_weight_update": ({"POST"}, "begin_weight_update"),
    "/end_weight_update": ({"POST"}, "end_weight_update"),
    "/get_weights_by_name": ({"GET", "POST"}, "get_weights_by_name"),
    "/update_weight_version": ({"POST"}, "update_weight_version"),
    "/release_memory_occupation": ({"POST"}, "release_memory_occupation"),
    "/resume_memory_occupation": ({"POST"}, "resume_memory_occupation"),
    "/abort_request": ({"POST"}, "abort"),
    "/pause_generation": ({"POST"}, "pause_generation"),
    "/continue_generation": ({"POST"}, "continue_generation"),
}


class _Handler(BaseHTTPRequestHandler):
    server: EngineHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route access logs through logging (debug level)
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, payload, content_type: str = "application/json") -> None:
        body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "code": status}})

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw.strip():
            return {}
        return json.loads(raw)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        engine = self.server.engine
        path = self.path.split("?", 1)[0]
        if not request_allowed(method, path, self.headers.get("Authorization"), self.server.api_key):
            self.close_connection = True  # the body is not read: do not reuse the stream
            return self._send(401, {"error": "Unauthorized"})
        try:
            body = self._body()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._error(400, f"invalid JSON body: {e}")
        if path in ("/health", "/health_generate"):
            if not engine.ready.is_set():
                return self._send(503, {"status": "loading"})
            if path == "/health_generate":
                try:
                    engine.generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1}})
                except Exception as e:  # unhealthy engine: 503 with the reason
                    return self._send(503, {"status": "unhealthy", "message": str(e)})
            return self._send(200, "", "text/plain")
        if not engine.ready.is_set():
            return self._error(503, "server is still loading the model")
        if path in ("/flush_cache",):
            return self._send(200, "Cache flushed.\n", "text/plain")
        if path in ("/model_info", "/get_model_info"):
            return self._send(200, engine.model_info())
        if path in ("/server_info", "/get_server_info"):
            return self._send(200, engine.server_info())
        if path == "/get_weight_version":
            return self._send(200, {"weight_version": engine.weight_version})
        route = ROUTES.get(path)
        if route is None:
            return self._error(404, f"no such endpoint {path}")
        methods, name = route
        if method not in methods:
            return self._error(405, f"{path} accepts {sorted(methods)}")
        try:
            result = getattr(engine, name)(body)
        except ProtocolError as e:
            return self._error(400, str(e))
        except EngineUnavailable as e:
            return self._error(409, str(e))
        except Exception as e:  # a server bug, not the caller's: 500 keeps the message
            log.exception("%s failed", path)
            return self._error(500, f"{type(e).__name__}: {e}")
        refused = isinstance(result, dict) and result.get("success") is False
        self._send(400 if refused else 200, result)


class EngineHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, engine: Engine, host: str, port: int, api_key: str | None = None):
        self.engine = engine
        self.api_key = api_key or None
        super().__init__((host, port), _Handler)
