"""The co-trained weak model of WD-JT (``train_weak_model=True``).

While the trainer trains, the weak model is the submodule `WEAK_MODULE` of the policy, so that the Trainer's one model
holds both: one optimizer (the weak parameters in groups of their own, learning rate ``weak_learning_rate``), one
gradient clipping, one DDP wrapper and one DeepSpeed engine (ZeRO shards the weak model like the policy). The mixed
loss gives its logits the gradient (1 - lam) * (p_mix - onehot(y)). Only the strong model is saved (`save_model`, a
checkpoint's model weights); a checkpoint keeps the weak model's weights in `WEAK_CHECKPOINT_FOLDER` (or DeepSpeed's
own states) for resuming. When ``train()`` returns the weak model is detached again, so the model object the user
holds is the strong model alone (its ``save_pretrained`` saves only it).
"""

from __future__ import annotations

import contextlib
import os

from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from transformers.utils import SAFE_WEIGHTS_NAME


# the co-trained weak model: its name as a submodule of the policy, and its folder in a checkpoint
WEAK_MODULE = "wmss_weak_model"
WEAK_CHECKPOINT_FOLDER = "weak_model"


def weak_checkpoint_file(checkpoint: str) -> str:
    return os.path.join(checkpoint, WEAK_CHECKPOINT_FOLDER, SAFE_WEIGHTS_NAME)


def check_resume_matches(checkpoint: str, train_weak_model: bool) -> None:
    """Refuse a checkpoint written with the other ``train_weak_model`` setting (a co-trained weak model's weights
    would be missing, or silently replaced by the original weak model)."""
    exists = os.path.exists(weak_checkpoint_file(checkpoint))
    if train_weak_model and not exists:
        raise ValueError(
            f"{checkpoint} has no {WEAK_CHECKPOINT_FOLDER}/{SAFE_WEIGHTS_NAME}: it was written by a "
            "run with a frozen weak model (train_weak_model=False), so it holds no co-trained weak model to "
            "resume. Resume it with train_weak_model=False, or start this co-trained run from scratch."
        )
    if not train_weak_model and exists:
        raise ValueError(
            f"{checkpoint} was written by a run that co-trained its weak model (it holds "
            f"{WEAK_CHECKPOINT_FOLDER}/), but this run freezes it: it would continue with the original weak model. "
            "Resume it with train_weak_model=True, or start this run from scratch."
        )


def check_attachable(trainer, weak) -> None:
    """Refuse, once the accelerator exists, what co-training the weak model inside the policy does not handle."""
    args = trainer.args
    engine = " and DeepSpeed engine" if trainer.is_deepspeed_enabled else ""
    what = f"train_weak_model=True puts the weak model in the policy's optimizer{engine}"
    if trainer.is_deepspeed_enabled and args.save_only_model:
        raise ValueError(
            f"{what}, whose checkpoint states are then its only copy, but save_only_model=True skips them. Set "
            "save_only_model=False, or train_weak_model=False."
        )
    ds_config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config if trainer.is_deepspeed_enabled else {}
    if "optimizer" in ds_config and args.weak_learning_rate not in (None, args.learning_rate):
        raise ValueError(
            f"{what}, but the DeepSpeed config builds its own optimizer (its 'optimizer' section), with one "
            f"learning rate for both models, not weak_learning_rate={args.weak_learning_rate}. Drop the "
            "config's optimizer section (the Trainer then builds it), or drop weak_learning_rate."
        )
    strong_dtype, weak_dtype = next(trainer.model.parameters()).dtype, next(weak.parameters()).dtype
    if weak_dtype != strong_dtype:
        raise ValueError(
            f"{what}, so it must have the policy's dtype: the weak model is {weak_dtype}, the policy {strong_dtype}. "
            "Load both in the same dtype (weak_model_init_kwargs / model_init_kwargs `dtype`), or set "
            "train_weak_model=False."
        )


class CoTrainedWeak:
    """The co-trained weak model ``weak`` of the policy ``policy`` (trainable, on the policy's device, in its
    train/eval mode), attached as the policy's submodule `WEAK_MODULE` from construction until ``train()`` returns
    (`attached_while_training`)."""

    def __init__(self, policy, weak, learning_rate: float):
        self.policy, self.weak, self.learning_rate = policy, weak, learning_rate
        weak.requires_grad_(True)
        weak.train(policy.training)
        weak.to(next(policy.parameters()).device)
        policy.add_module(WEAK_MODULE, weak)

    @contextlib.contextmanager
    def attached_while_training(self):
        """The weak model is the policy's submodule inside the block (attached again for a second ``train()``), and
        detached when it ends, however it ends."""
        self.policy.add_module(WEAK_MODULE, self.weak)
        try:
            yield
        finally:
            delattr(self.policy, WEAK_MODULE)

    def split_param_groups(self, optimizer) -> None:
        """Move the weak parameters of each of the optimizer's groups to a group of their own (same settings,
        learning rate `learning_rate`), so the scheduler scales both learning rates alike."""
        weak = {id(p) for p in self.weak.parameters()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in weak]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in weak]
                optimizer.add_param_group({**group, "params": moved, "lr": self.learning_rate})

    @staticmethod
    def strong_state_dict(state_dict: dict) -> dict:
        """``state_dict`` of the policy without the weak model's entries: the strong model alone."""
        return {k: v for k, v in state_dict.items() if not k.startswith(f"{WEAK_MODULE}.")}

    @staticmethod
    def without_weak_missing_keys(load_result):
        """A policy load result without the weak model's keys among the missing ones (they are not in the policy's
        saved weights, `strong_state_dict`; the weak model is loaded on its own, `load`)."""
        missing = [k for k in load_result.missing_keys if not k.startswith(f"{WEAK_MODULE}.")]
        return load_result._replace(missing_keys=missing)

    def save(self, checkpoint: str) -> None:
        """The weak model's weights in ``checkpoint/weak_model/model.safetensors``."""
        os.makedirs(os.path.join(checkpoint, WEAK_CHECKPOINT_FOLDER), exist_ok=True)
        save_safetensors_model(self.weak, weak_checkpoint_file(checkpoint))

    def load(self, checkpoint: str) -> None:
        load_safetensors_model(self.weak, weak_checkpoint_file(checkpoint))
