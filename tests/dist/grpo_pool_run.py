"""WMSS-GRPO with its weak negatives read from a weak-rollout pool, 8 steps over 6 prompts (2 epochs); 1 process, or
under ``accelerate launch`` (2 processes) with the same global batch.

    python tests/dist/grpo_pool_run.py STRONG WEAK POOL OUT [--processes_batch 4]

Prints ``RESULT {json}`` on the main process: the world size, whether the weak model was loaded and, per generation
batch, the weak rows of the global batch in order (epoch, prompt id, completion ids), gathered from every process.
"""

import json
import os
import sys


os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

from accelerate.utils import gather_object  # noqa: E402
from grpo_common import grpo_args, has_digit, prompt_dataset  # noqa: E402

from wmss_trl import WMSSGRPOTrainer  # noqa: E402
from wmss_trl.recipes.common import exit_worker, teardown  # noqa: E402
from wmss_trl.rollouts import prompt_id  # noqa: E402
from wmss_trl.toy import load_tokenizer  # noqa: E402


def main():
    strong, weak, pool, out = sys.argv[1:5]
    per_device = int(sys.argv[sys.argv.index("--processes_batch") + 1]) if "--processes_batch" in sys.argv else 4
    args = grpo_args(
        out,
        per_device_train_batch_size=per_device,
        num_generations=4,
        max_steps=8,
        num_weak_generations=2,
        weak_model_name_or_path=weak,
        weak_rollouts_path=pool,
    )
    trainer = WMSSGRPOTrainer(
        strong, has_digit, args=args, train_dataset=prompt_dataset(6), processing_class=load_tokenizer(strong)
    )
    batches, rollouts = [], trainer.weak_sampler.rollouts

    def recording(inputs):
        result = rollouts(inputs)
        epoch = trainer.generation_clock.epoch
        local = [(epoch, prompt_id(p), ids) for p, ids in zip(result["prompts"], result["completion_ids"])]
        batches.append([row for rows in gather_object([local]) for row in rows])
        return result

    trainer.weak_sampler.rollouts = recording
    trainer.train()
    if trainer.accelerator.is_main_process:
        result = {"world_size": trainer.accelerator.num_processes, "weak_loaded": trainer.weak_model is not None}
        print("RESULT " + json.dumps({**result, "batches": batches}), flush=True)
    teardown()


if __name__ == "__main__":
    main()
    exit_worker(0)
