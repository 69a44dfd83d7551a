"""DPO against the weak checkpoint: ``WMSSDPOConfig`` / ``WMSSDPOTrainer`` (a drop-in TRL ``DPOTrainer``).

The reference policy of DPO is the weak model M_w (an earlier checkpoint of the strong model; with a PEFT policy and
``peft_base_as_weak=True``, the adapter-disabled base). With every option off the loss is TRL's, with ref = M_w:

    L = mean_i loss_type( beta * [ (log pi(y+|x) - log M_w(y+|x)) - (log pi(y-|x) - log M_w(y-|x)) ] )

Two optional WMSS pieces:

* WD-JT (``mixing_lambda < 1``): the policy's token log-probs come from the mixed logits,
      log pi_mix(y_t) = log softmax(lam * z_strong + (1 - lam) * z_weak)[y_t],
  so every TRL loss type is evaluated on pi_mix; only the strong model is trained and saved.
* Entropy-gap pair weights (``entropy_pair_weights=True``): with H_w(i), H_s(i) the mean token entropy (nats) of the
  weak and of the current strong model on the rejected answer of pair i, and dH_i = H_s(i) - H_w(i) (strong minus
  weak, as in WD-DS),
      u_i = a * H_w(i) / mean(H_w) + b * max(0, -dH_i) / mean(max(0, -dH)) + c * max(0, dH_i) / mean(max(0, dH))
      w_i = u_i / (a + b * [mean(max(0, -dH)) > 0] + c * [mean(max(0, dH)) > 0])          (so mean_i w_i = 1)
  (a, b, c) = (pair_weight_alpha, pair_weight_beta, pair_weight_gamma), WD-DS's 0.1 / 0.8 / 0.1 by default: most of
  the weight goes to the pairs whose wrong answer the strong model has become *more* certain about than the weak one.
  Means are over the micro-batch of all processes (with gradient accumulation, each micro-batch is normalised on its
  own). A term whose mean is 0 is left out. The weights scale the
  gradient of each pair, grad L = (1/B) * sum_i w_i * grad l_i; the ``loss`` TRL logs stays the unweighted mean.

With no weak model (and ``peft_base_as_weak=False``) WMSS is inactive: the trainer is TRL's ``DPOTrainer``, with TRL's
default reference (a copy of the policy, the adapter-disabled PEFT model, or precomputed log-probs); the WMSS options
that need a weak model (``mixing_lambda < 1``, ``entropy_pair_weights``) are then refused.

Metrics (namespace ``wmss/``): ``weak_logps/{chosen,rejected}``; with WD-JT ``strong_logps/{chosen,rejected}``
(the strong model alone); with pair weights ``weak_entropy/rejected``, ``strong_entropy/rejected``,
``entropy_gap/rejected`` (mean dH) and ``pair_weight/{min,max,std}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, hash_module

from .checkpoints import CompleteCheckpointResume
from .checks import as_wmss_config, check_float, check_int, check_shares
from .config import WeakModelArgs
from .core import three_signal_weights
from .data_checks import check_dataset_columns, require_rows
from .entropy import masked_mean, token_entropy, token_nll, trained_positions
from .mixing import mix_logits, mixed_token_logprobs
from .sft import WMSSModelCard
from .trl_compat import dpo_reference_from_inputs, fused_lm_head_output
from .weak import (
    check_weak_compatible,
    freeze,
    is_peft_model,
    require_safetensors,
    resolve_weak_model,
    weak_forward_context,
)


logger = logging.getLogger(__name__)

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_SORTING_LOSSES = {"aot", "aot_unpaired"}


@dataclass
class WMSSDPOConfig(WeakModelArgs, DPOConfig):
    r"""
    Configuration for [`WMSSDPOTrainer`]: everything of [`~trl.DPOConfig`], plus the weak model and the WMSS options.

    Parameters:
        weak_model_name_or_path (`str`, *optional*):
            Local folder of the weak checkpoint, the DPO reference (an earlier checkpoint of the same model, same
            tokenizer). Overridden by the trainer's `weak_model` argument. With no weak model (and
            `peft_base_as_weak=False`) WMSS is inactive and the trainer is TRL's `DPOTrainer`.
        peft_base_as_weak (`bool`, defaults to `False`):
            With a PEFT policy (a `PeftModel` or `peft_config`) and no weak model, use the policy with its adapters
            disabled as the weak model (no second copy of the weights). Off, a `peft_config` alone means plain TRL.
        weak_model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments for `from_pretrained` of the weak model (dict or JSON string).
        mixing_lambda (`float`, defaults to `1.0`):
            WD-JT: the policy log-probs come from z_mix = lambda * z_strong + (1 - lambda) * z_weak. 1.0 is off (plain
            DPO log-probs); the WMSS paper's value is 0.5. Must satisfy 0 < lambda <= 1.
        mixing_chunk_size (`int`, defaults to `256`):
            Positions per chunk of the fp32 mixed log-softmax.
        entropy_pair_weights (`bool`, defaults to `False`):
            Weight each pair by the weak/strong entropy gap on its rejected answer (formula in the module docstring).
        pair_weight_alpha, pair_weight_beta, pair_weight_gamma (`float`, defaults to `0.1`, `0.8`, `0.1`):
            Shares of the three WD-DS signals: weak entropy, entropy drop (strong more certain), entropy rise.
        drop_identical_pairs (`bool`, defaults to `False`):
            Pairs whose chosen and rejected are the same token sequence after tokenisation and truncation
            (`max_length`, `truncation_mode`) carry no preference: with WMSS active they raise an error by default;
            with this set they are dropped and counted. With WMSS inactive they are kept, as TRL does, with a warning.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["weak_model_init_kwargs"]

    mixing_lambda: float = field(
        default=1.0,
        metadata={
            "help": "WD-JT: policy log-probs from lambda*z_strong + (1-lambda)*z_weak. 1.0 = off (plain DPO); "
            "the paper uses 0.5."
        },
    )
    entropy_pair_weights: bool = field(
        default=False,
        metadata={"help": "Weight each pair by the weak/strong entropy gap on its rejected answer (mean 1)."},
    )
    pair_weight_alpha: float = field(default=0.1, metadata={"help": "Share of the weak-entropy signal."})
    pair_weight_beta: float = field(
        default=0.8, metadata={"help": "Share of the entropy-drop signal (strong more certain than weak)."}
    )
    pair_weight_gamma: float = field(
        default=0.1, metadata={"help": "Share of the entropy-rise signal (strong less certain than weak)."}
    )
    drop_identical_pairs: bool = field(
        default=False,
        metadata={
            "help": "Drop (and count) pairs whose chosen and rejected are the same tokens after truncation, "
            "instead of raising an error (WMSS active) or keeping them with a warning (WMSS inactive)."
        },
    )

    def __post_init__(self):
        self.mixing_lambda = check_float(
            "mixing_lambda",
            self.mixing_lambda,
            low=0.0,
            low_open=True,
            high=1.0,
            hint="It is the weight of the STRONG logits: 1.0 is plain DPO, the paper's value is 0.5.",
        )
        self.mixing_chunk_size = check_int("mixing_chunk_size", self.mixing_chunk_size, low=1)
        self.pair_weight_alpha, self.pair_weight_beta, self.pair_weight_gamma = check_shares(
            ("pair_weight_alpha", "pair_weight_beta", "pair_weight_gamma"),
            (self.pair_weight_alpha, self.pair_weight_beta, self.pair_weight_gamma),
        )
        super().__post_init__()
        if self.entropy_pair_weights and _SORTING_LOSSES & set(self.loss_type):
            raise ValueError(
                f"entropy_pair_weights cannot be combined with loss_type {sorted(_SORTING_LOSSES & set(self.loss_type))}: "
                "those losses sort the pairs of a batch, which breaks per-pair weights."
            )


# ----------------------------------------------------------------------------------------------------------------
# Small pure functions


def sequence_logps(per_token_logps: torch.Tensor, shift_completion_mask: torch.Tensor, ld_alpha: float | None = None):
    """Sequence log-prob of each row, exactly as TRL's DPO builds it from per-token log-probs (zero off-completion).

    log p(y|x) = sum_t log p(y_t | x, y_<t)
    LD-DPO (ld_alpha): sum over the first min(|y+|, |y-|) tokens + ld_alpha * sum over the rest
    """
    if ld_alpha is None:
        return per_token_logps.sum(dim=1)
    comp_pos = shift_completion_mask.cumsum(dim=1)
    chosen_lens, rejected_lens = shift_completion_mask.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens)
    shared = torch.cat([shared, shared], dim=0).to(per_token_logps.device).unsqueeze(1)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared)
    tail_mask = comp_pos > shared
    return (per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (per_token_logps * tail_mask).sum(dim=1)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient of row i by ``scale[i]`` in the backward pass."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), None


def scale_grad(x: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """y = x, dL/dx_i = row_scale_i * dL/dy_i. Weighting every per-token log-prob of pair i by w_i this way turns the
    gradient of any per-pair DPO loss (1/B) sum_i l_i into (1/B) sum_i w_i grad l_i."""
    return _ScaleGrad.apply(x, row_scale.detach())


def _scatter_columns(values: torch.Tensor, columns: torch.Tensor, width: int) -> torch.Tensor:
    """A ``(rows, width)`` tensor of zeros with ``values[:, k]`` placed at column ``columns[k]`` (differentiable)."""
    out = values.new_zeros((values.shape[0], width))
    return out.index_copy(1, columns.to(values.device), values)


@torch.no_grad()
def _mixed_log_sum_sq_probs(strong, weak, lam, chunk_size):
    """log sum_v p_mix(v)^2 per position (WPO's weights), chunked, fp32."""
    vocab = strong.shape[-1]
    flat_s, flat_w = strong.reshape(-1, vocab), weak.reshape(-1, vocab)
    out = torch.empty(flat_s.shape[0], dtype=torch.float32, device=strong.device)
    for start in range(0, flat_s.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logp = torch.log_softmax(mix_logits(flat_s[sl], flat_w[sl], lam), dim=-1)
        out[sl] = torch.logsumexp(2 * logp, dim=-1)
    return out.view(strong.shape[:-1])


# ----------------------------------------------------------------------------------------------------------------
# The policy forward, as DPOTrainer._compute_loss sees it


@dataclass
class _WeakOutputs:
    per_token_logps: torch.Tensor  # (2B, T-1), zero off-completion
    entropy: torch.Tensor | None  # (2B, T-1) or None
    logits: torch.Tensor | None  # (2B, K, V) at `keep` positions (WD-JT only)
    keep: torch.Tensor | None


class _WMSSPolicy:
    """Stands in for the policy inside ``DPOTrainer._compute_loss``: a call with ``fused_lm_head=True`` returns a
    ``FusedCausalLMOutput`` whose ``log_probs`` are the mixed ones (WD-JT) and/or carry the per-pair gradient weights;
    every other call goes to the model unchanged."""

    def __init__(self, model, trainer: WMSSDPOTrainer, weak: _WeakOutputs, shift_mask: torch.Tensor):
        self.model, self.trainer, self.weak, self.shift_mask = model, trainer, weak, shift_mask
        self.stats: dict[str, torch.Tensor] = {}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        if not kwargs.get("fused_lm_head", False):
            return self.model(*args, **kwargs)
        trainer = self.trainer
        if trainer.mixing_lambda < 1.0:
            out = self._mixed_forward(kwargs)
        else:
            out = self.model(*args, **kwargs)
        if trainer.args.entropy_pair_weights:
            _, rejected_mask = self.shift_mask.chunk(2, dim=0)
            _, h_strong = masked_mean(out.entropy.detach().float(), self.shift_mask).chunk(2, dim=0)
            _, h_weak = masked_mean(self.weak.entropy.float(), self.shift_mask).chunk(2, dim=0)
            args = trainer.args
            w = three_signal_weights(
                h_weak,
                h_strong,
                (args.pair_weight_alpha, args.pair_weight_beta, args.pair_weight_gamma),
                reduce_sum=lambda t: trainer.accelerator.reduce(t, reduction="sum"),
            ).float()
            out.log_probs = scale_grad(out.log_probs, torch.cat([w, w]))
            self.stats.update(weights=w, h_weak=h_weak, h_strong=h_strong)
        return out

    def _mixed_forward(self, kwargs):
        trainer = self.trainer
        kwargs = dict(kwargs)
        kwargs.pop("fused_lm_head")
        labels = kwargs.pop("labels")
        keep, targets = trained_positions(labels)
        if self.weak.keep is None or not torch.equal(keep, self.weak.keep):
            raise RuntimeError("internal error: the weak and strong forwards scored different positions.")
        outputs = self.model(**kwargs, logits_to_keep=keep)  # the original forward: logits at `keep` only
        strong = outputs.logits
        width = labels.shape[1] - 1
        mask_k = targets != -100
        safe = targets.clamp(min=0)
        lam, chunk = trainer.mixing_lambda, trainer.args.mixing_chunk_size
        log_probs = mixed_token_logprobs(strong, self.weak.logits, safe, lam, chunk) * mask_k
        with torch.no_grad():
            strong_lp = -token_nll(strong, safe, chunk) * mask_k
            self.stats["strong_logps"] = _scatter_columns(strong_lp, keep, width).sum(1)
            entropy = token_entropy(strong, chunk) * mask_k
            mean_logits = strong.float().mean(-1) * mask_k
            is_top1 = (strong.argmax(-1) == targets) & mask_k
            log_sum_sq = None
            if trainer.use_weighting:
                log_sum_sq = _scatter_columns(
                    _mixed_log_sum_sq_probs(strong, self.weak.logits, lam, chunk) * mask_k, keep, width
                )
        return fused_lm_head_output(
            log_probs=_scatter_columns(log_probs, keep, width),
            entropy=_scatter_columns(entropy, keep, width),
            log_sum_sq_probs=log_sum_sq,
            mean_logits=_scatter_columns(mean_logits, keep, width),
            is_top1=_scatter_columns(is_top1.long(), keep, width).bool(),
            label_mask=labels[:, 1:] != -100,
            aux_loss=getattr(outputs, "aux_loss", None),
        )


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def _check_wmss_mode(args: WMSSDPOConfig, has_weak: bool, peft_policy: bool) -> None:
    """WMSS is on with a weak model, or with ``peft_base_as_weak`` and a PEFT policy; the options that need a weak
    model are refused without one (before anything loads)."""
    if args.peft_base_as_weak and has_weak:
        raise ValueError(
            "peft_base_as_weak=True and a weak model were both given: pass one. The weak model is either a checkpoint "
            "(`weak_model=` / `weak_model_name_or_path`) or the PEFT policy with its adapters disabled."
        )
    if args.peft_base_as_weak and not peft_policy:
        raise ValueError(
            "peft_base_as_weak=True needs a PEFT policy (a PeftModel, or a `peft_config`): its adapter-disabled base "
            "is then the weak model. Pass a peft_config, or give a weak checkpoint with `weak_model_name_or_path`."
        )
    needs = [
        n
        for n, on in (
            ("mixing_lambda < 1", args.mixing_lambda < 1.0),
            ("entropy_pair_weights", args.entropy_pair_weights),
        )
        if on
    ]
    if needs and not (has_weak or args.peft_base_as_weak):
        raise ValueError(
            f"{' and '.join(needs)} need(s) a weak model, and none was given. Pass `weak_model=` to the trainer or "
            "set `weak_model_name_or_path` (an earlier checkpoint of the model), or with a PEFT policy set "
            "peft_base_as_weak=True; or turn the option off (mixing_lambda=1.0, entropy_pair_weights=False) to train "
            "with TRL's DPOTrainer."
        )


def _check_prompt_learning(args: WMSSDPOConfig, model, peft_config) -> None:
    """PEFT prompt learning puts virtual tokens before the sequence: the WD-JT forward (``logits_to_keep`` as
    positions) and the pair weights (TRL's entropies) would then read shifted positions. Refused with those options."""
    options = [
        n
        for n, on in (
            ("mixing_lambda < 1", args.mixing_lambda < 1.0),
            ("entropy_pair_weights", args.entropy_pair_weights),
        )
        if on
    ]
    if peft_config is None and is_peft_model(model):
        peft_config = model.active_peft_config
    if options and peft_config is not None and peft_config.is_prompt_learning:
        raise ValueError(
            f"PEFT {type(peft_config).__name__} (prompt learning) is not supported with {' and '.join(options)}: the "
            "virtual tokens shift every position those options read. Use an adapter that keeps the sequence (e.g. "
            "peft.LoraConfig), or turn the option off (mixing_lambda=1.0, entropy_pair_weights=False)."
        )


def _require_pairs(dataset, name: str) -> None:
    require_rows(
        dataset,
        f"the {name} dataset",
        ". Pass a dataset with at least one preference pair (prompt, chosen, "
        "rejected); check the split name and any filter applied before the trainer.",
    )


def _report_truncation_drops(rows_before: int, rows_after: int, args, name: str) -> None:
    """TRL drops the examples whose prompt alone fills ``max_length`` (``keep_start``): say so, and refuse when none
    is left (TRL would fail later with "num_samples should be a positive integer")."""
    dropped = rows_before - rows_after
    if dropped == 0:
        return
    what = (
        f"{name} dataset: {dropped} of {rows_before} examples were dropped because their prompt alone has at least "
        f"max_length={args.max_length} tokens, which leaves no completion token after truncation "
        f"(truncation_mode={args.truncation_mode!r})"
    )
    fix = "raise max_length, shorten the prompts, or set truncation_mode='keep_end' (keeps the end of each sequence)"
    if rows_after == 0:
        raise ValueError(f"{what}, so nothing is left to train on. To fix it, {fix}.")
    logger.warning("%s. To keep them, %s.", what, fix)


def _truncation_window(args) -> slice:
    """The tokens of prompt + completion that TRL's ``DataCollatorForPreference`` keeps."""
    if args.max_length is None:
        return slice(None)
    return slice(None, args.max_length) if args.truncation_mode == "keep_start" else slice(-args.max_length, None)


def _identical_pair(example, window: slice) -> bool:
    """Chosen and rejected give the model the same tokens and the same completion mask after truncation."""
    prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    if chosen == rejected:
        return True
    n = len(prompt)
    return (prompt + chosen)[window] == (prompt + rejected)[window] and (
        ([0] * n + [1] * len(chosen))[window] == ([0] * n + [1] * len(rejected))[window]
    )


# ----------------------------------------------------------------------------------------------------------------
# The trainer


class WMSSDPOTrainer(CompleteCheckpointResume, WMSSModelCard, DPOTrainer):
    """[`~trl.DPOTrainer`] whose reference model is the weak checkpoint, with optional WD-JT and entropy-gap weights.

    Args:
        model, ref_model, args, ...: as [`~trl.DPOTrainer`]. `ref_model`, if given, is the weak model.
        weak_model (`PreTrainedModel` or `str`, *optional*):
            The weak model or its local folder; overrides `args.weak_model_name_or_path`. With a PEFT policy and
            `args.peft_base_as_weak=True`, the same network with adapters disabled is the weak model (no second copy).

    With no weak model and `peft_base_as_weak=False`, WMSS is inactive and this is TRL's `DPOTrainer` exactly (its
    default reference, losses, metrics and input checks); `mixing_lambda < 1` and `entropy_pair_weights` are then
    refused. Every TRL `loss_type` works (the sorting `aot` losses not with `entropy_pair_weights`), and so does
    `precompute_ref_log_probs` (the weak log-probs are then cached; WD-JT and pair weights still run a weak forward
    per batch, for the logits and entropies).
    """

    _wmss_name = "WMSS-DPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args: WMSSDPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        weak_model=None,
    ):
        args = as_wmss_config(args, WMSSDPOConfig, model, "DPO")
        if ref_model is not None:
            if weak_model is not None and weak_model is not ref_model:
                raise ValueError("pass the weak model once: as `weak_model=` (or `ref_model=`, which means the same).")
            weak_model = ref_model
        require_safetensors(model, "policy")
        require_safetensors(weak_model if weak_model is not None else args.weak_model_name_or_path, "weak model")
        has_weak = weak_model is not None or bool(args.weak_model_name_or_path)
        _check_wmss_mode(args, has_weak, peft_policy=is_peft_model(model) or peft_config is not None)
        _check_prompt_learning(args, model, peft_config)
        if train_dataset is not None:  # None and wrong types: TRL's own messages
            _require_pairs(train_dataset, "train")
        check_dataset_columns(train_dataset, "dpo", name="train_dataset")  # before any model loads
        check_dataset_columns(eval_dataset, "dpo", name="eval_dataset")
        self.wmss_enabled = has_weak or args.peft_base_as_weak
        self.identical_pairs_dropped: dict[str, int] = {}

        weak, weak_path = None, None
        if has_weak:
            weak, weak_path = resolve_weak_model(
                weak_model, args.weak_model_name_or_path, args.weak_model_init_kwargs, model
            )
            freeze(weak)
            if processing_class is not None:  # before the policy loads
                check_weak_compatible(model, weak, processing_class, weak_path)
            else:  # once TRL has loaded its processing class, before the first weak forward (precompute or training)
                self._weak_to_check = (weak, weak_path)

        super().__init__(
            model,
            ref_model=weak,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._check_weak_once()

        self.weak_model = self.ref_model if has_weak else None  # None: the PEFT policy with adapters disabled, or off
        if args.peft_base_as_weak:
            self._drop_ref_adapter()
        elif not has_weak and self.accelerator.is_main_process:
            logger.warning(
                "WMSS inactive: no weak model given, so this is TRL's DPOTrainer. Pass weak_model= or "
                "weak_model_name_or_path (or peft_base_as_weak=True with PEFT) to enable it."
            )
        self.mixing_lambda = args.mixing_lambda
        self._wmss_active = args.mixing_lambda < 1.0 or args.entropy_pair_weights
        if args.entropy_pair_weights and args.mixing_lambda == 1.0 and self.ref_model is not None:
            # The weak forward reads its entropy from TRL's fused LM head: add it to the outputs (outermost patch)
            add_fused_lm_head(getattr(self.ref_model, "module", self.ref_model), outputs=("log_probs", "entropy"))

    def _check_weak_once(self):
        """Vocabulary and tokenizer of the weak model against the policy and the processing class TRL loaded."""
        pending = self.__dict__.pop("_weak_to_check", None)
        if pending is not None:
            weak, weak_path = pending
            check_weak_compatible(self.model, weak, self.processing_class, weak_path)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._check_weak_once()  # TRL's precompute is the first weak forward
        if self.args.peft_base_as_weak:
            self._drop_ref_adapter()  # TRL's __init__ precomputes before it returns: the reference is the base
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _drop_ref_adapter(self):
        """Reference = adapters disabled: remove the frozen copy of the adapter ("ref") that TRL adds to a PeftModel
        (TRL then disables the adapters for the reference), and re-key TRL's precompute cache to the model without it,
        so a cache of log-probs against that copy is not reused."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if "ref" in unwrapped.peft_config:
            unwrapped.delete_adapter("ref")
            if self.args.precompute_ref_log_probs:
                self._precompute_model_hash = hash_module(self.model)

    # -- data ------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        _require_pairs(dataset, dataset_name)
        rows_before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if rows_before is not None:
            _report_truncation_drops(rows_before, len(dataset), args, dataset_name)
        return self._handle_identical_pairs(dataset, args, dataset_name)

    def _handle_identical_pairs(self, dataset, args, dataset_name):
        """Pairs whose chosen and rejected are the same token sequence as the model sees it (after TRL's tokenisation
        and the collator's truncation) give DPO no signal, their loss is constant. WMSS active: raise, or drop and
        count (``drop_identical_pairs``). Inactive: kept as TRL keeps them, with a warning (dropped if asked)."""
        names = getattr(dataset, "column_names", None) or []
        if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(names):
            return dataset
        drop, raise_ = args.drop_identical_pairs, self.wmss_enabled and not args.drop_identical_pairs
        window = _truncation_window(args)
        if isinstance(dataset, IterableDataset):
            if drop:
                logger.warning(
                    "%s dataset: pairs identical after truncation are dropped on the fly (not counted).", dataset_name
                )
                return dataset.filter(lambda ex: not _identical_pair(ex, window))
            if not raise_:
                return dataset

            def check(ex):
                if _identical_pair(ex, window):
                    raise ValueError(
                        f"{dataset_name} dataset: a pair has the same chosen and rejected tokens after truncation "
                        f"(max_length={args.max_length}, truncation_mode={args.truncation_mode!r}); it carries no "
                        "preference. Fix the data or raise max_length, or set drop_identical_pairs=True to drop such "
                        "pairs."
                    )
                return ex

            return dataset.map(check)
        columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        same, by_truncation = [], 0
        for i, ex in enumerate(columns):
            if _identical_pair(ex, window):
                same.append(i)
                by_truncation += ex["chosen_ids"] != ex["rejected_ids"]
        self.identical_pairs_dropped[dataset_name] = 0
        if not same:
            return dataset
        what = (
            f"{len(same)} of {len(dataset)} pairs have the same chosen and rejected tokens (rows {same[:5]} of the "
            f"tokenized dataset): {len(same) - by_truncation} have chosen == rejected, {by_truncation} became "
            f"identical only after truncation to max_length={args.max_length} "
            f"(truncation_mode={args.truncation_mode!r})"
        )
        fix = "fix the data" + (", raise max_length or use truncation_mode='keep_end'" if by_truncation else "")
        if raise_:
            raise ValueError(
                f"{dataset_name} dataset: {what}; they carry no preference. Either {fix}, or set "
                "drop_identical_pairs=True to drop them."
            )
        if not drop:
            logger.warning(
                "%s dataset: %s. They are kept, as TRL does (their loss is constant); set "
                "drop_identical_pairs=True to drop them.",
                dataset_name,
                what,
            )
            return dataset
        if len(same) == len(dataset):
            raise ValueError(
                f"{dataset_name} dataset: every pair has the same chosen and rejected tokens ({what}); "
                f"nothing to train on. To train, {fix}."
            )
        logger.warning("%s dataset: dropped %s.", dataset_name, what)
        self.identical_pairs_dropped[dataset_name] = len(same)
        drop_set = set(same)
        return dataset.select([i for i in range(len(dataset)) if i not in drop_set])

    # -- loss ------------------------------------------------------------------------------------------------------

    def _weak_forward(self, model_kwargs: dict, labels: torch.Tensor) -> _WeakOutputs:
        """One no-grad forward of the weak model on the [chosen; rejected] batch: full logits at the completion
        positions with WD-JT, else TRL's fused log-probs and entropies."""
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            weak_forward_context(self.ref_model, self.model) as weak,
        ):
            if self.mixing_lambda < 1.0:
                keep, targets = trained_positions(labels)
                logits = weak(**model_kwargs, logits_to_keep=keep).logits
                mask = targets != -100
                chunk = self.args.mixing_chunk_size
                width = labels.shape[1] - 1
                per_token = _scatter_columns(-token_nll(logits, targets.clamp(min=0), chunk) * mask, keep, width)
                entropy = None
                if self.args.entropy_pair_weights:
                    entropy = _scatter_columns(token_entropy(logits, chunk) * mask, keep, width)
                return _WeakOutputs(per_token, entropy, logits, keep)
            out = weak(**model_kwargs, labels=labels, fused_lm_head=True)
            if self.args.entropy_pair_weights and out.entropy is None:
                raise RuntimeError("internal error: the weak model's fused LM head does not return entropies.")
            seq_len = labels.shape[1] - 1
            entropy = None if out.entropy is None else out.entropy[:, -seq_len:]
            return _WeakOutputs(out.log_probs[:, -seq_len:], entropy, None, None)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._wmss_active:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        weak = self._weak_forward(model_kwargs, labels)

        inputs = dict(inputs)
        if not self.precompute_ref_logps:
            ref = sequence_logps(weak.per_token_logps, shift_mask, self.ld_alpha)
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref.chunk(2, dim=0)
        policy = _WMSSPolicy(model, self, weak, shift_mask)
        # Hand the weak log-probs to DPOTrainer through its own precomputed-reference input path (no second forward)
        with dpo_reference_from_inputs(self):
            result = super()._compute_loss(policy, inputs, return_outputs)
        self._log_wmss_metrics(mode, weak, policy, shift_mask)
        return result

    @torch.no_grad()
    def _log_wmss_metrics(self, mode, weak: _WeakOutputs, policy: _WMSSPolicy, shift_mask):
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        weak_chosen, weak_rejected = sequence_logps(weak.per_token_logps.float(), shift_mask).chunk(2, dim=0)
        metrics["wmss/weak_logps/chosen"].append(gather(weak_chosen).mean().item())
        metrics["wmss/weak_logps/rejected"].append(gather(weak_rejected).mean().item())
        if "strong_logps" in policy.stats:
            strong_chosen, strong_rejected = policy.stats["strong_logps"].chunk(2, dim=0)
            metrics["wmss/strong_logps/chosen"].append(gather(strong_chosen).mean().item())
            metrics["wmss/strong_logps/rejected"].append(gather(strong_rejected).mean().item())
        if "weights" in policy.stats:
            w = gather(policy.stats["weights"])
            h_weak, h_strong = gather(policy.stats["h_weak"]), gather(policy.stats["h_strong"])
            metrics["wmss/weak_entropy/rejected"].append(h_weak.mean().item())
            metrics["wmss/strong_entropy/rejected"].append(h_strong.mean().item())
            metrics["wmss/entropy_gap/rejected"].append((h_strong - h_weak).mean().item())
            metrics["wmss/pair_weight/min"].append(w.min().item())
            metrics["wmss/pair_weight/max"].append(w.max().item())
            metrics["wmss/pair_weight/std"].append(w.std(unbiased=False).item())
