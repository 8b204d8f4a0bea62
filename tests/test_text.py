from pathlib import Path

import pytest

from tandem.coordinator.textcodec import StopMatcher
from tandem.coordinator.textcodec import TextCodec
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


def test_chat_and_id_checks(tiny_model: Path) -> None:
    codec = TextCodec(str(tiny_model))
    ids = codec.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[-1] == codec.tok.convert_tokens_to_ids("<|assistant|>")
    with pytest.raises(InvalidRequest, match="messages\\[0\\]"):
        codec.encode_chat([{"role": "user"}])
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        codec.check_ids([1, codec.vocab_size])
