"""WD-JT (Weak-Driven Joint Training) as a drop-in TRL ``SFTTrainer``.

With a weak model (a frozen earlier checkpoint of the same model, or the adapter-disabled PEFT base with
``peft_base_as_weak=True``) and ``0 < lam < 1``, the loss is cross-entropy of the labels under the mixed logits:

    z_mix = lam * z_strong + (1 - lam) * z_weak,      L = -sum_t log softmax(z_mix)_t[y_t] / N_tokens

on exactly the tokens TRL's SFT trains (completion-only / assistant-only masks honoured); for an MoE policy,
SFTTrainer's router load-balancing term ``router_aux_loss_coef * aux_loss`` is added to L. The weak model is frozen,
unless ``train_weak_model=True`` co-trains it by the same loss (the official code's default); only the strong model
is saved (a checkpoint keeps a co-trained weak model's state for resuming), so inference is unchanged. The
saturation metrics of :mod:`wmss_trl.diagnostics` are logged from the loss's chunks (``saturation_metrics``).

Without a weak model, or with ``lam = 1`` (where z_mix = z_strong), the trainer is TRL's ``SFTTrainer``: its
``compute_loss`` (every ``loss_type``, ``compute_loss_func``, the MoE auxiliary loss, PEFT prompt learning) and its
metrics; a weak model is then neither loaded nor run. docs/sft.md lists what ``lam < 1`` supports.

The parts: `config` (`WMSSSFTConfig`), `trainer` (`WMSSSFTTrainer`: the overrides of TRL's trainer), `loss` (the
mixed loss and its metrics), `cotrain` (the co-trained weak model) and `checks` (the refusals); the model card of every
wmss_trl trainer is :mod:`wmss_trl.card`.
"""

from .config import WMSSSFTConfig
from .trainer import WMSSSFTTrainer


__all__ = ["WMSSSFTConfig", "WMSSSFTTrainer"]
