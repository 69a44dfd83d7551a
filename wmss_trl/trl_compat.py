"""Every private TRL / transformers name wmss_trl relies on, in one place, with the contract it relies on.

TRL offers public extension points for little of what a WMSS trainer does (see docs/architecture.md), so the trainers
override or read a few private methods and attributes of ``GRPOTrainer``, ``DPOTrainer``, ``SFTTrainer`` and
``transformers.Trainer``. :data:`CONTACT_POINTS` lists them all (the ``used_by`` column says which of our modules
touches each); :func:`check_contact_points` verifies them against the installed TRL / transformers and returns one
clear line per broken contract (``tests/test_trl_compat.py`` runs it). After a TRL upgrade that test names what moved.
:data:`wmss_trl.trl_overrides.OVERRIDES` lists every TRL / transformers method each trainer overrides, with the reason.

Where a contract is not a method or an attribute but a piece of TRL's control flow, the contact is kept here, in one
documented helper, instead of being spread over the trainers:

* :func:`grpo_without_reference_model`: ``GRPOTrainer.__init__`` builds a reference model (a second copy of the
  policy) exactly when ``args.beta != 0`` and the policy is not a PEFT model. A WMSS-GRPO run with a separate weak
  model has its own reference (the weak model), so ``beta`` is reported as 0 while the parent builds itself.
* :func:`grpo_without_reference_logps`: ``GRPOTrainer._generate_and_score_completions`` computes
  ``ref_per_token_logps`` exactly when ``self.beta != 0``; WMSS-GRPO computes them itself, with the weak model, in the
  same forward as the weak rows' statistics.
* WMSS-GRPO's token weights taken from the loss's own forward rely on ``GRPOTrainer._compute_loss`` running its
  policy forward (``self._get_per_token_logps_and_entropies``) before it reads ``inputs["advantages"]`` and
  ``inputs["ref_per_token_logps"]``: the forward of our override applies them to the in-flight batch.
* :func:`grpo_batch_rewards`: ``GRPOTrainer._generate_and_score_completions`` logs the gathered per-function rewards
  of every batch it scores (``self._logs["rewards"]``); WMSS-GRPO reads them back there to pool them with the weak
  rows' rewards, instead of keeping ``_calculate_rewards``' return value on the side.
* :func:`dpo_reference_from_inputs`: ``DPOTrainer._compute_loss`` reads the reference log-probs from
  ``inputs["ref_chosen_logps"]`` / ``inputs["ref_rejected_logps"]`` instead of running the reference model exactly
  when ``self.precompute_ref_logps`` is true; WMSS-DPO hands it the weak model's log-probs that way (one weak forward,
  which also gives the logits / entropies WD-JT and the pair weights need).
* WD-JT's co-trained weak model (``sft/cotrain.py``) relies on ``save_pretrained`` dropping the policy's
  ``_keys_to_ignore_on_save`` from the saved weights (``Trainer._issue_warnings_after_load`` then does not report them
  missing), and on ``Trainer._save_checkpoint`` writing ``self.optimizer.state_dict()`` before ``trainer_state.json``
  (``_load_optimizer_and_scheduler`` loads it on resume): the weak model's weights ride in that state dict.
* :func:`fused_lm_head_output`: the ``FusedCausalLMOutput`` TRL's fused LM head returns (``fused_lm_head=True``),
  built with every field of the installed TRL (those we do not compute are None).
* :class:`wmss_trl.grpo.clock.GenerationClock` (a ``TrainerCallback``, no override) relies on transformers resuming
  in epoch ``global_step // U`` after skipping ``(global_step % U) * gradient_accumulation_steps`` batches and calling
  ``on_epoch_begin`` before ``_run_epoch`` iterates the dataloader, and on TRL generating at the micro-steps where
  ``self._step % (steps_per_generation * num_iterations) == 0`` (``_step`` counts the micro-steps trained).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass

import torch
from trl.trainer.utils import FusedCausalLMOutput


@dataclass(frozen=True)
class Contact:
    """One private name: ``owner`` (``module:Class`` or ``module``), ``name`` and what we rely on.

    ``kind`` is ``"method"`` (a callable whose leading parameters, after ``self``, are ``params``), ``"attribute"``
    (an instance attribute the owner's code assigns, ``self.<name> =``), ``"class_attribute"``, ``"import"`` (the
    module exports the name), ``"source"`` (the owner's source contains each string of ``params``: a control-flow
    contract or template text we edit) or ``"sequence"`` (it contains them in that order)."""

    owner: str
    name: str
    kind: str
    used_by: tuple[str, ...]
    params: tuple[str, ...] = ()


_GRPO, _DPO, _SFT = "trl:GRPOTrainer", "trl:DPOTrainer", "trl:SFTTrainer"
_TRAINER, _BASE = "transformers:Trainer", "trl.trainer.base_trainer:_BaseTrainer"
_MODEL, _COTRAIN = "transformers:PreTrainedModel", ("sft.cotrain",)

CONTACT_POINTS: tuple[Contact, ...] = (
    # ---- GRPOTrainer (wmss_trl.grpo)
    Contact(_GRPO, "_generate_and_score_completions", "method", ("grpo",), ("inputs",)),
    Contact(
        _GRPO, "_calculate_rewards", "method", ("grpo",), ("inputs", "prompts", "completions", "completion_ids_list")
    ),
    Contact(
        _GRPO,
        "_get_per_token_logps_and_entropies",
        "method",
        ("grpo",),
        (
            "model",
            "input_ids",
            "attention_mask",
            "logits_to_keep",
            "batch_size",
            "compute_entropy",
            "compute_aux_loss",
        ),
    ),
    Contact(_GRPO, "_compute_loss", "method", ("grpo",), ("model", "inputs")),
    Contact(_GRPO, "_tokenize_prompts", "method", ("grpo",), ("prompts",)),
    Contact(_GRPO, "_metrics", "attribute", ("grpo", "dpo", "sft")),
    Contact(_GRPO, "_logs", "attribute", ("grpo",)),
    Contact(_GRPO, "_pending_extra_logs", "attribute", ("grpo",)),
    Contact(_GRPO, "_pending_metrics", "attribute", ("grpo",)),
    Contact(_GRPO, "_tokenizer", "attribute", ("grpo",)),
    Contact(_GRPO, "_is_vlm", "attribute", ("grpo", "sft")),
    Contact(_GRPO, "_step", "attribute", ("grpo",)),
    # grpo/clock.py: TRL generates at the first of the `steps_per_generation * num_iterations` micro-steps that share
    # a generation batch, and `_step` counts the micro-steps trained
    Contact(
        _GRPO,
        "_prepare_inputs",
        "source",
        ("grpo.clock",),
        (
            "generate_every = self.args.steps_per_generation * self.num_iterations",
            "if self._step % generate_every == 0 or self._buffered_inputs is None:",
        ),
    ),
    Contact(_GRPO, "training_step", "sequence", ("grpo.clock",), ("super().training_step(", "self._step += 1")),
    Contact(_GRPO, "_entropy_bonus_enabled", "attribute", ("grpo",)),
    Contact(
        _GRPO,
        "__init__",
        "source",
        ("grpo_without_reference_model",),
        ("self.beta = args.beta", "if self.beta == 0.0:", "self.ref_model = None"),
    ),
    Contact(
        _GRPO,
        "_generate_and_score_completions",
        "source",
        ("grpo_without_reference_logps",),
        ("if self.beta != 0.0:", "ref_per_token_logps = None"),
    ),
    Contact(
        _GRPO,
        "_compute_loss",
        "sequence",
        ("grpo.stats.apply_token_weights",),
        (
            "self._get_per_token_logps_and_entropies(",
            'advantages = inputs["advantages"]',
            'ref_per_token_logps = inputs["ref_per_token_logps"]',
        ),
    ),
    Contact(
        _GRPO,
        "_generate_and_score_completions",
        "sequence",
        ("grpo_batch_rewards",),
        (
            "rewards_per_func = self._calculate_rewards(",
            'self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())',
            "return output",
        ),
    ),
    Contact("trl:GRPOConfig", "_VALID_DICT_FIELDS", "class_attribute", ("grpo",)),
    # ---- DPOTrainer (wmss_trl.dpo)
    Contact(_DPO, "_compute_loss", "method", ("dpo",), ("model", "inputs", "return_outputs")),
    Contact(_DPO, "_prepare_dataset", "method", ("dpo",), ("dataset", "processing_class", "args", "dataset_name")),
    Contact(_DPO, "_precompute_ref_logps", "method", ("dpo",), ("dataset", "name", "batch_size")),
    Contact(_DPO, "_precompute_model_hash", "attribute", ("dpo",)),
    Contact(_DPO, "_metrics", "attribute", ("dpo",)),
    Contact(
        _DPO,
        "_compute_loss",
        "source",
        ("dpo_reference_from_inputs",),
        ("if self.precompute_ref_logps:", 'inputs["ref_chosen_logps"]', 'inputs["ref_rejected_logps"]'),
    ),
    Contact(
        _DPO,
        "__init__",
        "source",
        ("dpo",),
        ("self.precompute_ref_logps = args.precompute_ref_log_probs", 'model.add_adapter("ref", default_config)'),
    ),
    Contact("trl:DPOConfig", "_VALID_DICT_FIELDS", "class_attribute", ("dpo",)),
    Contact("trl.trainer.utils", "FusedCausalLMOutput", "import", ("fused_lm_head_output",)),
    # ---- SFTTrainer (wmss_trl.sft)
    Contact(
        _SFT,
        "_prepare_dataset",
        "method",
        ("sft",),
        ("dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"),
    ),
    Contact(_SFT, "_get_train_sampler", "method", ("sft",), ("train_dataset",)),
    Contact(_SFT, "_formatting_func", "attribute", ("sft",)),
    Contact(_SFT, "_total_train_tokens", "attribute", ("sft",)),
    Contact(_SFT, "_tp_size", "attribute", ("sft",)),
    Contact(_SFT, "_is_vlm", "attribute", ("sft",)),
    Contact(_SFT, "_metrics", "attribute", ("sft",)),
    Contact("trl:SFTConfig", "_VALID_DICT_FIELDS", "class_attribute", ("sft",)),
    Contact("trl.models.utils", "_ForwardRedirection", "import", ("sft",)),
    # ---- the model card (wmss_trl.card, used by every trainer): TRL writes its card in `_save_checkpoint` before it
    # saves (so before the `on_save` callback that completes it)
    Contact(_BASE, "_name", "class_attribute", ("card",)),
    Contact(_BASE, "_paper", "class_attribute", ("card",)),
    Contact(_BASE, "_tag_names", "class_attribute", ("card",)),
    Contact(
        "trl.trainer.base_trainer:_BaseTrainer",
        "create_model_card",
        "source",
        ("card",),
        ("base_model = None", 'os.path.join(self.args.output_dir, "README.md")'),
    ),
    Contact(
        "trl:templates/lm_model_card.md",
        "card template",
        "source",
        ("card",),
        (
            "[{{ base_model }}](https://huggingface.co/{{ base_model }})",
            'model="{{ hub_model_id }}"',
            "## Quick start",
        ),
    ),
    Contact("trl:templates/lm_model_card.md", "card anchor", "source", ("card",), ("### Framework versions",)),
    *(
        Contact(
            trainer,
            "_save_checkpoint",
            "sequence",
            ("card",),
            ("self.create_model_card(", "super()._save_checkpoint("),
        )
        for trainer in (_SFT, _DPO, _GRPO)
    ),
    # ---- TrlParser (wmss_trl.cli): an unknown flag raises this ValueError, which `wmss` turns into a one-line error
    Contact(
        "trl:TrlParser",
        "parse_args_into_dataclasses",
        "source",
        ("cli",),
        ("Some specified arguments are not used by the HfArgumentParser",),
    ),
    # ---- transformers
    # the generation clock (grpo/clock.py): where a resumed run starts, and that callbacks see each epoch begin
    # before its batches are drawn
    Contact(
        _TRAINER,
        "_init_training_state",
        "source",
        ("grpo.clock",),
        (
            "epochs_trained = int(self.state.global_step // num_update_steps_per_epoch)",
            "steps_trained_in_current_epoch = self.state.global_step % num_update_steps_per_epoch",
            "steps_trained_in_current_epoch *= self.args.gradient_accumulation_steps",
        ),
    ),
    Contact(_TRAINER, "_inner_training_loop", "sequence", ("grpo.clock",), ("on_epoch_begin(", "self._run_epoch(")),
    Contact(_TRAINER, "_run_epoch", "source", ("grpo.clock",), ("epoch_iterator = iter(train_dataloader)",)),
    # the co-trained weak model of WD-JT (sft/cotrain.py): its keys in the policy's `_keys_to_ignore_on_save` keep it
    # out of the saved weights (and out of the missing keys when they are loaded back); its weights ride in the
    # optimizer's state dict, which every checkpoint writes before trainer_state.json and a resume loads
    Contact(_MODEL, "_keys_to_ignore_on_save", "class_attribute", _COTRAIN),
    Contact(_MODEL, "save_pretrained", "source", _COTRAIN, ("in self._keys_to_ignore_on_save:", "del state_dict[")),
    Contact(
        _TRAINER, "_issue_warnings_after_load", "source", _COTRAIN, ("== set(self.model._keys_to_ignore_on_save)",)
    ),
    Contact(
        _TRAINER, "_save_checkpoint", "sequence", _COTRAIN, ("self._save_optimizer_and_scheduler(", "save_to_json(")
    ),
    Contact(_TRAINER, "_save_optimizer_and_scheduler", "source", _COTRAIN, ("torch.save(self.optimizer.state_dict(",)),
    Contact(_TRAINER, "_load_optimizer_and_scheduler", "source", _COTRAIN, ("self.optimizer.load_state_dict(",)),
    Contact("transformers:GenerationMixin", "_prepare_generation_config", "method", ("grpo",), ("generation_config",)),
    Contact("transformers.generation.logits_process", "TopHLogitsWarper", "import", ("grpo",)),
)


def _resolve(owner: str):
    module_name, _, attr = owner.partition(":")
    module = importlib.import_module(module_name)
    if attr.startswith("templates/"):
        return module, attr
    return (getattr(module, attr) if attr else module), None


def _source_of(owner: str, name: str) -> str:
    target, template = _resolve(owner)
    if template is not None:
        with open(f"{inspect.getfile(target).rsplit('/', 1)[0]}/{template}", encoding="utf-8") as f:
            return f.read()
    return inspect.getsource(getattr(target, name) if name != "__init__" else target.__init__)


def check_contact(contact: Contact) -> str | None:
    """None when the installed libraries keep ``contact``; otherwise one line naming what changed."""
    label = f"{contact.owner}.{contact.name} (used by wmss_trl: {', '.join(contact.used_by)})"
    try:
        target, _ = _resolve(contact.owner)
    except (ImportError, AttributeError) as error:
        return f"{label}: {contact.owner} cannot be imported ({error})"
    if contact.kind in ("source", "sequence"):
        try:
            text = _source_of(contact.owner, contact.name)
        except (OSError, TypeError, AttributeError) as error:
            return f"{label}: its source cannot be read ({error})"
        missing = [s for s in contact.params if s not in text]
        if missing:
            return f"{label}: the code no longer contains {missing}"
        positions = [text.index(s) for s in contact.params]
        if contact.kind == "sequence" and positions != sorted(positions):
            return f"{label}: the code no longer runs {list(contact.params)} in this order"
        return None
    if contact.kind in ("import", "class_attribute"):
        return None if hasattr(target, contact.name) else f"{label}: no longer exists"
    if contact.kind == "attribute":
        pattern = re.compile(rf"self\.{re.escape(contact.name)}\s*(:[^=\n]*)?=[^=]")
        for cls in inspect.getmro(target):
            if cls.__module__.split(".")[0] not in ("trl", "transformers"):
                continue
            with contextlib.suppress(OSError, TypeError):
                if pattern.search(inspect.getsource(cls)):
                    return None
        return f"{label}: no class of {contact.owner} assigns self.{contact.name} any more"
    method = getattr(target, contact.name, None)
    if not callable(method):
        return f"{label}: the method no longer exists"
    names = [p for p in inspect.signature(method).parameters if p != "self"][: len(contact.params)]
    if tuple(names) != contact.params:
        return f"{label}: its signature changed: expected leading parameters {contact.params}, found {tuple(names)}"
    return None


def check_contact_points() -> list[str]:
    """One line per broken contract of :data:`CONTACT_POINTS` (empty: all hold)."""
    return [problem for problem in map(check_contact, CONTACT_POINTS) if problem is not None]


@contextlib.contextmanager
def grpo_without_reference_model(args):
    """While ``GRPOTrainer.__init__`` runs, report ``args.beta = 0`` so it builds no reference copy of the policy
    (contract: its ``if self.beta == 0.0: self.ref_model = None``). ``args.beta`` is restored on exit, also on error;
    the caller sets the trainer's ``beta`` back from it."""
    beta = args.beta
    args.beta = 0.0
    try:
        yield beta
    finally:
        args.beta = beta


@contextlib.contextmanager
def grpo_without_reference_logps(trainer, active: bool = True):
    """While TRL's ``_generate_and_score_completions`` runs, skip its reference forward (contract: it computes
    ``ref_per_token_logps`` only when ``self.beta != 0``); ``trainer.beta`` is restored on exit, also on error."""
    beta = trainer.beta
    if active:
        trainer.beta = 0.0
    try:
        yield
    finally:
        trainer.beta = beta


def grpo_batch_rewards(trainer, num_rows: int) -> torch.Tensor:
    """The gathered ``rewards_per_func`` ``(num_rows, F)`` of the batch TRL's ``_generate_and_score_completions`` has
    just scored, read back from its completions log (contract: for every batch, it extends
    ``self._logs["rewards"][name]`` with ``rewards_per_func[:, i].tolist()`` for each reward function, in
    ``reward_func_names`` order). Exact: float32 -> Python float -> float32 (NaN for an unscored reward stays NaN).
    The log keeps the last ``generation_batch_size`` rows (more with weak rows), the gathered size of the generation
    batch TRL's dataloader hands over, so it holds the whole batch."""
    logs = trainer._logs["rewards"]
    short = [name for name in trainer.reward_func_names if len(logs[name]) < num_rows]
    if short:
        raise RuntimeError(
            f"GRPOTrainer's completions log holds fewer than the batch's {num_rows} rewards for {short}: TRL no longer "
            "logs every batch's rewards_per_func there (see wmss_trl.trl_compat.grpo_batch_rewards)."
        )
    columns = [list(logs[name])[len(logs[name]) - num_rows :] for name in trainer.reward_func_names]
    return torch.tensor(columns, dtype=torch.float32, device=trainer.accelerator.device).T.contiguous()


@contextlib.contextmanager
def dpo_reference_from_inputs(trainer):
    """While TRL's ``DPOTrainer._compute_loss`` runs, make it read the reference log-probs from
    ``inputs["ref_chosen_logps"]`` / ``inputs["ref_rejected_logps"]`` (contract: it does so when
    ``self.precompute_ref_logps``); the flag is restored on exit, also on error."""
    precompute = trainer.precompute_ref_logps
    trainer.precompute_ref_logps = True
    try:
        yield
    finally:
        trainer.precompute_ref_logps = precompute


def fused_lm_head_output(**values) -> FusedCausalLMOutput:
    """A ``FusedCausalLMOutput`` with ``values`` and None for every other field of the installed TRL. A name that is
    not one of its fields is refused (TRL renamed or dropped it)."""
    names = {f.name for f in dataclasses.fields(FusedCausalLMOutput)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"trl.trainer.utils.FusedCausalLMOutput has no field(s) {unknown}; it has {sorted(names)}.")
    return FusedCausalLMOutput(**{name: values.get(name) for name in names})
