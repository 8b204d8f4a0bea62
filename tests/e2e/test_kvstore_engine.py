"""The node's KV store inside a real vLLM engine (TandemConnector): prompts loaded from the RAM tier,
from the disk tier after a restart, and past corrupt files, always with the plain engine's tokens."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

MAX_MODEL_LEN = 1024
CHUNK = 64  # two blocks of 32: short prompts span several chunks
SCRIPT = Path(__file__).with_name("store_engine.py")


def run_engine(model: Path, store_dir: str, rounds: int, cases: list[dict], load: str = "async") -> list[dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(model), str(MAX_MODEL_LEN), store_dir, str(rounds),
                           str(CHUNK), load], input=json.dumps(cases), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(ln[6:]) for ln in proc.stdout.splitlines() if ln.startswith("ROUND ")]


def _prompts() -> list[list[int]]:
    rng = random.Random(9)
    # mid-block, a block multiple that is not a chunk multiple, a chunk multiple (all of it stored),
    # shorter than a chunk (nothing to store), and two sharing their first 128 tokens
    prompts = [[rng.randrange(1, 500) for _ in range(n)] for n in (300, 224, 256, 40)]
    shared = [rng.randrange(1, 500) for _ in range(128)]
    return prompts + [shared + [rng.randrange(1, 500) for _ in range(n)] for n in (50, 70)]


PROMPTS = _prompts()
# A plain engine's outputs for these, computed once a session with the other modules' (conftest.py).
REFERENCE_CASES = [{"prompt_token_ids": p, "max_tokens": 8} for p in PROMPTS]


def test_greedy_output_is_the_plain_engines_with_hits_from_ram_from_disk_and_past_corrupt_chunks(
        tiny_model: Path, tmp_path: Path, references) -> None:
    prompts, cases, ref = PROMPTS, REFERENCE_CASES, references
    whole = [len(p) // CHUNK * CHUNK for p in prompts]
    disk = tmp_path / "kvstore"

    cold, warm = run_engine(tiny_model, str(disk), 2, cases)
    assert cold["outputs"] == ref and warm["outputs"] == ref
    # Round one: nothing stored yet, except what the first of the two sharing prompts left for the second.
    assert cold["cached"] == [0, 0, 0, 0, 0, 128]
    # Round two, the engine's own cache emptied: every whole chunk came from the RAM tier (a prompt
    # stored whole recomputes its last token, as vLLM does).
    assert warm["cached"] == [w - (w == len(p)) for w, p in zip(whole, prompts)] or warm["cached"] == whole, warm
    files = sorted(p for p in disk.glob("*/*") if not p.name.startswith("."))
    assert len(files) == len({k for k in (tuple(p[:i + CHUNK]) for p in prompts for i in range(0, len(p) - CHUNK + 1, CHUNK))})

    # A new engine: its RAM tier is empty, the disk tier is what the last one left.
    (restarted,) = run_engine(tiny_model, str(disk), 1, cases)
    assert restarted["outputs"] == ref and restarted["cached"] == warm["cached"]

    # Damage: a flipped byte, a truncated file, a torn write left behind. Each is a miss (removed),
    # never wrong tokens.
    first_chunk = {f.name for f in files}
    flipped, truncated = files[0], files[1]
    raw = bytearray(flipped.read_bytes())
    raw[-1] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    torn = files[2].parent / f".tmp-{files[2].name}.x"
    torn.write_bytes(b"half a chunk")
    os.utime(torn, (0, 0))  # old: a crash's, not a writer's at work
    (damaged,) = run_engine(tiny_model, str(disk), 1, cases)
    assert damaged["outputs"] == ref
    assert sum(damaged["cached"]) < sum(warm["cached"])
    assert not flipped.exists() or flipped.read_bytes() != bytes(raw)  # removed (or written again, whole)
    assert not torn.exists() and first_chunk


def test_sync_loads_from_ram_give_the_plain_engines_tokens(tiny_model: Path, tmp_path: Path, references) -> None:
    # --kvstore-load sync: the RAM tier's hits copied in before the step that computes the rest; a
    # prompt stored whole computes its last token only.
    whole = [len(p) // CHUNK * CHUNK for p in PROMPTS]
    cold, warm = run_engine(tiny_model, "-", 2, REFERENCE_CASES, load="sync")
    assert cold["outputs"] == references and warm["outputs"] == references
    assert warm["cached"] == [w - (w == len(p)) for w, p in zip(whole, PROMPTS)], warm
