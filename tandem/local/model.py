"""The seeded tiny model: a random-weight Llama with a locally trained BPE tokenizer.

No model hub is reachable from where Tandem is built and tested, so the project
makes its own model in Hugging Face format. The same seed gives the same bytes.
Logits are made deliberately peaked (large embedding scale) so that greedy
decoding has clear winners and equality tests are not at the mercy of float
round-off between differently batched kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

GENERATOR = "tandem.local.model.make_tiny_model"  # what a seeded model's tandem_model.json names

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a prefill decode token cache block node cluster request stream model layer "
    "attention head key value transfer memory bandwidth compute latency queue batch "
    "schedule route admit reject lease etcd coordinator client server engine vector "
    "tensor kernel shared prefix chat summarize code write read send receive first "
    "last time second rate goodput service level objective fast slow small large one "
    "two three four five six seven eight nine ten hello world tandem serve complete"
).split()


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the generated model; defaults keep CPU engines quick to start."""

    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    embedding_std: float = 1.0


# Big enough that prefill is compute-bound on a CPU core (about 25 M parameters).
BENCH_SPEC = TinyModelSpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
PRESETS = {"tiny": TinyModelSpec(), "bench": BENCH_SPEC}


def param_count(path: str | os.PathLike[str]) -> int:
    """Parameters in a safetensors model directory (read from the headers only)."""
    import struct

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for d in meta["shape"]:
                    count *= d
                total += count
    return total


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        n = rng.randint(4, 24)
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)))
    # Digits and punctuation so arbitrary text tokenizes without byte soup.
    lines.append("0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' \" ( ) [ ] { } - + = / * # @")
    return lines


def _train_tokenizer(seed: int, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return tok


def make_tiny_model(path: str | os.PathLike[str], seed: int = 0,
                    spec: TinyModelSpec | None = None) -> Path:
    """Write a seeded random Llama model plus tokenizer to ``path``; return it."""
    # The BPE trainer counts words on several threads; one thread keeps the
    # merge order, and so the bytes, identical run to run.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = spec or TinyModelSpec()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(seed, spec.vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    config = LlamaConfig(
        # The model's vocabulary is exactly the tokenizer's, so every id it can
        # produce decodes to text (the trainer may stop short of spec.vocab_size).
        vocab_size=len(fast),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, spec.embedding_std)
        model.lm_head.weight.normal_(0.0, spec.embedding_std)
    model.to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    (out / "tandem_model.json").write_text(
        json.dumps({"generator": GENERATOR, "seed": seed,
                    "spec": spec.__dict__}, indent=2, sort_keys=True) + "\n")
    return out


def tree_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 over every file's name and bytes under ``path`` (sorted)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def default_model_dir() -> Path:
    """Where `tandem up` and the tests keep the default seeded model."""
    base = os.environ.get("TANDEM_HOME") or Path.home() / ".cache" / "tandem"
    return Path(base) / "models" / "tiny-llama-seed0"


def ensure_default_model() -> Path:
    """Make the default model once; later calls reuse it."""
    path = default_model_dir()
    if not (path / "tandem_model.json").exists():
        make_tiny_model(path, seed=0)
    return path
