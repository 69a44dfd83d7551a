"""The one place where the weak model is loaded, checked and prepared.

Every wmss_trl trainer gets its weak model through :func:`resolve_weak_model` (what to use) and
:func:`prepare_weak_model` (how to freeze and shard it), so SFT, GRPO and DPO treat it identically:

* a loaded model, or a local path loaded with safetensors and ``trust_remote_code=False`` unless asked;
* or, when the policy is a PEFT model and no weak model is given, the same network with its adapters
  disabled (no second copy of the weights; see :func:`weak_forward_context`);
* frozen: eval mode, dropout off, ``requires_grad=False``, never handed to the optimizer;
* prepared like TRL's reference model: ``prepare_deepspeed`` under DeepSpeed (sharded under ZeRO-3,
  replicated stage 0 otherwise), ``accelerator.prepare_model(evaluation_mode=True)`` otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model

try:
    from peft import PeftModel
except ImportError:  # pragma: no cover - peft is a hard dependency, kept optional for readers
    PeftModel = None


def is_peft_model(model) -> bool:
    return PeftModel is not None and isinstance(model, PeftModel)


def parse_init_kwargs(kwargs: dict | str | None) -> dict[str, Any]:
    """``weak_model_init_kwargs`` may be a dict or a JSON string (like TRL's ``model_init_kwargs``)."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"weak_model_init_kwargs is not valid JSON: {kwargs!r} ({e}).") from e
    if not isinstance(kwargs, dict):
        raise ValueError(f"weak_model_init_kwargs must be a dict or a JSON object string, got {type(kwargs).__name__}.")
    return dict(kwargs)


def require_safetensors(path, role: str = "model") -> None:
    """Refuse a local checkpoint folder that has pickle weights only (``pytorch_model.bin``, ``*.pt``).

    The policy, everywhere a model is loaded (strong, weak, policy, ``wmss entropy --model``, the pipeline's base):
    weights are read from safetensors only, so loading a checkpoint never unpickles code. Anything that is not a
    local folder (a loaded model, a hub id) passes; a folder without any weights file passes too (``from_pretrained``
    then gives its own error).
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return
    names = os.listdir(path)
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return
    pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")) and not n.startswith("training_args"))
    if pickles:
        raise ValueError(
            f"the {role} checkpoint {str(path)!r} has pickle weights only ({', '.join(pickles)}); wmss_trl loads "
            "safetensors only, so that loading a checkpoint never runs pickled code. If you trust the file, convert "
            "it once: `AutoModelForCausalLM.from_pretrained(path, use_safetensors=False).save_pretrained(path)` "
            "(writes model.safetensors), then run again."
        )


def load_weak_model(path: str, init_kwargs: dict | str | None = None) -> PreTrainedModel:
    """Load the weak checkpoint from a local directory (safetensors only, no remote code unless asked).

    Call it after the training arguments exist, so that under ZeRO-3 ``from_pretrained`` runs in ``zero.Init``.
    """
    kwargs = parse_init_kwargs(init_kwargs)
    require_safetensors(path, "weak model")
    if not os.path.isdir(path):
        # "org/name" may be a hub id; anything else that is not a folder is a local path that does not exist
        looks_local = path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1
        if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(
                f"weak model path {path!r} does not exist or is not a directory. Pass the folder of a saved "
                "checkpoint (config.json + model.safetensors), e.g. the output_dir of an earlier SFT run."
            )
    kwargs.setdefault("trust_remote_code", False)
    kwargs.setdefault("use_safetensors", True)
    try:
        return create_model_from_path(path, **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load the weak model from {path!r}: {e}. It must be a local checkpoint folder with "
            "safetensors weights (or a reachable hub id)."
        ) from e


def vocab_size_of(model) -> int:
    """Vocabulary size of a causal LM's output layer (config-based, so it works on ZeRO-3 shards).

    ``model`` may also be a local checkpoint folder or a hub id (only its ``config.json`` is read, without remote
    code), so a trainer can check a model it has not loaded yet.
    """
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(model, trust_remote_code=False).get_text_config().vocab_size)
    base = model.get_base_model() if is_peft_model(model) else model
    base = getattr(base, "module", base)  # DDP / DeepSpeed wrappers
    return int(base.config.get_text_config().vocab_size)


def check_weak_compatible(strong_model, weak_model, tokenizer=None, weak_tokenizer_path: str | None = None) -> None:
    """Raise ValueError when the weak model cannot be mixed with / compared to the strong one.

    Logit mixing and KL need the same vocabulary, position for position: same output size, and, when the weak
    checkpoint ships its own tokenizer, the same token -> id map as the strong model's tokenizer.
    """
    v_strong, v_weak = vocab_size_of(strong_model), vocab_size_of(weak_model)
    if v_strong != v_weak:
        raise ValueError(
            f"weak and strong models have different vocabularies: strong vocab_size={v_strong}, weak "
            f"vocab_size={v_weak}. WMSS mixes logits token by token, so the weak model must be an earlier "
            "checkpoint of the same model (same tokenizer). Pass a weak checkpoint trained with the strong model's "
            "tokenizer."
        )
    if tokenizer is None or weak_tokenizer_path is None:
        return
    has_tok = any(
        os.path.exists(os.path.join(weak_tokenizer_path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    )
    if not has_tok:
        return
    from transformers import PreTrainedTokenizerFast

    try:  # the fast class keeps the saved tokenizer as is (AutoTokenizer may swap in a model-specific class)
        weak_tok = PreTrainedTokenizerFast.from_pretrained(weak_tokenizer_path)
    except Exception:  # noqa: BLE001 - fall back to the auto class for slow-only tokenizers
        weak_tok = AutoTokenizer.from_pretrained(weak_tokenizer_path, trust_remote_code=False)
    strong_tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    if strong_tok.get_vocab() != weak_tok.get_vocab():
        raise ValueError(
            f"the weak model's tokenizer ({weak_tokenizer_path}, {len(weak_tok)} tokens) differs from the strong "
            f"model's tokenizer ({len(strong_tok)} tokens). WMSS needs the same tokenizer for both models: use an "
            "earlier checkpoint of the same model, or copy the strong model's tokenizer into the weak folder if you "
            "know the ids match."
        )


def resolve_weak_model(weak_model, weak_model_name_or_path: str | None, init_kwargs, policy, required: bool = True):
    """Decide what the weak model is. Returns ``(model_or_None, path_or_None)``.

    Order: the ``weak_model`` argument (a model or a path), then the config path, then, for a PEFT policy, ``None``
    (meaning: the policy with adapters disabled). With none of these and ``required``, raise a clear error.
    """
    if isinstance(weak_model, str):
        weak_model_name_or_path, weak_model = weak_model, None
    if weak_model is not None:
        if weak_model is policy:
            raise ValueError("weak_model is the policy itself; pass an earlier checkpoint (or use PEFT adapters).")
        return weak_model, None
    if weak_model_name_or_path:
        return load_weak_model(weak_model_name_or_path, init_kwargs), weak_model_name_or_path
    if is_peft_model(policy):
        return None, None
    if required:
        raise ValueError(
            "no weak model: pass `weak_model=` to the trainer or set `weak_model_name_or_path` in the config "
            "(a local checkpoint folder of an earlier version of the model), or train a PEFT model, whose "
            "adapter-disabled base is then the weak model."
        )
    return None, None


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, dropout off, no gradients."""
    model.eval()
    disable_dropout_in_model(model)
    model.requires_grad_(False)
    return model


def prepare_weak_model(weak_model, accelerator, is_deepspeed_enabled: bool, fused_lm_head_kwargs: dict | None = None):
    """Freeze the weak model and place/shard it like TRL's reference model.

    ``fused_lm_head_kwargs`` (GRPO/DPO): patch it with TRL's fused LM head first, so TRL code that reads
    ``outputs.log_probs`` can use it as a reference model.
    """
    from trl.models import prepare_deepspeed

    freeze(weak_model)
    if fused_lm_head_kwargs is not None:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(weak_model, **fused_lm_head_kwargs)
    if is_deepspeed_enabled:
        return prepare_deepspeed(weak_model, accelerator)
    return accelerator.prepare_model(weak_model, evaluation_mode=True)


@contextlib.contextmanager
def weak_forward_context(weak_model, policy):
    """Context in which ``forward_model(...)`` runs the weak model, and that model.

    With a separate weak model this is just ``no_grad``; with the adapter-disabled PEFT base it also disables the
    policy's adapters, so the policy network computes the weak logits.
    """
    with torch.no_grad():
        if weak_model is not None:
            yield weak_model
        else:
            unwrapped = getattr(policy, "module", policy)
            with unwrapped.disable_adapter():
                yield policy


def backbone_of(model):
    """The transformer body of a causal LM (no LM head): ``model.base_model``, looking through PEFT."""
    if is_peft_model(model):
        model = model.base_model.model
    return model.base_model


def lm_head_of(model):
    """The output projection (LM head) of a causal LM, looking through PEFT."""
    if is_peft_model(model):
        model = model.get_base_model()
    return model.get_output_embeddings()


def is_zero3_partitioned(model) -> bool:
    """True when every parameter of ``model`` is a DeepSpeed ZeRO-3 shard."""
    params = list(model.parameters())
    return bool(params) and all(hasattr(p, "ds_id") for p in params)
