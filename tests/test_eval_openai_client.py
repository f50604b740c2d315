"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1: retries (429 with
Retry-After, 5xx), a server that never answers, and an API key that never reaches an error or a log."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from montessori import openai_client
from montessori.errors import ConfigError
from montessori.openai_client import EndpointError, chat_completion

KEY = "sk-test-secret-4711"


def _completion(content: str) -> dict:
    return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}]}


class Server:
    """A scripted endpoint: each POST takes the next (status, headers, body) from `script`, or
    `hang` (read the request, never answer); past the script's end it answers `default`."""

    def __init__(self, script, default=("hang",), port=0):
        self.script, self.default = list(script), default
        self.requests: list[dict] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"time": time.monotonic(), "path": self.path, "body": body,
                                       "authorization": self.headers.get("Authorization")})
                step = outer.script.pop(0) if outer.script else outer.default
                if step[0] == "hang":
                    outer.release.wait(30)
                    return
                status, headers, payload = step
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    openai_client._client.cache_clear()
    servers = []

    def start(script, default=("hang",)):
        servers.append(Server(script, default))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_retries_429_with_retry_after_then_500_then_succeeds(serve, caplog):
    server = serve([
        (429, {"Retry-After": "3"}, {"error": {"message": "slow down"}}),
        (500, {}, {"error": {"message": "boom"}}),
        (200, {}, _completion("M")),
    ])
    caplog.set_level(logging.DEBUG)
    response = chat_completion(server.url, "judge", [{"role": "user", "content": "hi"}], api_key_env="JUDGE_KEY",
                               config_key="evaluation.judge", max_tokens=1, logprobs=True, top_logprobs=5,
                               timeout=5, retries=3)
    assert response["choices"][0]["message"]["content"] == "M"
    assert len(server.requests) == 3
    times = [r["time"] for r in server.requests]
    # Retry-After: 3 is honoured (the client's own first backoff is at most half a second)
    assert times[1] - times[0] >= 2.95
    # after the 500, the client's exponential backoff (about a second), not the old Retry-After
    assert times[2] - times[1] < 2.5
    assert all(r["path"] == "/v1/chat/completions" for r in server.requests)
    assert server.requests[0]["body"]["top_logprobs"] == 5 and server.requests[0]["body"]["max_tokens"] == 1
    assert server.requests[0]["authorization"] == f"Bearer {KEY}"
    assert KEY not in caplog.text


def test_a_server_that_never_answers_fails_clearly_in_bounded_time(serve):
    server = serve([])
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"did not answer within 0.5 s, 2 attempts"):
        chat_completion(server.url, "judge", [{"role": "user", "content": "hi"}], api_key_env="JUDGE_KEY",
                        config_key="evaluation.judge", timeout=0.5, retries=1)
    assert time.monotonic() - started < 10
    assert len(server.requests) == 2


def test_client_errors_are_final_and_never_show_the_key(serve):
    # a server that echoes the request's key in its error message
    server = serve([(401, {}, {"error": {"message": f"bad key {KEY}"}})], default=(200, {}, _completion("m")))
    with pytest.raises(EndpointError) as caught:
        chat_completion(server.url, "judge", [{"role": "user", "content": "hi"}], api_key_env="JUDGE_KEY",
                        config_key="evaluation.judge", timeout=5, retries=3)
    assert "HTTP 401" in str(caught.value) and "evaluation.judge" in str(caught.value)
    assert KEY not in str(caught.value) and "***" in str(caught.value)
    assert len(server.requests) == 1


def test_an_unreachable_endpoint_is_named():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EndpointError, match=r"could not reach http://127.0.0.1:\d+/v1/chat/completions \(config key 'x'\) after 1 attempts"):
        chat_completion(f"http://127.0.0.1:{port}/v1", "m", [], api_key_env="PATH", config_key="x", retries=0)


def test_the_key_must_be_in_the_environment(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="'NO_SUCH_KEY_VAR'"):
        chat_completion("http://127.0.0.1:1/v1", "m", [], api_key_env="NO_SUCH_KEY_VAR", config_key="evaluation.judge")
