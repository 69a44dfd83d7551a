"""The co-trained weak model of WD-JT (``train_weak_model=True``).

While the trainer trains, the weak model is the submodule `WEAK_MODULE` of the policy, so that the Trainer's one model
holds both: one optimizer (the weak parameters in groups of their own, learning rate ``weak_learning_rate``), one
gradient clipping, one DDP wrapper and one DeepSpeed engine (ZeRO shards the weak model like the policy). The mixed
loss gives its logits the gradient (1 - lam) * (p_mix - onehot(y)).

Only the strong model is saved: while the weak model is attached, its keys are in the policy's
``_keys_to_ignore_on_save``, which ``save_pretrained`` leaves out of the weights (so ``save_model`` and a checkpoint's
model weights are the strong model alone) and which the Trainer does not report missing when it loads those weights
back (resume, ``load_best_model_at_end``). A checkpoint keeps the weak model's weights with the training state: in
the optimizer's state dict (``optimizer.pt``, entry `WEAK_STATE_KEY`, added and restored by torch's optimizer
state-dict hooks), which the Trainer writes before ``trainer_state.json`` and loads when it resumes; under DeepSpeed in
the engine's own states. When ``train()`` returns the weak model is detached again, so the model object the user holds
is the strong model alone (its ``save_pretrained`` saves only it).
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers.trainer import OPTIMIZER_NAME
from transformers.trainer_pt_utils import safe_globals


# the co-trained weak model: its name as a submodule of the policy, and its weights' entry in the optimizer state dict
WEAK_MODULE = "wmss_weak_model"
WEAK_STATE_KEY = "wmss_weak_model"


def check_resume_matches(checkpoint: str, train_weak_model: bool) -> None:
    """Refuse a checkpoint (not DeepSpeed's) written with the other ``train_weak_model`` setting: a co-trained weak
    model's weights would be missing, or silently replaced by the original weak model."""
    file = os.path.join(checkpoint, OPTIMIZER_NAME)
    written = False
    if os.path.isfile(file):
        with safe_globals():  # the index and the pickle only, not the tensors (as checkpoints.py checks it)
            written = WEAK_STATE_KEY in torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    if train_weak_model and not written:
        raise ValueError(
            f"{checkpoint} holds no co-trained weak model (its {OPTIMIZER_NAME} has no {WEAK_STATE_KEY!r} entry, or "
            "there is none): it was written by a run with a frozen weak model (train_weak_model=False), or with "
            "save_only_model=True. Resume it with train_weak_model=False, or start this co-trained run from scratch."
        )
    if not train_weak_model and written:
        raise ValueError(
            f"{checkpoint} was written by a run that co-trained its weak model (its {OPTIMIZER_NAME} holds the weak "
            "model's weights), but this run freezes it: it would continue with the original weak model. Resume it "
            "with train_weak_model=True, or start this run from scratch."
        )


def check_attachable(trainer, weak) -> None:
    """Refuse, once the accelerator exists, what co-training the weak model inside the policy does not handle."""
    args = trainer.args
    engine = " and DeepSpeed engine" if trainer.is_deepspeed_enabled else ""
    what = f"train_weak_model=True puts the weak model in the policy's optimizer{engine}"
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
        self._ignored_before = None  # the policy's own `_keys_to_ignore_on_save`, while the weak model is attached
        self.attached = False
        self._attach()

    def _attach(self) -> None:
        """The weak model becomes the policy's submodule, its keys left out of the policy's saved weights."""
        if self.attached:
            return
        self.policy.add_module(WEAK_MODULE, self.weak)
        self._ignored_before = self.policy._keys_to_ignore_on_save
        weak_keys = {f"{WEAK_MODULE}.{key}" for key in self.weak.state_dict()}
        self.policy._keys_to_ignore_on_save = set(self._ignored_before or ()) | weak_keys
        self.attached = True

    def _detach(self) -> None:
        delattr(self.policy, WEAK_MODULE)
        self.policy._keys_to_ignore_on_save = self._ignored_before
        self.attached = False

    @contextlib.contextmanager
    def attached_while_training(self):
        """The weak model is the policy's submodule inside the block (attached again for a second ``train()``), and
        detached when it ends, however it ends."""
        self._attach()
        try:
            yield
        finally:
            self._detach()

    def split_param_groups(self, optimizer) -> None:
        """Move the weak parameters of each of the optimizer's groups to a group of their own (same settings,
        learning rate `learning_rate`), so the scheduler scales both learning rates alike."""
        weak = {id(p) for p in self.weak.parameters()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in weak]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in weak]
                optimizer.add_param_group({**group, "params": moved, "lr": self.learning_rate})

    def keep_in_optimizer_state(self, optimizer) -> None:
        """The weak model's weights ride in ``optimizer``'s state dict (entry `WEAK_STATE_KEY`): added by
        ``state_dict()``, restored into the weak model by ``load_state_dict()`` (torch's optimizer state-dict hooks),
        so a checkpoint's ``optimizer.pt`` holds them and resuming restores them. An optimizer whose own
        ``state_dict`` / ``load_state_dict`` skip torch's hooks is refused."""
        for method in ("state_dict", "load_state_dict"):
            if getattr(type(optimizer), method) is not getattr(torch.optim.Optimizer, method):
                raise ValueError(
                    f"train_weak_model=True keeps the weak model's weights in the optimizer's checkpoint state through "
                    f"torch's optimizer state-dict hooks, but {type(optimizer).__name__} has its own {method}, which "
                    "may skip them (a resumed run would then continue with the original weak model). Use a "
                    "torch.optim optimizer (`optim`), or set train_weak_model=False."
                )
        optimizer.register_state_dict_post_hook(self._add_weights)
        optimizer.register_load_state_dict_pre_hook(self._restore_weights)

    def _add_weights(self, optimizer, state_dict: dict) -> None:
        state_dict[WEAK_STATE_KEY] = self.weak.state_dict()

    def _restore_weights(self, optimizer, state_dict: dict) -> None:
        # also runs once when accelerate wraps the optimizer (it round-trips the state dict to place it): a no-op
        if WEAK_STATE_KEY not in state_dict:  # `check_resume_matches` refuses such a checkpoint before this
            raise ValueError(f"The optimizer state has no {WEAK_STATE_KEY!r} entry: no co-trained weak model to load.")
        self.weak.load_state_dict(state_dict.pop(WEAK_STATE_KEY))
