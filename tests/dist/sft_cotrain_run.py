"""A WD-JT run with a co-trained weak model (train_weak_model=True); single-process or under ``accelerate launch``.

    python tests/dist/sft_cotrain_run.py STRONG WEAK OUT [--steps N] [--save_steps K] [--kill_at S] [--resume]

``--kill_at S``: the process SIGKILLs itself when step S begins (after the checkpoints before it), a real kill
mid-run. ``--resume``: resume from the last complete checkpoint of OUT. At the end: the strong model saved to
OUT/final (``save_model``), the weak model's weights to OUT/weak_final.safetensors, and on the main process
``RESULT {json}`` with the world size, the distributed type, the ZeRO stage, the logged losses per step and the
learning rates of the optimizer's parameter groups.
"""

import json
import os
import signal
import sys


os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import arithmetic_prompt_completion, cpu_args  # noqa: E402
from safetensors.torch import save_model  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer  # noqa: E402
from wmss_trl.recipes.common import exit_worker, teardown  # noqa: E402
from wmss_trl.toy import load_tokenizer  # noqa: E402


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def option(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def main():
    strong, weak, out = sys.argv[1:4]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = 4
    steps, save_steps, kill_at = option("--steps", 1), option("--save_steps", 0), option("--kill_at", 0)
    args = cpu_args(
        WMSSSFTConfig,
        out,
        per_device_train_batch_size=global_batch // world,
        max_steps=steps,
        learning_rate=1e-2,
        weak_model_name_or_path=weak,
        mixing_lambda=0.4,
        train_weak_model=True,
        weak_learning_rate=3e-2,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
    )
    dataset = arithmetic_prompt_completion(global_batch * steps)
    trainer = WMSSSFTTrainer(strong, args=args, train_dataset=dataset, processing_class=load_tokenizer(strong))
    if kill_at:
        trainer.add_callback(KillAt(kill_at))
    trainer.train(resume_from_checkpoint=True if "--resume" in sys.argv else None)
    trainer.save_model(os.path.join(out, "final"))
    state = trainer.accelerator.state
    if trainer.accelerator.is_main_process:
        save_model(trainer.weak_model, os.path.join(out, "weak_final.safetensors"))
        result = {
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(state.distributed_type),
            "zero_stage": state.deepspeed_plugin.zero_stage if state.deepspeed_plugin else None,
            "losses": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
            "weak_nll": {h["step"]: h["wmss/weak_nll"] for h in trainer.state.log_history if "loss" in h},
            "initial_lrs": [g["initial_lr"] for g in trainer.optimizer.param_groups],
        }
        print("RESULT " + json.dumps(result), flush=True)
    teardown()


if __name__ == "__main__":
    main()
    exit_worker(0)
