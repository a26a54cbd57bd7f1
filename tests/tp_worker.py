"""One rank of the transformers tensor-parallel test (tests/test_tp.py): run as a script, 2 processes, gloo.

    python tests/tp_worker.py MODEL_DIR PLAN_JSON CROSS_PLAN_JSON OUT_PT STEPS

with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK set. Loads the model with transformers' TP plan,
enables Kascade with PLAN_JSON (prefill + STEPS greedy decode steps; logits saved to OUT_PT), then with
CROSS_PLAN_JSON (whose head map crosses the shards) and records the error it raises.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(model_dir: str, plan_path: str, cross_path: str, out_path: str, steps: int) -> None:
    import transformers

    import kascade
    from kascade import PlanError
    from kascade.integrations import hf

    dist.init_process_group("gloo")
    result: dict = {"rank": dist.get_rank()}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, distributed_config=transformers.DistributedConfig(tp_plan="auto"),
        ).eval()
        attn = hf._attention_modules(model)[0]
        result["q_proj_weight"] = type(attn.q_proj.weight).__name__
        kascade.enable(model, plan_path)
        from tp_common import greedy_logits  # noqa: E402  (tests/ on sys.path)

        result["logits"] = greedy_logits(model, steps)
        state = attn._kascade_state
        result["shards"] = {f"{r},{t}": [list(row) for row in e.plan.head_map] for (r, t), e in state.shards.items()}
        kascade.enable(model, cross_path)
        try:
            greedy_logits(model, 1)
            result["cross_error"] = None
        except PlanError as exc:
            result["cross_error"] = str(exc)
    except Exception as exc:  # reported by the parent test with the traceback
        import traceback

        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        torch.save(result, out_path)
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
