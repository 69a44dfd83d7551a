"""WMSS-GRPO with weak negatives and the weak reference, 8 steps over 6 prompts (2 epochs), a checkpoint every 3; for
the kill/resume tests.

    python tests/dist/grpo_resume_run.py STRONG WEAK OUT [--resume CHECKPOINT] [--hold_after K] [--ga 1]
                                         [--spg GA] [--processes_batch 4] [--max_steps 8] [--save_steps 3]
                                         [--prefetch 0]

``--spg``: TRL's ``steps_per_generation`` (default: ``--ga``); the weak model samples a generation batch's weak rows
in one call. ``--prefetch P``: ``weak_rollout_prefetch`` (default 0: one weak call per generation batch).
``--hold_after K``: after checkpoint-K is written and step K + 1 has trained, write ``OUT/holding`` and wait (the
test SIGKILLs the process there). ``--resume``: resume from that checkpoint. At the end the policy is saved to
``OUT/final`` and ``RESULT {json}`` is printed (main process): the per-step losses, rewards and weak-negative
metrics of ``trainer_state`` (the log history, loaded from the checkpoint for the steps before a resume), per
generation batch and global weak row the completion sampled for it and its behaviour log-probs (``weak``,
``weak_logps``: ``"epoch/batch/row" -> list``), and the rows of each weak sampling call of this process (``calls``).
Runs under ``accelerate launch`` too (``--processes_batch``: the per-device batch; the global batch is the same).
"""

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

from grpo_common import grpo_args, has_digit, prompt_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from wmss_trl import WMSSGRPOTrainer  # noqa: E402
from wmss_trl.recipes.common import exit_worker, teardown  # noqa: E402
from wmss_trl.toy import load_tokenizer  # noqa: E402


class HoldAfter(TrainerCallback):
    """Block at the start of step ``k + 2``: checkpoint-k exists, step k + 1 trained and was not saved."""

    def __init__(self, k: int, marker: str):
        self.k, self.marker = k, marker

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.k + 1:
            open(self.marker, "w").close()
            while True:
                time.sleep(1)


def main():
    strong, weak, out = sys.argv[1:4]

    def flag(name, default, cast=int):
        return cast(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default

    per_device, ga = flag("--processes_batch", 4), flag("--ga", 1)
    args = grpo_args(
        out,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga,
        steps_per_generation=flag("--spg", ga),
        weak_rollout_prefetch=flag("--prefetch", 0),
        num_generations=4,
        max_steps=flag("--max_steps", 8),
        save_strategy="steps",
        save_steps=flag("--save_steps", 3),
        beta=0.04,
        num_weak_generations=2,
        seed=7,
    )
    trainer = WMSSGRPOTrainer(strong, has_digit, args=args, train_dataset=prompt_dataset(6),
                              processing_class=load_tokenizer(strong), weak_model=weak)
    hold = flag("--hold_after", None)
    if hold is not None:
        trainer.add_callback(HoldAfter(hold, os.path.join(out, "holding")))
    weak_rows, weak_logps, calls = {}, {}, []
    generate = trainer.weak_sampler.generate

    def recording(prompt_ids_list, row_keys):  # what the weak model sampled for each (batch, global row)
        calls.append(len(prompt_ids_list))
        ids, logps = generate(prompt_ids_list, row_keys)
        for (_, epoch, batch, row), completion, lp in zip(row_keys, ids, logps, strict=True):
            weak_rows[f"{epoch}/{batch}/{row}"], weak_logps[f"{epoch}/{batch}/{row}"] = completion, lp
        return ids, logps

    trainer.weak_sampler.generate = recording
    trainer.train(resume_from_checkpoint=flag("--resume", None, str))
    trainer.save_model(os.path.join(out, "final"))
    from accelerate.utils import gather_object

    gathered, gathered_logps = gather_object([weak_rows]), gather_object([weak_logps])
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    if trainer.accelerator.is_main_process:
        weak_all = {k: v for part in gathered for k, v in part.items()}
        result = {
            "world_size": trainer.accelerator.num_processes,
            "steps": [h["step"] for h in logs],
            "loss": [h["loss"] for h in logs],
            # None at a step that generated nothing (steps_per_generation > gradient_accumulation_steps)
            "reward": [h.get("reward") for h in logs],
            "weak_negatives": [h.get("wmss/weak_negatives_per_group") for h in logs],
            "weak": weak_all,
            "weak_logps": {k: v for part in gathered_logps for k, v in part.items()},
            "calls": calls,
        }
        print("RESULT " + json.dumps(result), flush=True)
    teardown()


if __name__ == "__main__":
    main()
    exit_worker(0)
