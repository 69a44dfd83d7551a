"""The reviewed list of the TRL / transformers methods each wmss_trl trainer overrides, with the reason for each.

The private names those overrides (and the rest of wmss_trl) rely on are in :mod:`wmss_trl.trl_compat`, with their
contracts. ``tests/test_trl_compat.py`` walks each trainer's MRO (our classes and mixins) and fails on an override
that is not listed here, and on a listed one that is gone, so that a new override is a visible, reviewed change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Override:
    """One TRL / transformers method (or card property) a wmss_trl trainer overrides, where (``defined_in``: our
    class or mixin) and why no public seam does the job."""

    name: str
    defined_in: str
    reason: str


_CARD = "WMSSModelCard"
_CARD_REASON = (
    "TRL's card seam, class attributes its own trainers set (`_name`, `_paper`, `_tag_names`): the card names the "
    "WMSS run. Not methods; the card's WMSS section is added by a callback (`wmss_trl.card.CardSection`)"
)
#: TRL's card attributes (class attributes in TRL, properties here): not counted as overridden methods
CARD_ATTRIBUTES = ("_name", "_paper", "_tag_names")
_CARD_OVERRIDES = tuple(Override(name, _CARD, _CARD_REASON) for name in CARD_ATTRIBUTES)
_RESUME = Override(
    "train",
    "CompleteCheckpointResume",
    "resolves `resume_from_checkpoint` to a complete checkpoint before transformers reads it (no callback runs "
    "before that)",
)

#: Every method of TRL's / transformers' trainers (besides ``__init__``) that our trainers override, by trainer class.
#: ``tests/test_trl_compat.py`` walks each class's MRO and fails on any override not listed here (and on any listed
#: one that is gone), so that a new override is a visible, reviewed change.
OVERRIDES: dict[str, tuple[Override, ...]] = {
    "WMSSSFTTrainer": (
        Override("compute_loss", "WMSSSFTTrainer", "the WD-JT loss (TRL's, untouched, without a weak model)"),
        Override("_get_train_sampler", "WMSSSFTTrainer", "WD-DS `weighted_sampler`: no public sampler seam"),
        Override(
            "train",
            "WMSSSFTTrainer",
            "the co-trained weak model is the policy's submodule (its keys in `_keys_to_ignore_on_save`) only while "
            "it runs",
        ),
        _RESUME,
        Override(
            "create_optimizer",
            "WMSSSFTTrainer",
            "the co-trained weak model's own parameter groups, and its weights in the optimizer's state dict (so a "
            "checkpoint's optimizer.pt holds them and resuming restores them: torch's optimizer state-dict hooks)",
        ),
        *_CARD_OVERRIDES,
    ),
    "WMSSDPOTrainer": (
        Override(
            "_compute_loss",
            "WMSSDPOTrainer",
            "one weak forward whose log-probs TRL's loss reads as the reference (`dpo_reference_from_inputs`)",
        ),
        Override("_prepare_dataset", "WMSSDPOTrainer", "the truncation and identical-pair checks on TRL's tokens"),
        Override(
            "_precompute_ref_logps",
            "WMSSDPOTrainer",
            "TRL precomputes inside its __init__: the weak model is checked and TRL's frozen adapter copy dropped first",
        ),
        _RESUME,
        *_CARD_OVERRIDES,
    ),
    "WMSSGRPOTrainer": (
        Override(
            "_generate_and_score_completions",
            "WMSSGRPOTrainer",
            "appends the weak rows, their advantages, the weak reference log-probs and the token weights",
        ),
        Override(
            "_get_per_token_logps_and_entropies",
            "WMSSGRPOTrainer",
            "WD-JT mixed log-probs for the policy; the token weights taken from the loss's own forward",
        ),
        Override("_compute_loss", "WMSSGRPOTrainer", "drops the zero-weight padding rows before TRL's loss"),
        _RESUME,
        *_CARD_OVERRIDES,
    ),
}
