import json
from pathlib import Path

from tandem.local.model import TinyModelSpec, make_tiny_model, tree_digest


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path, tiny_model: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    assert tree_digest(again) == tree_digest(tiny_model)
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert tree_digest(other) != tree_digest(tiny_model)


def test_model_is_a_llama_whose_vocabulary_is_the_tokenizers(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    cfg = json.loads((tiny_model / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == len(tok)
    assert cfg["hidden_size"] == TinyModelSpec().hidden_size
    assert tok.chat_template and tok.eos_token == "</s>"
    ids = tok.encode("the prefill node sends blocks")
    assert tok.decode(ids) == "the prefill node sends blocks"
