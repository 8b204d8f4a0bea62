"""Tokenizing prompts, turning streamed token ids back into text deltas, and finding stop strings in them."""

from __future__ import annotations

from typing import Any

from tandem.errors import InvalidRequest


class TextCodec:
    """The served model's tokenizer (loaded from its local directory; no hub access)."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.eos_token_id: int | None = self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequest(f"messages[{i}] must have a string 'role' and a string 'content'")
        if not self.tok.chat_template:
            raise InvalidRequest("the served model has no chat template; use /v1/completions")
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self.tok)


class Detokenizer:
    """Incremental detokenizing: emits only text that later tokens cannot change.

    Decodes a short window of already-emitted tokens together with the new ones
    so that multi-token characters and leading spaces come out right.
    """

    WINDOW = 6

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self._tok.decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = self._tok.decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self._prefix_offset = max(0, len(self.ids) - self.WINDOW)
            self._read_offset = len(self.ids)
            # re-anchor the window on what has now been emitted
            return delta
        return ""


class StopMatcher:
    """Finds stop strings in streamed text, holding back what could still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop string that matched or None)."""
        if not self.stops:
            return delta, None
        self._pending += delta
        hits = [(self._pending.find(s), s) for s in self.stops if s in self._pending]
        if hits:
            pos, stop = min(hits)
            out, self._pending = self._pending[:pos], ""
            return out, stop
        cut = max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
