"""Run prompts through one vLLM engine with TandemConnector and the node's KV store on, in rounds;
the engine's own prefix cache is emptied before each round, so a round's cached tokens came from
the store. Prints, per round, every case's token ids and cached prompt tokens as JSON.

Usage: python store_engine.py MODEL MAX_MODEL_LEN STORE_DIR ROUNDS CHUNK_TOKENS < cases.json
(cases as reference_engine.py takes them; STORE_DIR '-' for a RAM tier alone)
"""

import asyncio
import json
import os
import socket
import sys


async def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

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
    eng = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model, dtype="float32", enforce_eager=True, max_model_len=max_len, block_size=32,
        kv_transfer_config={"kv_connector": "TandemConnector",
                            "kv_connector_module_path": "tandem.kvtransfer.connector",
                            "kv_role": "kv_both", "kv_connector_extra_config": extra}))
    try:
        assert not os.path.exists(arena), "the engine core drops the arena's name once it has it mapped"
        for r in range(rounds):
            await eng.reset_prefix_cache()
            outs, cached = [], []
            for i, c in enumerate(cases):
                sp = SamplingParams(max_tokens=c["max_tokens"], temperature=0.0, detokenize=False)
                final = None
                async for out in eng.generate({"prompt_token_ids": c["prompt_token_ids"]}, sp,
                                              request_id=f"r{r}-{i}"):
                    final = out
                outs.append(list(final.outputs[0].token_ids))
                cached.append(final.num_cached_tokens or 0)
            print("ROUND " + json.dumps({"outputs": outs, "cached": cached}), flush=True)
            await asyncio.sleep(0.5)  # the last saves reach the store before the next round looks
    finally:
        eng.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
