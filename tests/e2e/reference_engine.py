"""Run prompts through one plain vLLM engine (no KV connector); print the token ids as JSON.

Usage: python reference_engine.py MODEL MAX_MODEL_LEN < cases.json
cases: [{"prompt_token_ids": [...], "max_tokens": N, "temperature": 0, "seed": null}, ...]
A case may say "extend_with": [i, j, ...]: the outputs of those earlier cases are appended to
its prompt first (a chain of legs, as a migrated request runs them).
"""

import asyncio
import json
import os
import sys


async def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    model, max_len = sys.argv[1], int(sys.argv[2])
    cases = json.load(sys.stdin)
    eng = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, dtype="float32", enforce_eager=True,
                                                    max_model_len=max_len, block_size=32))
    results = []
    try:
        for i, c in enumerate(cases):
            sp = SamplingParams(max_tokens=c["max_tokens"], temperature=c.get("temperature", 0.0),
                                seed=c.get("seed"), ignore_eos=c.get("ignore_eos", False), detokenize=False)
            final = None
            prompt = list(c["prompt_token_ids"])
            for j in c.get("extend_with", []):
                prompt += results[j]
            async for out in eng.generate({"prompt_token_ids": prompt}, sp, request_id=f"ref-{i}"):
                final = out
            results.append(list(final.outputs[0].token_ids))
    finally:
        eng.shutdown()
    print("REF " + json.dumps(results), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
