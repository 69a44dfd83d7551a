"""A few WMSS-GRPO steps with a separate weak model (or the LoRA base); run under ``accelerate launch`` (2 processes).

    python tests/dist/grpo_run.py STRONG WEAK OUT [--peft] [--steps 3] [--ga 1] [--iterations 1] [--no_gather]

Reward: the fraction of digits (continuous; below 0.5 is wrong, so the weak model yields negatives). Options on: weak model as KL reference (beta > 0), weak negatives (K = 2 of G = 4, groups spanning both processes),
entropy-weighted advantages and WD-JT mixing in the loss. Prints ``RESULT {json}`` on the main process: world size,
distributed type, ZeRO stage, whether the weak model (and the policy) are ZeRO-3 partitioned, the logged metrics,
checksums showing the policy trained and the weak model did not.
"""

import json
import math
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

from grpo_common import digit_fraction, grpo_args, prompt_dataset  # noqa: E402

from wmss_trl import WMSSGRPOTrainer  # noqa: E402
from wmss_trl.toy import load_tokenizer  # noqa: E402
from wmss_trl.weak import is_zero3_partitioned  # noqa: E402
from wmss_trl.recipes.common import exit_worker, teardown  # noqa: E402


def checksum(model, zero3):
    params = list(model.parameters())
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return float(sum(p.detach().double().abs().sum() for p in params))
    return float(sum(p.detach().double().abs().sum() for p in params))


def main():
    strong, weak, out = sys.argv[1:4]
    peft = "--peft" in sys.argv
    def flag(name, default):
        return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default

    steps, ga, iterations = flag("--steps", 3), flag("--ga", 1), flag("--iterations", 1)
    args = grpo_args(
        out,
        per_device_train_batch_size=2,  # with ga=1: 2 processes x 2 rows = one group of 4 spread over both processes
        gradient_accumulation_steps=ga,  # > 1: several micro-batches per generation (weights at generation time)
        num_iterations=iterations,  # > 1: TRL's old log-probs, extended to the weak rows
        num_generations=4,
        max_steps=steps,
        beta=0.04,
        num_weak_generations=2,
        entropy_weighted_advantages=True,
        mixing_lambda=0.7,
        weak_model_name_or_path=None if peft else weak,
        peft_base_as_weak=peft,  # --peft: the adapter-disabled base is the weak model
        ds3_gather_for_generation="--no_gather" not in sys.argv,  # False: ZeRO-3 generation gathers layer by layer
    )
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = WMSSGRPOTrainer(strong, digit_fraction, args=args, train_dataset=prompt_dataset(16),
                              processing_class=load_tokenizer(strong), peft_config=peft_config)
    acc = trainer.accelerator
    zero = acc.state.deepspeed_plugin.zero_stage if acc.state.deepspeed_plugin else None
    zero3 = zero == 3
    weak_model = trainer.weak_model
    result = {
        "world_size": acc.num_processes,
        "distributed_type": str(acc.state.distributed_type),
        "zero_stage": zero,
        "weak_source": trainer.weak_source,
        "ref_is_weak": trainer.ref_model is weak_model,
        "policy_partitioned": is_zero3_partitioned(trainer.model),
    }
    if weak_model is not None:
        result["weak_partitioned"] = is_zero3_partitioned(weak_model)
        result["weak_local_numel"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in weak_model.parameters())
        result["weak_full_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in weak_model.parameters())
        weak_before = checksum(weak_model, zero3)
    policy_before = checksum(trainer.model, zero3)
    trainer.train()
    if weak_model is not None:
        result["weak_unchanged"] = checksum(weak_model, zero3) == weak_before
    result["policy_changed"] = checksum(trainer.model, zero3) != policy_before
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    result["steps"] = len(logs)
    result["losses_finite"] = all(math.isfinite(h["loss"]) for h in logs)
    result["metrics"] = {k: [h.get(k) for h in logs] for k in logs[0] if k.startswith("wmss/") or k in ("kl", "reward")}
    result["batch_rows"] = [len(b["prompt_ids"]) for b in trainer._buffered_inputs]
    result["has_old_logps"] = all(b.get("old_per_token_logps") is not None for b in trainer._buffered_inputs)
    if acc.is_main_process:
        print("RESULT " + json.dumps(result), flush=True)
    teardown()


if __name__ == "__main__":
    main()
    exit_worker(0)
