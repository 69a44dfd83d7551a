"""One WMSS-DPO step (WD-JT + entropy-gap pair weights) on a fixed global batch; single-process or 2 processes.

    python tests/dist/dpo_run.py STRONG WEAK OUT

Prints ``RESULT {json}`` on the main process: world size, distributed type, ZeRO stage, whether policy and weak
model are ZeRO-3 shards (and their local/full sizes), and the metrics logged at step 1. Saves the strong model to OUT.
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from wmss_trl import WMSSDPOConfig, WMSSDPOTrainer  # noqa: E402
from wmss_trl.toy import load_tokenizer  # noqa: E402
from wmss_trl.weak import is_zero3_partitioned  # noqa: E402
from wmss_trl.recipes.common import exit_worker, teardown  # noqa: E402


def preference_pairs(n: int = 4) -> Dataset:
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}="}],
                     "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": str(a + b + 1) + "?" * (i % 3)}]})
    return Dataset.from_list(rows)


def make_sharp(strong: str, weak: str, root: str) -> dict:
    """Copies of the tiny models with scaled-up LM heads (x12 strong, x4 weak): far from uniform, so the weak/strong
    entropies differ by O(1) nats. With the random init they differ by ~1e-4 nats, and fp32 rounding alone would move
    the entropy-gap weights by ~1e-3."""
    from transformers import AutoModelForCausalLM

    from wmss_trl.toy import save_model_and_tokenizer

    tok = load_tokenizer(strong)
    paths = {}
    for name, path, scale in (("strong", strong, 12.0), ("weak", weak, 4.0)):
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        paths[name] = save_model_and_tokenizer(model, tok, os.path.join(root, name))
    return paths


def sizes(model):
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return local, full


def main():
    strong, weak, out = sys.argv[1:4]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = 4
    args = WMSSDPOConfig(
        output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no", activation_checkpointing=False,
        logging_steps=1, per_device_train_batch_size=global_batch // world, max_steps=1, learning_rate=1e-2, seed=0,
        disable_tqdm=True, weak_model_name_or_path=weak, mixing_lambda=0.5, entropy_pair_weights=True, beta=0.5,
    )
    trainer = WMSSDPOTrainer(strong, args=args, train_dataset=preference_pairs(global_batch), processing_class=load_tokenizer(strong))
    weak_local, weak_full = sizes(trainer.weak_model)
    trainer.train()
    policy_local, policy_full = sizes(trainer.model_wrapped)
    trainer.save_model(out)
    step1 = next(h for h in trainer.state.log_history if "loss" in h)
    state = trainer.accelerator.state
    if trainer.accelerator.is_main_process:
        print("RESULT " + json.dumps({
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(state.distributed_type),
            "zero_stage": state.deepspeed_plugin.zero_stage if state.deepspeed_plugin else None,
            "weak_partitioned": is_zero3_partitioned(trainer.weak_model),
            "policy_partitioned": is_zero3_partitioned(trainer.model_wrapped),
            "weak_local_numel": weak_local, "weak_full_numel": weak_full,
            "policy_local_numel": policy_local, "policy_full_numel": policy_full,
            **{k: v for k, v in step1.items() if k == "loss" or k.startswith(("wmss/", "rewards/", "logps/"))},
        }), flush=True)
    teardown()


if __name__ == "__main__":
    main()
    exit_worker(0)
