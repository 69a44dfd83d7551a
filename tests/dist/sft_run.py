"""One WD-JT step on a fixed global batch; run single-process or under ``accelerate launch`` (2 processes).

    python tests/dist/sft_run.py STRONG WEAK OUT [--global_batch 4]

Prints ``RESULT {json}`` on the main process with the world size, the distributed type, the logged WMSS and TRL
metrics of step 1, and whether the weak model is ZeRO-3 partitioned; saves the trained strong model to OUT.
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import arithmetic_prompt_completion, cpu_args  # noqa: E402

from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer  # noqa: E402
from wmss_trl.toy import load_tokenizer  # noqa: E402
from wmss_trl.weak import is_zero3_partitioned  # noqa: E402
from wmss_trl.recipes.common import exit_worker, teardown  # noqa: E402


TRL_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")  # SFTTrainer's, kept under WD-JT


def main():
    strong, weak, out = sys.argv[1:4]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = 4
    args = cpu_args(
        WMSSSFTConfig, out, per_device_train_batch_size=global_batch // world, max_steps=1, learning_rate=1e-2,
        weak_model_name_or_path=weak, mixing_lambda=0.4,
    )
    dataset = arithmetic_prompt_completion(global_batch)  # one step covers the whole dataset on any world size
    trainer = WMSSSFTTrainer(strong, args=args, train_dataset=dataset, processing_class=load_tokenizer(strong))
    weak_local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in trainer.weak_model.parameters())
    weak_full = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.weak_model.parameters())
    trainer.train()
    trainer.save_model(out)
    step1 = next(h for h in trainer.state.log_history if "wmss/mixed_loss" in h)
    state = trainer.accelerator.state
    if trainer.accelerator.is_main_process:
        result = {
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(state.distributed_type),
            "zero_stage": state.deepspeed_plugin.zero_stage if state.deepspeed_plugin else None,
            "weak_partitioned": is_zero3_partitioned(trainer.weak_model),
            "weak_local_numel": weak_local,
            "weak_full_numel": weak_full,
            **{k: v for k, v in step1.items() if k.startswith("wmss/") or k in TRL_METRICS},
        }
        print("RESULT " + json.dumps(result), flush=True)
    teardown()


if __name__ == "__main__":
    main()
    exit_worker(0)
