"""Tokenizing prompts, turning streamed token ids back into text deltas, and finding stop strings in them."""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import random
from pathlib import Path
from typing import Any

from tandem.errors import InvalidRequest

logger = logging.getLogger(__name__)

# Texts longer than this are tokenized on a worker thread through the tokenizers library's batch
# call, which releases the GIL (its single-text encode does not), so a long prompt never holds
# the coordinator's event loop; shorter ones cost less inline than the thread hop.
INLINE_CHARS = 4096


class FastTokenizer:
    """The model's tokenizer.json through the ``tokenizers`` library alone: no transformers, no
    torch in the coordinator. Chat templates are rendered with jinja2 the way transformers does
    (a sandbox, trim_blocks and lstrip_blocks, loop controls, ``raise_exception``,
    ``strftime_now``, the special tokens by name) and tokenized without added special tokens."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._fast: Any = getattr(self._tok, "encode_batch_fast", None)
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
            try:
                config.update(json.loads((model_dir / name).read_text()))
            except FileNotFoundError:
                pass
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.special: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = config.get(name)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                self.special[name] = v
        eos = self.special.get("eos_token")
        self.eos_token_id: int | None = self._tok.token_to_id(eos) if eos else None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.exists():
            template = jinja_file.read_text()
        self.chat_template: str | None = template if isinstance(template, str) and template else None
        self._compiled: Any = None

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Without the offsets nobody here reads (tokenizers >= 0.21): a quarter less time, the same ids.
        if self._fast is not None:
            return self._fast([text], add_special_tokens=add_special_tokens)[0].ids  # type: ignore[no-any-return]
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids  # type: ignore[no-any-return]

    def encode_off_gil(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The same ids; the GIL released while it runs (for a worker thread): the batch calls release it."""
        return (self._fast or self._tok.encode_batch)([text], add_special_tokens=add_special_tokens)[0].ids  # type: ignore[no-any-return]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:  # as transformers' tokenizers
        return [self._tok.id_to_token(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))
        if self.clean_up_spaces:  # what transformers does with the flag
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def byte_table(self) -> list[bytes] | None:
        """Each id's bytes, for a tokenizer whose decoder is ByteLevel alone and that asks for no
        cleanup of spaces (Qwen 2's, the tiny model's; not Llama 3's, whose config asks for the
        cleanup): decoding is then joining the tokens' bytes (a special token's: none) and reading
        them as UTF-8, which a stream can do a message at a time without decoding again. None for
        any other decoder, with the cleanup of spaces, or when the table does not decode the
        whole vocabulary (and random runs of it) exactly as the tokenizer does."""
        from tokenizers.decoders import ByteLevel

        if self.clean_up_spaces or not isinstance(self._tok.decoder, ByteLevel):
            return None
        chars = _byte_chars()
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        n = len(self)
        table: list[bytes] = []
        for i in range(n):
            token = self._tok.id_to_token(i)
            if token is None or i in special:
                table.append(b"")
            elif all(c in chars for c in token):  # (as the decoder: a token it cannot map goes as its UTF-8)
                table.append(bytes(chars[c] for c in token))
            else:
                table.append(token.encode())
        rng = random.Random(0)
        runs = [list(range(i, min(n, i + 64))) for i in range(0, n, 64)]
        runs += [[rng.randrange(n) for _ in range(32)] for _ in range(64)]
        for ids in runs:
            if b"".join(table[i] for i in ids).decode("utf-8", "replace") != self.decode(ids):
                logger.info("the tokenizer's ByteLevel decoder does more than join bytes (ids %d..): streams "
                            "are detokenized through it", ids[0])
                return None
        return table

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self._compiled is None:
            def raise_exception(message: str) -> None:
                raise jinja2.exceptions.TemplateError(message)

            def strftime_now(fmt: str) -> str:
                import datetime

                return datetime.datetime.now().strftime(fmt)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols", _generation_extension()])
            env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
                json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            self._compiled = env.from_string(self.chat_template or "")
        try:
            return str(self._compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                             **self.special))
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequest(f"the chat template refused the messages: {exc}") from None


def _byte_chars() -> dict[str, int]:
    """ByteLevel's alphabet: the character standing for each byte (GPT-2's bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


def _generation_extension() -> Any:
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant masks in transformers): the body as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation


_UNKNOWN = object()


class TextCodec:
    """The served model's tokenizer, from its local directory (no hub access): tokenizer.json
    through the ``tokenizers`` library; only a model without one goes through transformers
    (slower to load, and it imports torch; the coordinator says so when it starts)."""

    def __init__(self, model_dir: str) -> None:
        path = Path(model_dir)
        self.tok: Any
        if (path / "tokenizer.json").exists():
            self.tok = FastTokenizer(path)
            self.backend = "tokenizers"
        else:
            logger.warning("%s has no tokenizer.json: tokenizing through transformers (it imports torch and "
                           "loads more slowly)", model_dir)
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ValueError(f"{model_dir} has no tokenizer.json, and transformers (which reads other "
                                 "tokenizers) is not installed: pip install 'tandem-serve[node]', or save the "
                                 "tokenizer as tokenizer.json") from None

            self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.backend = "transformers"
        self.eos_token_id: int | None = self.tok.eos_token_id
        self.vocab_size = len(self.tok)
        self._bytes: object = _UNKNOWN  # detokenizer()'s table

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    async def encode_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``encode``, on a worker thread when the text is long."""
        if len(text) <= INLINE_CHARS or not isinstance(self.tok, FastTokenizer):
            return self.encode(text, add_special_tokens)
        return await asyncio.get_running_loop().run_in_executor(None, self.tok.encode_off_gil, text,
                                                                add_special_tokens)

    def token_strs(self, ids: list[int]) -> list[str | None]:
        """Each id's token as the vocabulary spells it (vLLM's /tokenize ``token_strs``)."""
        return list(self.tok.convert_ids_to_tokens(ids))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequest(f"messages[{i}] must have a string 'role' and a string 'content'")
        if not self.tok.chat_template:
            raise InvalidRequest("the served model has no chat template; use /v1/completions")
        if isinstance(self.tok, FastTokenizer):
            return self.tok.encode_off_gil(self.tok.render_chat(messages), add_special_tokens=False)
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    async def encode_chat_async(self, messages: list[dict[str, Any]]) -> list[int]:
        if not isinstance(self.tok, FastTokenizer) or sum(
                len(m.get("content", "")) for m in messages if isinstance(m, dict)
                and isinstance(m.get("content"), str)) <= INLINE_CHARS:
            return self.encode_chat(messages)
        return await asyncio.get_running_loop().run_in_executor(None, self.encode_chat, messages)

    def check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def detokenizer(self) -> Detokenizer | ByteDetokenizer:
        """A stream's detokenizer: by the token bytes when the tokenizer allows it (``byte_table``,
        worked out at the first call), else through the tokenizer's decoder."""
        if self._bytes is _UNKNOWN:
            self._bytes = self.tok.byte_table() if isinstance(self.tok, FastTokenizer) else None
        if self._bytes is not None:
            return ByteDetokenizer(self._bytes)  # type: ignore[arg-type]
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

    def _unsent(self) -> str:
        """The text of the tokens after the last emitted, decoded with the window before them."""
        prefix = self._tok.decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = self._tok.decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        return full[len(prefix):]

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        delta = self._unsent()
        if delta and not delta.endswith("\ufffd"):
            self._prefix_offset = max(0, len(self.ids) - self.WINDOW)
            self._read_offset = len(self.ids)
            # re-anchor the window on what has now been emitted
            return delta
        return ""

    def flush(self) -> str:
        """At the end of the output: the text held back because it ended in an unfinished
        character, without that character (a message's whole text waits on its last one)."""
        delta = self._unsent()
        self._prefix_offset = self._read_offset = len(self.ids)
        return delta.rstrip("\ufffd")


class ByteDetokenizer:
    """Incremental detokenizing for a ByteLevel tokenizer (``FastTokenizer.byte_table``): each
    message's tokens' bytes through one incremental UTF-8 reader, so a character split across
    messages waits until it is whole, and bytes that are no character come out as the
    replacement character at once, as decoding the whole output would have them."""

    def __init__(self, table: list[bytes]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.ids: list[int] = []

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        table, n = self._table, len(self._table)
        return str(self._utf8.decode(b"".join([table[i] if 0 <= i < n else b"" for i in new_ids])))

    def flush(self) -> str:
        """At the end of the output: nothing more (the bytes of an unfinished last character are
        dropped, as ``Detokenizer.flush`` drops it; every whole character went out already)."""
        self._utf8.reset()
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
