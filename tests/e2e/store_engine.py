"""Run prompts through one vLLM engine with TandemConnector and the node's KV store on, in rounds;
the engine's own prefix cache is emptied before each round, so a round's cached tokens came from
the store. Prints, per round, every case's token ids and cached prompt tokens as JSON.

Usage: python store_engine.py MODEL MAX_MODEL_LEN STORE_DIR ROUNDS CHUNK_TOKENS [LOAD] < cases.json
(cases as reference_engine.py takes them; STORE_DIR '-' for a RAM tier alone)

The engine runs in this one process (vLLM's in-process engine core): the connector's scheduler and
worker sides share it, where a node's engine has them in two processes. test_serving_ucx.py covers
that, with the store's RAM and disk tiers, its prefill node loading sync and its decode node async.
vLLM says its CPU backend does not support this single-process mode (OpenMP is left unset). It
computes the same tokens here: the clusters' tests hold the nodes' tokens to reference_engine.py's,
which runs the same way.
"""

import json
import os
import socket
import sys
import time


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from tandem.kvstore.keys import model_identity

    model, max_len, store_dir, rounds, chunk = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
        int(sys.argv[5])
    load = sys.argv[6] if len(sys.argv) > 6 else "async"
    cases = json.load(sys.stdin)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    arena = f"/dev/shm/tandem-kv-test-{os.getpid()}"
    extra = {"engine_id": f"store-test-{os.getpid()}", "address": f"127.0.0.1:{port}", "transport": "tcp",
             "kvstore_ram_bytes": 64 << 20, "kvstore_arena": arena,
             "kvstore_dir": "" if store_dir == "-" else store_dir, "kvstore_disk_bytes": 1 << 30,
             "kvstore_chunk_blocks": chunk // 32, "kvstore_model_id": model_identity(model),
             "kvstore_load": load}
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=max_len, block_size=32,
              kv_transfer_config={"kv_connector": "TandemConnector",
                                  "kv_connector_module_path": "tandem.kvtransfer.connector",
                                  "kv_role": "kv_both", "kv_connector_extra_config": extra})
    assert not os.path.exists(arena), "the engine drops the arena's name once it has it mapped"

    def settle() -> None:
        """Step until the engine holds no block: a round's saves hold theirs until a step sees them
        done. Then its cache is empty (the store's RAM tier keeps what was saved)."""
        deadline = time.monotonic() + 60
        while not llm.reset_prefix_cache():
            assert time.monotonic() < deadline, "the engine still holds blocks a minute after the round"
            llm.llm_engine.step()
            time.sleep(0.02)

    try:
        for _ in range(rounds):
            settle()
            outs, cached = [], []
            for c in cases:
                sp = SamplingParams(max_tokens=c["max_tokens"], temperature=0.0, detokenize=False)
                (final,) = llm.generate([{"prompt_token_ids": c["prompt_token_ids"]}], sp, use_tqdm=False)
                outs.append(list(final.outputs[0].token_ids))
                cached.append(final.num_cached_tokens or 0)
            print("ROUND " + json.dumps({"outputs": outs, "cached": cached}), flush=True)
        settle()  # the last round's saves are in the store ...
    finally:
        llm.llm_engine.engine_core.shutdown()  # ... and the connector's shutdown writes what is queued for the disk


if __name__ == "__main__":
    main()
