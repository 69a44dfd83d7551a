"""The model card of the wmss_trl trainers: TRL's card, naming the WMSS run as TRL's cards name their method.

No TRL method is overridden for it. TRL's card seam is three class attributes (``_name``, ``_paper``, ``_tag_names``),
which :class:`WMSSModelCard` sets per run; TRL's ``create_model_card`` then writes ``output_dir/README.md`` (with each
checkpoint, in ``_save_checkpoint``), and :func:`write_card_section` completes that file with what TRL's template has
no field for: the base and weak model and the WMSS settings. It runs from a callback after each checkpoint
(:class:`CardSection`, ``on_save``), and at the end of every ``wmss`` command (``recipes.common.finish_run``). A
Python user who writes the card with ``trainer.create_model_card()`` calls ``write_card_section(trainer)`` after it;
``trainer.push_to_hub()`` uploads TRL's card (named WMSS, with the paper and tag, without that section).
"""

from __future__ import annotations

import os

from transformers import TrainerCallback
from trl.trainer.utils import get_config_model_id


WMSS_PAPER = {
    "title": "Weak-Driven Learning: How Weak Agents Make Strong Agents Stronger",
    "id": "2602.08222",
    "citation": "@article{chen2026weakdriven, title={Weak-Driven Learning: How Weak Agents Make Strong Agents "
    "Stronger}, author={Chen, Zehao and Li, Gongxun and Ai, Tianxiang and others}, journal={arXiv preprint "
    "arXiv:2602.08222}, year={2026}}",
}


class WMSSModelCard:
    """Mixin (before the TRL trainer): TRL's model card, naming the WMSS run as TRL's cards name their method.

    WMSS active (`wmss_enabled`): method `_wmss_name`, the WMSS paper (`WMSS_PAPER`), tag `wmss`; and, added by
    :func:`write_card_section`, the base model (a local folder too, which TRL's template renders as "[None]"; the
    quick start then loads `output_dir`), the TRL method and its paper, the weak model and every WMSS setting.
    WMSS inactive: TRL's card, exactly, plus one line saying so.
    """

    _wmss_name = "WMSS"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(CardSection(self))

    @property
    def _card_as_wmss(self) -> bool:
        return getattr(self, "wmss_enabled", False)

    @property
    def _trl_name(self) -> str:
        """The name of the TRL trainer this one extends (the class after this mixin in the MRO), e.g. `SFTTrainer`."""
        mro = type(self).__mro__
        return mro[mro.index(WMSSModelCard) + 1].__name__

    @property
    def _name(self):
        return self._wmss_name if self._card_as_wmss else super()._name

    @property
    def _paper(self):
        return WMSS_PAPER if self._card_as_wmss else super()._paper

    @property
    def _tag_names(self):
        return [*super()._tag_names, "wmss"] if self._card_as_wmss else super()._tag_names

    def _wmss_card_section(self, base: str) -> str:
        """The card's WMSS section: base and weak model, and the WMSS fields of the config (those declared by
        wmss_trl's config classes) with their values."""
        args = self.args
        names = [
            name
            for cls in reversed(type(args).__mro__)
            if cls.__module__.startswith("wmss_trl")
            for name in cls.__dict__.get("__annotations__", {})
            if name != "weak_model_name_or_path"
        ]
        weak = getattr(self, "weak_model", None)
        if getattr(args, "peft_base_as_weak", False):
            weak_text = "the base model with its PEFT adapters disabled (`peft_base_as_weak=True`)"
        elif weak is not None:
            weak_text = f"`{get_config_model_id(self.accelerator.unwrap_model(weak).config)}`"
        elif args.weak_model_name_or_path:
            weak_text = f"`{args.weak_model_name_or_path}` (given; not loaded, this configuration does not use it)"
        else:
            weak_text = "given as a model object; not loaded, this configuration does not use it"
        trl_paper = super()._paper
        built_on = f" ([{trl_paper['title']}](https://huggingface.co/papers/{trl_paper['id']}))" if trl_paper else ""
        lines = [
            SECTION_TITLE,
            "",
            f"{self._wmss_name} (arXiv:{WMSS_PAPER['id']}) is TRL's {self._trl_name}{built_on} with a weak model, "
            "trained with wmss_trl:",
            "",
            f"- Base (strong) model: `{base}`",
            f"- Weak model: {weak_text}",
            *(f"- `{name}`: `{getattr(args, name)!r}`" for name in names),
        ]
        return "\n".join(lines) + "\n\n"


SECTION_TITLE = "### WMSS (Weak-Driven Learning)"
INACTIVE_LINE = (
    "WMSS was inactive in this run (no weak model given): it was trained by TRL's {}, unchanged, through wmss_trl."
)


def write_card_section(trainer) -> None:
    """Complete the card TRL's ``create_model_card`` wrote in ``output_dir/README.md`` (main process only; nothing
    without that file; a card already completed is left as it is). WMSS active: the base model named also when it
    is a local folder, the quick start loading ``output_dir`` when there is no hub id, and the WMSS section before
    "### Framework versions". WMSS inactive: one line before "## Quick start". A TRL trainer's card is left as is."""
    path = os.path.join(trainer.args.output_dir, "README.md")
    if not isinstance(trainer, WMSSModelCard):  # TRL's own trainer (e.g. `wmss grpo --vanilla`): TRL's card, as is
        return
    if not trainer.is_world_process_zero() or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if SECTION_TITLE in text or INACTIVE_LINE.format(trainer._trl_name) in text:
        return
    if trainer._card_as_wmss:
        base = get_config_model_id(trainer.model.config)
        if base and os.path.isdir(base):  # TRL names hub models only: "fine-tuned version of [None](...)"
            text = text.replace("[None](https://huggingface.co/None)", f"`{base}` (local folder)", 1)
        if trainer.hub_model_id is None:  # TRL's quick start would load model="None"
            text = text.replace('model="None"', f'model="{trainer.args.output_dir}"', 1)
        text = _insert_before(text, "### Framework versions", trainer._wmss_card_section(base))
    else:
        text = _insert_before(text, "## Quick start", INACTIVE_LINE.format(trainer._trl_name) + "\n\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class CardSection(TrainerCallback):
    """After each checkpoint (TRL's ``_save_checkpoint`` writes its card before ``on_save``): :func:`write_card_section`."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        write_card_section(self.trainer)


def _insert_before(text: str, anchor: str, insert: str) -> str:
    """``text`` with ``insert`` placed before the first line starting with ``anchor`` (appended when there is none)."""
    at = text.find("\n" + anchor)
    return text + "\n" + insert if at < 0 else text[: at + 1] + insert + text[at + 1 :]
