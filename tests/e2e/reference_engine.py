"""Run prompts through one plain vLLM engine (no KV connector); print the token ids as JSON.

Usage: python reference_engine.py MODEL MAX_MODEL_LEN < cases.json
cases: [{"prompt_token_ids": [...], "max_tokens": N, "temperature": 0, "seed": null}, ...]
A case may say "extend_with": [i, j, ...]: the outputs of those earlier cases are appended to
its prompt first (a chain of legs, as a migrated request runs them).

The engine runs in this one process (vLLM's in-process engine core, no worker process): the same
model code and tokens as the nodes' engines, without two more imports of vLLM, which cost ~40 s a
start on two busy cores.
"""

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    model, max_len = sys.argv[1], int(sys.argv[2])
    cases = json.load(sys.stdin)
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=max_len, block_size=32)
    results: list[list[int]] = []
    for c in cases:
        sp = SamplingParams(max_tokens=c["max_tokens"], temperature=c.get("temperature", 0.0),
                            seed=c.get("seed"), ignore_eos=c.get("ignore_eos", False), detokenize=False)
        prompt = list(c["prompt_token_ids"])
        for j in c.get("extend_with", []):
            prompt += results[j]
        (out,) = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
        results.append(list(out.outputs[0].token_ids))
    print("REF " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
