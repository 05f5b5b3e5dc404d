"""Strategy prompting of an instruction-tuned chat model without fine-tuning (the paper's
section 4.3): prompts, a local backend (any Hugging Face chat model or GGUF file) and an
OpenAI-compatible HTTP backend."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request

from tqdm.auto import tqdm

from mhsupport.errors import MhsError
from mhsupport.modeling.formatting import ChatTemplateFormatter
from mhsupport.modeling.decoding import generate

ROLES = {"seeker": "user", "supporter": "assistant"}


def system_prompt(llm_cfg, category: str | None) -> str:
    parts = [llm_cfg.system_prompt.strip()]
    if llm_cfg.prompt == "cot":
        parts.append(llm_cfg.cot_instruction.strip())
    if category is not None:
        parts.append(llm_cfg.strategy_instruction.format(category=category,
                                                         description=llm_cfg.category_descriptions[category]))
    return " ".join(parts)


def final_answer(text: str) -> str:
    """The reply after the last 'Answer:' of a chain-of-thought output (the whole text if none)."""
    parts = re.split(r"answer\s*:", text, flags=re.IGNORECASE)
    answer = parts[-1] if len(parts) > 1 else re.sub(r"^\s*thoughts\s*:.*?(\n|$)", "", text, flags=re.IGNORECASE)
    return " ".join(answer.split())


class LocalChatBackend:
    """A local chat model: batched greedy generation under each distinct system prompt (each finished
    batch kept in `batches`, a run's finished batches, when given)."""

    def __init__(self, model, tokenizer, max_context_tokens: int, batches=None):
        if tokenizer.chat_template is None:
            raise MhsError("the local LLM backend needs a chat model (its tokenizer has no chat template)")
        self.model, self.tokenizer, self.max_context_tokens = model, tokenizer, max_context_tokens
        self.batches = batches

    def formatter(self, prompt: str) -> ChatTemplateFormatter:
        return ChatTemplateFormatter(self.tokenizer, self.max_context_tokens, 10_000, None, system_prompt=prompt)

    def respond(self, contexts: list[list[dict]], prompts: list[str], max_new_tokens: int, batch_size: int,
                progress: bool) -> list[str]:
        replies: list[str | None] = [None] * len(contexts)
        for number, prompt in enumerate(sorted(set(prompts))):
            rows = [i for i, p in enumerate(prompts) if p == prompt]
            outputs = generate(self.model, self.tokenizer, self.formatter(prompt), [contexts[i] for i in rows],
                               [None] * len(rows), batch_size=batch_size, max_new_tokens=max_new_tokens,
                               progress=progress, batches=self.batches, name=f"generate-prompt{number}")
            for i, output in zip(rows, outputs):
                replies[i] = output["response"]
        return replies


class OpenAICompatibleBackend:
    """POST {base_url}/chat/completions, one request per context, greedy (temperature 0)."""

    def __init__(self, llm_cfg):
        if not llm_cfg.model_name:
            raise MhsError("llm.backend=openai needs llm.model_name")
        self.url = llm_cfg.base_url.rstrip("/") + "/chat/completions"
        self.model_name = llm_cfg.model_name
        self.key = os.environ.get(llm_cfg.api_key_env, "")
        self.timeout = llm_cfg.timeout_s

    def respond(self, contexts, prompts, max_new_tokens: int, batch_size: int, progress: bool) -> list[str]:
        replies = []
        for context, prompt in tqdm(list(zip(contexts, prompts)), desc="llm requests", disable=not progress):
            messages = [{"role": "system", "content": prompt}] + [
                {"role": ROLES[t["speaker"]], "content": t["text"]} for t in context]
            body = json.dumps({"model": self.model_name, "messages": messages, "max_tokens": max_new_tokens,
                               "temperature": 0}).encode()
            request = urllib.request.Request(self.url, data=body, headers={
                "Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read())
                replies.append(" ".join(answer["choices"][0]["message"]["content"].split()))
            except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError) as err:
                raise MhsError(f"LLM endpoint {self.url}: {err}") from None
        return replies
