"""What a router remembers of the prompts it sent each engine: its estimate of their prefix caches.

A router in front of real engines does not see their caches. It sees every prompt it forwards, so
it can remember which prompt prefixes went where and place a request that shares a long prefix
with earlier ones on the engine that has probably kept them (the idea of SGLang's cache-aware
router and Ray Serve's prefix-aware router; written here from that idea alone). The estimate is
wrong where an engine evicted what it was sent, and blind to prefixes another router sent, so it
only ranks engines; the dispatcher's imbalance limit keeps it from piling onto one.

Glossary
  chunk   a block's worth of prompt: ``block_tokens`` token ids, or ``4 * block_tokens`` characters
          of text (the router has no tokenizer; about four UTF-8 bytes per token). A chat request's
          text is its messages in order, each as role and content, so that the next turn of a
          conversation (the same messages and more) extends the same text.
  key     a chunk's hash chained with the keys before it: equal keys mean equal prefixes.
  hits    per engine, how many of a request's leading keys that engine was sent before (in blocks).
  capacity  per engine, how many keys it remembers (least recently sent forgotten first): its KV
          cache in blocks once its load report says so.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional

import numpy as np

CHARS_PER_TOKEN = 4
MAX_KEYS = 1 << 18  # per engine, before its KV capacity is known (about 30 MB)
MAX_REQUEST_KEYS = 8192  # a request's leading chunks that count (128k tokens at 16 a block)


def _prompt_parts(path: str, body: dict) -> tuple[list, bool]:
    """(parts, tokens): the prompt as token ids (tokens True) or as text pieces."""
    if path.endswith("/chat/completions"):
        messages = body.get("messages") or []
        return [f"{m.get('role', '')}\x00{m.get('content', '')}\x00" for m in messages if isinstance(m, dict)], False
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return prompt, True
    if isinstance(prompt, list) and prompt:  # several prompts: the first one's prefix places the request
        first = prompt[0]
        return (first, True) if isinstance(first, list) else ([str(first)], False)
    return [str(prompt)], False


def prompt_keys(path: str, body: dict, block_tokens: int) -> list:
    """The chained keys of a request's full chunks, at most MAX_REQUEST_KEYS (see the glossary).
    A prompt this cannot read (the engine will answer it) has none: it is placed by load alone."""
    try:
        parts, tokens = _prompt_parts(path, body)
        if tokens:
            width = block_tokens
            data = np.asarray(parts[:width * MAX_REQUEST_KEYS], np.int64)
            chunks = [data[i:i + width].tobytes() for i in range(0, data.size - width + 1, width)]
        else:
            width = CHARS_PER_TOKEN * block_tokens
            text = "".join(parts).encode()[:width * MAX_REQUEST_KEYS]
            chunks = [text[i:i + width] for i in range(0, len(text) - width + 1, width)]
    except (TypeError, ValueError, OverflowError):
        return []
    keys, previous = [], b""
    for chunk in chunks:
        previous = hashlib.blake2b(previous + chunk, digest_size=8).digest()
        keys.append(previous)
    return keys


class PrefixHistory:
    """Per engine, the keys of the prompts sent there (see the module docstring)."""

    def __init__(self, num_engines: int):
        self._keys = [OrderedDict() for _ in range(num_engines)]
        self._capacity = [MAX_KEYS] * num_engines

    def hits(self, keys: list) -> np.ndarray:
        """Leading keys each engine was sent, in blocks: shape (engines,)."""
        out = np.zeros(len(self._keys), np.int64)
        for engine, known in enumerate(self._keys):
            n = 0
            for key in keys:
                if key not in known:
                    break
                n += 1
            out[engine] = n
        return out

    def record(self, engine: int, keys: list) -> None:
        """``keys`` were sent to ``engine``: remembered as its most recent, the head of the prompt
        most recent of all (forgotten last, as a cache evicts a prefix's tail first)."""
        known = self._keys[engine]
        for key in reversed(keys):
            known[key] = None
            known.move_to_end(key)
        while len(known) > self._capacity[engine]:
            known.popitem(last=False)

    def set_capacity(self, engine: int, blocks: Optional[int]) -> None:
        """How many keys ``engine`` can hold (its KV cache in blocks; None: MAX_KEYS)."""
        self._capacity[engine] = max(1, int(blocks)) if blocks else MAX_KEYS
        known = self._keys[engine]
        while len(known) > self._capacity[engine]:
            known.popitem(last=False)

    def forget(self, engine: int) -> None:
        """``engine`` lost its cache (it failed, or restarted)."""
        self._keys[engine].clear()

    def forget_all(self) -> None:
        """Every key is stale (the block size changed)."""
        for known in self._keys:
            known.clear()
