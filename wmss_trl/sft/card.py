"""The model card of the wmss_trl trainers: TRL's card, naming the WMSS run as TRL's cards name their method."""

from __future__ import annotations

import os

from trl.trainer.utils import get_config_model_id


WMSS_PAPER = {
    "title": "Weak-Driven Learning: How Weak Agents Make Strong Agents Stronger",
    "id": "2602.08222",
    "citation": "@article{chen2026weakdriven, title={Weak-Driven Learning: How Weak Agents Make Strong Agents "
    "Stronger}, author={Chen, Zehao and Li, Gongxun and Ai, Tianxiang and others}, journal={arXiv preprint "
    "arXiv:2602.08222}, year={2026}}",
}


class WMSSModelCard:
    """TRL's model card (`create_model_card`: written with each checkpoint, and by the `wmss` commands at the end),
    naming the WMSS run as TRL's cards name their method.

    WMSS active (`wmss_enabled`): method `_wmss_name`, the WMSS paper (`WMSS_PAPER`), tag `wmss`, the base model (a
    local folder too, which TRL's template renders as "[None]"; the quick start then loads `output_dir`), the TRL
    method and its paper, the weak model and every WMSS setting of the config.
    WMSS inactive: TRL's card, exactly, plus one line saying so.
    """

    _wmss_name = "WMSS"

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

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if self._card_as_wmss:
            base = get_config_model_id(self.model.config)
            if base and os.path.isdir(base):  # TRL names hub models only: "fine-tuned version of [None](...)"
                text = text.replace("[None](https://huggingface.co/None)", f"`{base}` (local folder)", 1)
            if self.hub_model_id is None:  # TRL's quick start would load model="None"
                text = text.replace('model="None"', f'model="{self.args.output_dir}"', 1)
            text = _insert_before(text, "### Framework versions", self._wmss_card_section(base))
        else:
            line = (
                f"WMSS was inactive in this run (no weak model given): it was trained by TRL's "
                f"{self._trl_name}, unchanged, through wmss_trl.\n"
            )
            text = _insert_before(text, "## Quick start", line + "\n")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

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
            "### WMSS (Weak-Driven Learning)",
            "",
            f"{self._wmss_name} (arXiv:{WMSS_PAPER['id']}) is TRL's {self._trl_name}{built_on} with a weak model, "
            "trained with wmss_trl:",
            "",
            f"- Base (strong) model: `{base}`",
            f"- Weak model: {weak_text}",
            *(f"- `{name}`: `{getattr(args, name)!r}`" for name in names),
        ]
        return "\n".join(lines) + "\n\n"


def _insert_before(text: str, anchor: str, insert: str) -> str:
    """``text`` with ``insert`` placed before the first line starting with ``anchor`` (appended when there is none)."""
    at = text.find("\n" + anchor)
    return text + "\n" + insert if at < 0 else text[: at + 1] + insert + text[at + 1 :]
