"""Prompting instruction-tuned chat models: the strategy prompts of the paper's section 4.3, and
the two backends that answer chat requests for `mhs eval --generator llm` and `mhs judge`: a
local chat model (any Hugging Face chat model or GGUF file) and any OpenAI-compatible HTTP
endpoint (vLLM, llama.cpp's server, Ollama, hosted APIs) through the official `openai` client.

A request is a list of chat messages (`{"role": "system"|"user"|"assistant", "content": ...}`).
Both backends take a list of them and return one reply per request, in order, calling
`on_answer(index, reply)` as replies arrive so that a caller can keep each one at once.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

from mhsupport.errors import MhsError
from mhsupport.modeling.formatting import ChatTemplateFormatter
from mhsupport.modeling.decoding import generate

ROLES = {"seeker": "user", "supporter": "assistant"}
SPEAKERS = {role: speaker for speaker, role in ROLES.items()}
AnswerCallback = Callable[[int, str], None]


def system_prompt(llm_cfg, category: str | None, strategy_words=None) -> str:
    """The system prompt of a prompting style, with a category and its words (`strategy_words`) when given one."""
    parts = [llm_cfg.system_prompt.strip()]
    if llm_cfg.prompt == "cot":
        parts.append(llm_cfg.cot_instruction.strip())
    if category is not None:
        parts.append(llm_cfg.strategy_instruction.format(category=category, description=strategy_words[category]))
    return " ".join(parts)


def messages(system: str | None, context: list[dict]) -> list[dict]:
    """A dialogue context as chat messages: seeker = user, supporter = assistant."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": ROLES[turn["speaker"]], "content": turn["text"]} for turn in context]


def final_answer(text: str) -> str:
    """The reply after the last 'Answer:' of a chain-of-thought output (the whole text if none)."""
    parts = re.split(r"answer\s*:", text, flags=re.IGNORECASE)
    answer = parts[-1] if len(parts) > 1 else re.sub(r"^\s*thoughts\s*:.*?(\n|$)", "", text, flags=re.IGNORECASE)
    return " ".join(answer.split())


class LocalChatBackend:
    """A local chat model: batched greedy generation, requests grouped by their system prompt (whose
    tokens `generate` encodes once per call)."""

    def __init__(self, model, tokenizer, max_context_tokens: int, name: str = "local"):
        if tokenizer.chat_template is None:
            raise MhsError(f"the local chat backend needs a chat model: {name}'s tokenizer has no chat template")
        self.model, self.tokenizer, self.max_context_tokens, self.name = model, tokenizer, max_context_tokens, name

    def formatter(self, system: str | None) -> ChatTemplateFormatter:
        return ChatTemplateFormatter(self.tokenizer, self.max_context_tokens, 10_000, None, system_prompt=system)

    def complete(self, requests: list[list[dict]], max_tokens: int, batch_size: int, progress: bool = True,
                 on_answer: AnswerCallback | None = None, answer_every: int | None = None,
                 batches=None) -> list[str]:
        """One reply per request. `answer_every`: generate (and report) at most this many requests per
        call, so a caller that keeps replies loses little when interrupted; None: one call per system
        prompt (batches then hold prompts of similar length). `batches`: a run's finished batches,
        read back instead of generated and each generated one kept (`decoding.generate`)."""
        replies: list[str | None] = [None] * len(requests)
        groups: dict[str | None, list[int]] = {}
        for i, request in enumerate(requests):
            system = request[0]["content"] if request and request[0]["role"] == "system" else None
            groups.setdefault(system, []).append(i)
        for number, system in enumerate(sorted(groups, key=lambda s: s or "")):
            rows = groups[system]
            step = answer_every or len(rows)
            for start in range(0, len(rows), step):
                chunk = rows[start:start + step]
                contexts = [[{"speaker": SPEAKERS[m["role"]], "text": m["content"]} for m in requests[i]
                             if m["role"] != "system"] for i in chunk]
                outputs = generate(self.model, self.tokenizer, self.formatter(system), contexts, [None] * len(chunk),
                                   batch_size=batch_size, max_new_tokens=max_tokens, progress=progress,
                                   batches=batches, name=f"generate-prompt{number}-{start}")
                for i, output in zip(chunk, outputs):
                    replies[i] = output["response"]
                    if on_answer:
                        on_answer(i, output["response"])
        return replies


@dataclass
class EndpointKeys:
    """The config keys a user sets to fix what an endpoint error names (they differ by command)."""
    base_url: str
    model: str
    api_key_env: str
    timeout: str
    what: str  # how messages name the endpoint, e.g. "LLM endpoint"


class OpenAIChatBackend:
    """Any OpenAI-compatible chat-completions endpoint, through the official `openai` client: its own
    retries with exponential backoff on connection errors, timeouts, 408/409/429 and 5xx (honouring
    Retry-After), up to `concurrency` requests in flight."""

    def __init__(self, base_url: str, model: str | None, api_key_env: str, timeout_s: float, max_retries: int,
                 concurrency: int, keys: EndpointKeys, temperature: float = 0.0, seed: int | None = None):
        try:
            import openai
        except ImportError:
            raise MhsError("the openai backend needs the `openai` package: pip install 'mhsupport[openai]'") from None
        if not model:
            raise MhsError(f"an OpenAI-compatible endpoint needs a model name: set {keys.model}")
        self.openai, self.keys = openai, keys
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout_s, self.max_retries, self.concurrency = timeout_s, max_retries, concurrency
        self.temperature, self.seed = temperature, seed
        # Servers without authentication (vLLM, llama.cpp, Ollama) ignore the key; the client needs one.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get(api_key_env) or "no-key",
                                    timeout=timeout_s, max_retries=max_retries)
        self.served_models: set[str] = set()  # the model names the server reported in its answers

    def answer(self, request: list[dict], max_tokens: int) -> str:
        extra = {} if self.seed is None else {"seed": self.seed}
        completion = self.client.chat.completions.create(model=self.model, messages=request, max_tokens=max_tokens,
                                                         temperature=self.temperature, **extra)
        if completion.model:
            self.served_models.add(completion.model)
        if not completion.choices:
            return ""
        return completion.choices[0].message.content or ""

    def complete(self, requests: list[list[dict]], max_tokens: int, batch_size: int | None = None,
                 progress: bool = True, on_answer: AnswerCallback | None = None,
                 answer_every: int | None = None) -> list[str]:
        """One reply per request (raw text). The first request that fails for good (after the
        client's retries) stops the rest: requests in flight finish, and every reply that arrived
        is passed to `on_answer` before the error is raised as one line."""
        replies: list[str | None] = [None] * len(requests)
        reported: set[int] = set()
        failure = None
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool, \
                tqdm(total=len(requests), desc=f"{self.keys.what} requests", disable=not progress) as bar:
            futures = {pool.submit(self.answer, request, max_tokens): i for i, request in enumerate(requests)}
            pending = set(futures)
            try:
                while pending and failure is None:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        if future.exception() is not None:
                            failure = failure or future.exception()
                            continue
                        self._keep(futures[future], future.result(), replies, reported, on_answer)
                        bar.update()
            finally:  # a failure or Ctrl-C: requests not yet sent are dropped, those in flight finish
                for future in pending:
                    future.cancel()
        # Requests that were in flight when the failure came have finished now: keep their replies.
        for future, i in futures.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                self._keep(i, future.result(), replies, reported, on_answer)
        if failure is not None:
            raise self.error(failure) from None
        return replies

    @staticmethod
    def _keep(i, reply, replies, reported, on_answer):
        if i in reported:
            return
        replies[i] = reply
        reported.add(i)
        if on_answer:
            on_answer(i, reply)

    def error(self, err: BaseException) -> MhsError:
        """One line naming the endpoint, what went wrong and the setting that fixes it."""
        o, k = self.openai, self.keys
        where = f"{k.what} {self.base_url}"
        retried = f"after {self.max_retries} retries" if self.max_retries else "(no retries)"
        if isinstance(err, o.APITimeoutError):
            return MhsError(f"{where}: no answer within {self.timeout_s:g} s {retried}; raise {k.timeout} or check "
                            "the server's load")
        if isinstance(err, o.APIConnectionError):
            cause = err.__cause__ or err.__context__
            reason = f" ({_short(cause)})" if cause else ""
            return MhsError(f"{where}: unreachable{reason} {retried}; start the server, or point {k.base_url} at it")
        if isinstance(err, (o.AuthenticationError, o.PermissionDeniedError)):
            key_state = "set" if os.environ.get(self.api_key_env) else "not set"
            return MhsError(f"{where} refused the API key (HTTP {err.status_code}; ${self.api_key_env} is {key_state}): "
                            f"export {self.api_key_env}=<key>, or name another variable with {k.api_key_env}")
        if isinstance(err, o.NotFoundError):
            served = self._served_names()
            listing = f"; it serves: {', '.join(served)}" if served else ""
            return MhsError(f"{where}: model {self.model!r} not found (HTTP 404{listing}); set {k.model} to a model "
                            "the server serves")
        if isinstance(err, o.APIStatusError):
            persisted = f" {retried}" if err.status_code in (408, 409, 429) or err.status_code >= 500 else ""
            return MhsError(f"{where}: HTTP {err.status_code}{persisted}: {_short(err.message)}")
        if isinstance(err, o.OpenAIError):
            return MhsError(f"{where}: {_short(err)}")
        raise err

    def _served_names(self) -> list[str]:
        """The model names the server lists (GET /models), for the message of an unknown model."""
        try:
            return sorted(model.id for model in self.client.with_options(max_retries=0, timeout=10).models.list())[:8]
        except self.openai.OpenAIError:
            return []


def _short(value) -> str:
    return " ".join(str(value).split())[:200]
