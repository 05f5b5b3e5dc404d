"""A real HTTP server for tests, on loopback, that speaks the OpenAI chat-completions protocol with a
scripted judge: it prefers the first position, the longer reply, answers garbage, fails twice with
503 before answering, answers slowly, fails every request with one status, or stops answering after
a number of requests."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedJudge(BaseHTTPRequestHandler):
    """POST /v1/chat/completions answered by `behaviour`; every request is remembered."""
    behaviour = "longer"
    status = None  # an HTTP status to answer every request with instead (401, 404, ...)
    answer_limit = None  # answer this many requests, then hold every later one until `release` is set
    release = threading.Event()
    requests: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        with ScriptedJudge.lock:
            ScriptedJudge.requests.append(body)
            attempt = sum(r["messages"][-1]["content"] == user for r in ScriptedJudge.requests)
            answered = len(ScriptedJudge.requests)
        if self.status is not None:
            return self._send(self.status, {"error": {"message": "scripted failure", "type": "invalid_request_error"}})
        if self.answer_limit is not None and answered > self.answer_limit:
            ScriptedJudge.release.wait(60)
            return
        if self.behaviour == "flaky" and attempt <= 2:
            return self._send(503, {"error": {"message": "overloaded"}}, retry_after="0.05")
        if self.behaviour == "slow":
            time.sleep(3)
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted-judge",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": self.verdict(user)}}]})

    def verdict(self, user: str) -> str:
        if self.behaviour == "first":
            return "Reply A is warmer.\n[[A]]"
        if self.behaviour == "garbage":
            return "I think both are fine, really."
        reply_a, reply_b = replies(user)
        longer = len(reply_a.split()) - len(reply_b.split())
        return "Reasons.\n" + ("[[A]]" if longer > 0 else "[[B]]" if longer < 0 else "[[C]]")

    def _send(self, status, payload, retry_after=None):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if retry_after:
                self.send_header("Retry-After", retry_after)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):  # GET /v1/models: what the server serves
        self._send(200, {"object": "list", "data": [{"id": "scripted-judge", "object": "model", "created": 0,
                                                     "owned_by": "test"}]})

    def log_message(self, *args):
        pass


def replies(user: str) -> tuple[str, str]:
    """Reply A and Reply B as the judge prompt shows them (an empty reply is shown as "(no reply)")."""
    found = re.search(r"### Reply A\n(.*?)\n\n### Reply B\n(.*?)\n\n### Question", user, re.S)
    return tuple("" if reply == "(no reply)" else reply for reply in found.groups())


def serve() -> tuple[ThreadingHTTPServer, str]:
    """A fresh server in a thread, its script reset: (server, its base URL)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    httpd.daemon_threads = True
    ScriptedJudge.behaviour, ScriptedJudge.status, ScriptedJudge.answer_limit = "longer", None, None
    ScriptedJudge.requests.clear()
    ScriptedJudge.release.clear()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"


def stop(httpd: ThreadingHTTPServer) -> None:
    ScriptedJudge.release.set()  # requests held by answer_limit end without an answer
    httpd.shutdown()
    httpd.server_close()
