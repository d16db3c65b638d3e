"""SGLang's HTTP endpoints over the stdlib ThreadingHTTPServer, backed by an `Engine`.

Status codes follow SGLang 0.5.23: a refused weight operation is HTTP 400 with
`{"success": false, "message": ...}`, an invalid request 400 `{"error": {"message": ...}}`,
/health 503 while loading, and with `api_key` set a request without the right
`Authorization: Bearer` header 401 `{"error": "Unauthorized"}` before its body is read.

Under load (as a real server): one thread per connection with a listen backlog of
`REQUEST_QUEUE_SIZE` (the standard library's 5 reset connections at 64 concurrent clients)
and at most `max_connections` handled at once (more get 503 at once, not a hang); the
body size is checked against `max_body_bytes` from `Content-Length` before anything is
read (413), a malformed `Content-Length` or a chunked body is 400, and a client that hangs
up while its /generate waits has its sequences aborted. A port already in use is a
`PortInUseError` naming host and port.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import select
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from erpo_mega.rollout.engine.auth import request_allowed
from erpo_mega.rollout.engine.engine import Engine, EngineUnavailable
from erpo_mega.rollout.protocol import ProtocolError

log = logging.getLogger("erpo_mega.engine.http")

REQUEST_QUEUE_SIZE = 1024                  # listen backlog (the kernel caps it at somaxconn)
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # weight pushes carry shared-memory handles, not tensors
DEFAULT_MAX_CONNECTIONS = 1024
DRAIN_MAX_BYTES = 256 * 1024 * 1024        # an oversized body up to this is read and dropped, not parsed
_DIGITS = re.compile(r"[0-9]{1,19}")


_BUSY = b'{"error": {"message": "too many connections; retry later", "code": 503}}'
_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
             b"Content-Length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)


class PortInUseError(OSError):
    """The server's port is taken: a clear message instead of a bare EADDRINUSE traceback."""


class _BadBody(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

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


def _dumps(payload) -> bytes:
    """JSON bytes through orjson (as SGLang's server: a /generate answer with log-probs encodes
    ~10x faster); non-finite floats become null (as in SGLang's answers). Payloads orjson refuses
    (non-str keys, huge ints) fall back to the standard encoder."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        return json.dumps(payload).encode()


class _Handler(BaseHTTPRequestHandler):
    server: EngineHTTPServer
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: headers and body go out as two writes; with Nagle the body's last segment
    # waited for the client's delayed ACK (~40 ms per response, measured on /generate).
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # route access logs through logging (debug level)
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, payload, content_type: str = "application/json") -> None:
        body = payload.encode() if isinstance(payload, str) else _dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "code": status}})

    def _body(self):
        """The JSON body, with its size checked from the headers before a byte is read."""
        if self.headers.get("Transfer-Encoding"):
            raise _BadBody(400, "Transfer-Encoding is not supported: send the body with a Content-Length")
        header = self.headers.get("Content-Length")
        if header is None or not header.strip():
            n = 0
        elif not _DIGITS.fullmatch(header.strip()):
            raise _BadBody(400, f"invalid Content-Length header {header[:40]!r}: expected a byte count")
        else:
            n = int(header)
        limit = self.server.max_body_bytes
        if n > limit:
            if n <= DRAIN_MAX_BYTES:  # read and drop it (never kept, never parsed), so the client,
                self._discard(n)      # still sending, gets the 413 instead of a connection reset
            raise _BadBody(413, f"request body of {n} bytes exceeds the server's limit of {limit} bytes "
                                "(--max-request-bytes)")
        raw = self.rfile.read(n) if n else b""
        if len(raw) < n:
            raise ConnectionError(f"client sent {len(raw)} of {n} body bytes")
        if not raw.strip():
            return {}
        return json.loads(raw)

    def _discard(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                return
            n -= len(chunk)

    def _client_gone(self) -> bool:
        """True once the client closed its end (readable with no data); polled by /generate."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

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
        except _BadBody as e:
            self.close_connection = True  # the body was not read: do not reuse the stream
            return self._error(e.status, str(e))
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
            if name == "generate":
                result = engine.generate(body, disconnected=self._client_gone)
            else:
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
    request_queue_size = REQUEST_QUEUE_SIZE

    def __init__(self, engine: Engine, host: str, port: int, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_connections: int = DEFAULT_MAX_CONNECTIONS):
        self.engine = engine
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self._slots = threading.BoundedSemaphore(max_connections)
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(e.errno, f"cannot listen on {host}:{port}: the port is already in use "
                                              "(another server?); choose another --port") from None
            raise

    def process_request(self, request, client_address):
        """Thread per connection, at most `max_connections` at once; beyond that 503 and close."""
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_TOO_MANY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        """A client that went away mid-reply is routine under load: one debug line, no traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s went away: %s", client_address, sys.exc_info()[1])
            return
        super().handle_error(request, client_address)
