"""Strategy prompting of a chat model: the OpenAI-compatible backend against a small local fake
server, and the local backend on the offline SmolLM2 (slow)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mhsupport.cli import main
from mhsupport.evaluation.generations_io import read_generations
from mhsupport.evaluation.llm import final_answer
from mhsupport import pipeline

CLF = ["classifier=tiny", "classifier.train_subset=200"]
LLM = ["generator=tiny", *CLF, "generator_source=llm", "llm.backend=openai", "llm.model_name=fake-model",
       "llm.test_subset=6", "bootstrap.resamples=20", "runtime.progress=false"]


class FakeChatServer(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions with a chain-of-thought-shaped reply; remembers requests."""
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChatServer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        reply = "Thoughts: they feel alone.\nAnswer: That sounds really hard, I am here for you."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeChatServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.fixture(scope="module")
def classifiers(make_cfg, prepared):
    pipeline.run("train_classifier", make_cfg("train_classifier", *CLF))
    pipeline.run("train_classifier", make_cfg("train_classifier", *CLF, "mode=response"))
    return prepared


def test_final_answer_keeps_only_the_reply():
    assert final_answer("Thoughts: sad.\nAnswer: I hear you.") == "I hear you."
    assert final_answer("thoughts: x\nanswer: a\nANSWER:  b  c") == "b c"
    assert final_answer("Just a reply.") == "Just a reply."


@pytest.mark.parametrize("prompt", ["vanilla", "cot", "strategy", "oracle"])
def test_openai_backend_prompts(make_cfg, classifiers, server, prompt, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "secret-123")
    FakeChatServer.requests.clear()
    result = pipeline.Pipeline().ensure("eval", make_cfg("eval", *LLM, f"llm.base_url={server}", f"llm.prompt={prompt}",
                                       "llm.api_key_env=FAKE_KEY"))
    requests = FakeChatServer.requests
    assert len(requests) == 6 and requests[0]["path"] == "/v1/chat/completions"
    assert requests[0]["auth"] == "Bearer secret-123" and requests[0]["body"]["model"] == "fake-model"
    system = requests[0]["body"]["messages"][0]
    assert system["role"] == "system" and requests[0]["body"]["messages"][-1]["role"] in ("user", "assistant")
    lines = read_generations(result.run.path)
    m = result.metrics["metrics"]
    assert "ppl" not in m  # no token probabilities from an HTTP endpoint
    if prompt == "cot":
        assert "Answer:" in system["content"]
        assert all(l["response"] == "That sounds really hard, I am here for you." for l in lines)
    else:
        assert all(l["response"].startswith("Thoughts:") for l in lines)
    if prompt in ("strategy", "oracle"):
        assert "use this support strategy" in system["content"] and "tag_adherence" in m
        assert all(l["chosen_tag"] in ("Comforting", "Exploration", "Action", "Others") for l in lines)
    if prompt == "oracle":
        assert m["strategy_accuracy"]["value"] == 100.0
        assert all(l["chosen_tag"] == l["gold_category"] for l in lines)
    assert result.metrics["system"] == f"LLM (openai, fake-model) / {prompt}"


def test_unreachable_endpoint_is_a_clear_error(classifiers, capsys):
    raw, artifacts = classifiers
    code = main(["eval", "--generator", "llm", "--prompt", "vanilla", "--profile", "tiny", f"paths.raw_dir={raw}",
                 f"paths.artifacts_dir={artifacts}", "llm.backend=openai", "llm.model_name=m",
                 "llm.base_url=http://127.0.0.1:9/v1", "llm.test_subset=2", "runtime.llm.max_retries=1"])
    err = capsys.readouterr().err
    assert code == 2 and "LLM endpoint http://127.0.0.1:9/v1: unreachable" in err and "llm.base_url" in err


@pytest.mark.slow
def test_local_backend_on_smollm2(make_cfg, prepared, offline_models_dir):
    models_dir = offline_models_dir
    result = pipeline.Pipeline().ensure("eval", make_cfg("eval", "generator=cpu", "generator_source=llm",
                                       f"paths.models_dir={models_dir}", "llm.prompt=vanilla", "llm.test_subset=4",
                                       "llm.max_new_tokens=16", "bootstrap.resamples=20", "tag_adherence=false"))
    lines = read_generations(result.run.path)
    assert len(lines) == 4 and all(len(l["response"].split()) >= 3 for l in lines)
    assert 1 < result.metrics["metrics"]["ppl"]["value"] < 1000
