"""LLM backend for any OpenAI-compatible streaming server (vLLM, Ollama, llama.cpp, OpenAI).

POST {base_url}/chat/completions with ``stream: true`` and read the server-sent events:
``data: {json}`` lines whose ``choices[0].delta.content`` carry the tokens, ending with
``data: [DONE]``. The persona's system prompt and the session's history make the messages.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from core.personas import Persona


class BackendError(RuntimeError):
    """The backend could not produce a reply (unreachable, timed out, bad answer)."""


# Asked of a model that continues a reply another backend started and failed to finish.
CONTINUE = ("(You were cut off. Continue your reply exactly where it stopped; do not repeat "
            "any of it.)")


def chat_messages(persona: Persona, history: list[dict], heard: str,
                  prefix: str = "") -> list[dict]:
    """The conversation as chat messages; with ``prefix``, the reply so far and a request to
    continue it (plain messages, so any OpenAI-compatible server and chat template take it)."""
    msgs = [{"role": "system", "content": persona.system_prompt or f"You are {persona.name}."}]
    for turn in history:
        msgs.append({"role": "user", "content": turn.get("player", "")})
        msgs.append({"role": "assistant", "content": turn.get("npc", "")})
    msgs.append({"role": "user", "content": heard})
    if prefix:
        msgs.append({"role": "assistant", "content": prefix})
        msgs.append({"role": "user", "content": CONTINUE})
    return msgs


class OpenAICompatBackend:
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str = "",
                 connect_timeout_s: float = 1.0, first_token_timeout_s: float = 5.0,
                 max_tokens: int = 200, temperature: float = 0.7, seed: int | None = None):
        if not base_url:
            raise ValueError("openai backend: llm.openai_url is not set")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # a dead server must fail fast so the next backend in the chain can still answer
        self.timeout = httpx.Timeout(first_token_timeout_s, connect=connect_timeout_s)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def stream_reply(self, persona: Persona, history: list[dict],
                           heard: str, prefix: str = "") -> AsyncIterator[str]:
        body = {"model": self.model, "messages": chat_messages(persona, history, heard, prefix),
                "stream": True, "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.seed is not None:
            body["seed"] = self.seed
        try:
            async with self._http().stream("POST", self.url, json=body,
                                           headers=self.headers) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:200]
                    raise BackendError(f"{self.url} answered {resp.status_code}: {text}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        delta = json.loads(data)["choices"][0].get("delta", {})
                    except (ValueError, KeyError, IndexError) as exc:
                        raise BackendError(f"unreadable stream event {data[:80]!r}") from exc
                    if delta.get("content"):
                        yield delta["content"]
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
