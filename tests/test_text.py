import json
import random
import shutil
from pathlib import Path

import pytest

from tandem.coordinator import textcodec
from tandem.coordinator.textcodec import ByteDetokenizer, Detokenizer, StopMatcher, TextCodec
from tandem.errors import InvalidRequest


def test_stop_matcher_holds_back_partial_matches_and_cuts_at_the_stop() -> None:
    m = StopMatcher(("END",))
    out = [m.feed(d) for d in ("abc E", "N", "D tail")]
    assert "".join(t for t, _ in out) == "abc "
    assert out[-1][1] == "END"


def test_stop_matcher_without_stops_passes_everything() -> None:
    m = StopMatcher(())
    assert m.feed("hello") == ("hello", None)
    assert m.flush() == ""


def test_stop_matcher_flush_returns_held_text() -> None:
    m = StopMatcher(("xyz",))
    assert m.feed("abcx") == ("ab", None)
    assert m.flush() == "cx"


def test_incremental_detokenizing_equals_decoding_all_at_once(tiny_model: Path) -> None:
    codec = TextCodec(str(tiny_model))
    ids = codec.encode("the prefill node sends the key value cache to the decode node, fast!")
    d = codec.detokenizer()
    text = "".join(d.add([t]) for t in ids)
    assert text == codec.tok.decode(ids)


@pytest.mark.parametrize("kind", ["bytes", "decoder"])
def test_a_stream_detokenized_a_message_at_a_time_is_the_whole_output_decoded(tiny_model: Path, kind: str) -> None:
    """Random ids (special tokens, characters split across messages, bytes that are no
    character), in messages of 1 to 16 tokens: what the stream sends, and then what a plain
    token after them completes, is decoding them all at once."""
    codec = TextCodec(str(tiny_model))
    assert isinstance(codec.detokenizer(), ByteDetokenizer)  # (ByteLevel: the table decodes as the tokenizer)
    bang = codec.encode("!", add_special_tokens=False)
    rng = random.Random(7)
    split_chars = 0
    for _ in range(400):
        ids = [rng.randrange(codec.vocab_size) for _ in range(rng.randrange(1, 60))]
        step = rng.choice([1, 2, 3, 16])
        d = codec.detokenizer() if kind == "bytes" else Detokenizer(codec.tok)
        sent = "".join(d.add(ids[i:i + step]) for i in range(0, len(ids), step))
        split_chars += sent != codec.tok.decode(ids)  # (something held back at the end)
        assert sent + d.add(bang) == codec.tok.decode(ids + bang)
        # Or the output ends there: what is held comes out at the finish, less an unfinished last
        # character (the whole decode's trailing replacement characters), never a whole message's text.
        d = codec.detokenizer() if kind == "bytes" else Detokenizer(codec.tok)
        ended = "".join(d.add(ids[i:i + step]) for i in range(0, len(ids), step)) + d.flush()
        whole = codec.tok.decode(ids)
        assert whole.startswith(ended) and ended.rstrip("\ufffd") == whole.rstrip("\ufffd")
    assert split_chars > 0  # (the case that matters came up)


def test_only_a_tokenizer_that_decodes_by_joining_bytes_gets_the_byte_table(tiny_model: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, tmp_path / name)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    codec = TextCodec(str(tmp_path))
    assert codec.tok.byte_table() is None and isinstance(codec.detokenizer(), Detokenizer)
    ids = codec.encode("the prefill node sends the cache", add_special_tokens=False)
    d = codec.detokenizer()
    assert "".join(d.add([t]) for t in ids) == codec.tok.decode(ids)
    # The cleanup of spaces is the decoder's too; so a table that decodes otherwise than the tokenizer.
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, spaces / name)
    config = json.loads((spaces / "tokenizer_config.json").read_text())
    (spaces / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    assert TextCodec(str(spaces)).tok.byte_table() is None
    real = textcodec._byte_chars
    monkeypatch.setattr(textcodec, "_byte_chars", lambda: {**real(), "a": ord("b"), "b": ord("a")})
    assert TextCodec(str(tiny_model)).tok.byte_table() is None


def test_chat_and_id_checks(tiny_model: Path) -> None:
    codec = TextCodec(str(tiny_model))
    ids = codec.encode_chat([{"role": "user", "content": "hello"}])
    assert codec.tok.decode(ids[-1:], skip_special_tokens=False) == "<|assistant|>"
    with pytest.raises(InvalidRequest, match="messages\\[0\\]"):
        codec.encode_chat([{"role": "user"}])
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        codec.check_ids([1, codec.vocab_size])


def test_the_coordinator_tokenizes_like_transformers_without_importing_it(tiny_model: Path) -> None:
    import asyncio
    import subprocess
    import sys

    from transformers import AutoTokenizer

    codec = TextCodec(str(tiny_model))
    assert codec.backend == "tokenizers"
    ref = AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    texts = ["hello", "the prefill node sends the key value cache to the decode node, fast!", " leading space",
             "ünïcödé ✓ and a tab\there", "x" * 5000]
    for t in texts:
        assert codec.encode(t) == list(ref.encode(t, add_special_tokens=True))
        assert asyncio.run(codec.encode_async(t)) == codec.encode(t)  # the long one on a worker thread
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert codec.encode_chat(msgs) == list(want)
    ids = codec.encode(texts[1])
    assert codec.tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert codec.eos_token_id == ref.eos_token_id and codec.vocab_size == len(ref)
    # the coordinator's process: neither transformers nor torch
    code = (f"import sys; from tandem.coordinator.textcodec import TextCodec; TextCodec({str(tiny_model)!r}); "
            "import tandem.coordinator.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_a_chat_template_that_raises_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}")
    codec = TextCodec(str(model))
    assert codec.tok.decode(codec.encode_chat([{"role": "user", "content": "hi"}])) == "hi"
    with pytest.raises(InvalidRequest, match="no tools here"):
        codec.encode_chat([{"role": "tool", "content": "x"}])


def test_a_long_prompt_is_tokenized_without_holding_the_event_loop(tiny_model: Path) -> None:
    import asyncio
    import time

    codec = TextCodec(str(tiny_model))
    text = "the prefill node sends the key value cache to the decode node " * 4000  # 252K characters
    t0 = time.perf_counter()
    want = codec.encode(text)
    inline_s = time.perf_counter() - t0

    async def main() -> tuple[list[int], float]:
        gaps, last = [], time.perf_counter()

        async def tick() -> None:
            nonlocal last
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        ids = await codec.encode_async(text)
        ticker.cancel()
        return ids, max(gaps, default=0.0)

    ids, worst_gap = asyncio.run(main())
    assert ids == want
    # the loop kept ticking while the worker thread tokenized (inline it would stop for all of it)
    assert worst_gap < inline_s / 3, (worst_gap, inline_s)
