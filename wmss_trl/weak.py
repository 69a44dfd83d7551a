"""The one place where the weak model is loaded, checked and prepared.

Every wmss_trl trainer gets its weak model through :func:`resolve_weak_model` (what to use) and
:func:`prepare_weak_model` (how to freeze and shard it), so SFT, GRPO and DPO treat it identically:

* a loaded model, or a local path loaded with safetensors and ``trust_remote_code=False`` unless asked;
* or, when the policy is a PEFT model and no weak model is given, the same network with its adapters
  disabled (no second copy of the weights; see :func:`weak_forward_context`);
* checked against the strong model: same vocabulary, same tokenizer (:func:`check_weak_compatible`);
* frozen: eval mode, dropout off, ``requires_grad=False``, never handed to the optimizer;
* prepared like TRL's reference model: ``prepare_deepspeed`` under DeepSpeed (sharded under ZeRO-3,
  replicated stage 0 otherwise), ``accelerator.prepare_model(evaluation_mode=True)`` otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any

import torch
from transformers import PreTrainedModel
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model

from .vocab import (
    describe_model,
    embedding_rows,
    find_tokenizer,
    is_peft_model,
    special_ids,
    tokenizer_differences,
    vocab_size_of,
)


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
        raise ValueError(
            f"weak_model_init_kwargs must be a dict or a JSON object string, got {type(kwargs).__name__}."
        )
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
    pickles = sorted(
        n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")) and not n.startswith("training_args")
    )
    if pickles:
        raise ValueError(
            f"the {role} checkpoint {str(path)!r} has pickle weights only ({', '.join(pickles)}); wmss_trl loads "
            "safetensors only, so that loading a checkpoint never runs pickled code. If you trust the file, convert "
            "it once: `AutoModelForCausalLM.from_pretrained(path, use_safetensors=False).save_pretrained(path)` "
            "(writes model.safetensors), then run again."
        )


def weak_folder(weak_model, weak_model_name_or_path: str | None) -> str | None:
    """The checkpoint folder of a separate weak model: ``weak_model`` when it is a path, the folder a ``weak_model``
    object was loaded from (``name_or_path``), else ``weak_model_name_or_path``."""
    if weak_model is None:
        return weak_model_name_or_path
    if isinstance(weak_model, (str, os.PathLike)):
        return str(weak_model)
    return getattr(weak_model, "name_or_path", None)


def weak_dtype(weak_model, init_kwargs: dict | str | None) -> str:
    """The dtype the weak model has (a model object) or would be loaded in by :func:`load_weak_model` (TRL's
    ``create_model_from_path``: ``init_kwargs["dtype"]``, default ``float32``), as a string (``"auto"`` included)."""
    dtype = getattr(weak_model, "dtype", None) or parse_init_kwargs(init_kwargs).get("dtype", "float32")
    return str(dtype).removeprefix("torch.")


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


def check_weak_compatible(strong_model, weak_model, tokenizer=None, weak_tokenizer_path: str | None = None) -> None:
    """Raise ValueError when the weak model cannot be mixed with / compared to the strong one.

    Logit mixing and KL need the same vocabulary, position for position. Each model may be loaded or a path. Checked
    once per call (a 150k-token vocabulary takes about a second: loading the weak tokenizer and reading both vocabs):

    1. the same ``vocab_size`` in both configs, and the same number of rows in the input and output embeddings;
    2. the tokenizers, when both are known: the strong side's is ``tokenizer`` (the trainer's processing class) or,
       when None, the one saved where the strong model comes from; the weak side's is the one in
       ``weak_tokenizer_path`` or where the weak model comes from (``config._name_or_path``, a local folder). They
       must have the same token -> id map, the same added tokens and the same bos/unk/sep/cls/mask ids;
    3. when either tokenizer cannot be found, the special token ids of the two configs (bos/eos/pad/sep/decoder
       start, where both set them) instead, with a warning (main process, once per message) that the tokenizers
       could not be compared, since a permuted vocabulary passes 1 and 3.
    """
    names = describe_model(strong_model), describe_model(weak_model)
    vocab_size = _check_vocab_size(strong_model, weak_model, names)
    rows_s, rows_w = embedding_rows(strong_model), embedding_rows(weak_model)
    problems = [
        f"the {name} embeddings have {rows_s[name]} rows in the strong model, {rows_w[name]} in the weak one"
        for name in rows_s.keys() & rows_w.keys()
        if rows_s[name] != rows_w[name]
    ]
    if tokenizer is not None:
        strong = tokenizer, "the tokenizer passed in (processing_class / tokenizer)"
    else:
        strong = find_tokenizer(strong_model)
    weak = find_tokenizer(weak_model, weak_tokenizer_path)
    compared = strong[0] is not None and weak[0] is not None
    if compared:
        problems += tokenizer_differences(strong[0], weak[0])
        fix = (
            f"if you know the token ids of both are the same, copy the strong model's tokenizer into the weak model's "
            f"folder ({weak[1].removeprefix('from ')})"
        )
    else:
        ids_s, ids_w = special_ids(strong_model), special_ids(weak_model)
        problems += [
            f"different {key} in the configs ({list(ids_s[key])} in the strong model, {list(ids_w[key])} in the weak)"
            for key in sorted(ids_s.keys() & ids_w.keys())
            if ids_s[key] != ids_w[key]
        ]
        fix = "if the weak model does use the strong model's tokenizer, save that tokenizer with it, pass its folder"
    if problems:
        sources = f"weak tokenizer {weak[1]}, strong tokenizer {strong[1]}" if compared else "tokenizers not found"
        raise ValueError(
            f"the weak model ({names[1]}) and the strong model ({names[0]}) do not share a tokenizer ({sources}): "
            f"{'; '.join(problems)}. WMSS mixes logits token by token, so the weak model must use the strong model's "
            f"tokenizer: pass an earlier checkpoint of the strong model (trained with its tokenizer) as the weak "
            f"model; {fix}."
        )
    if not compared and os.environ.get("RANK", "0") == "0":
        _warn_tokenizers_not_compared(strong, weak, names, vocab_size)


def _check_vocab_size(strong_model, weak_model, names: tuple[str, str]) -> int:
    """The common ``vocab_size`` of the two configs; ValueError naming both models when they differ."""
    v_strong, v_weak = vocab_size_of(strong_model), vocab_size_of(weak_model)
    if v_strong != v_weak:
        raise ValueError(
            f"weak and strong models have different vocabularies: strong vocab_size={v_strong}, weak "
            f"vocab_size={v_weak}. WMSS mixes logits token by token, so the weak model must be an earlier "
            "checkpoint of the same model (same tokenizer). Pass a weak checkpoint trained with the strong model's "
            f"tokenizer (weak model: {names[1]}; strong model: {names[0]})."
        )
    return v_strong


def _warn_tokenizers_not_compared(strong: tuple, weak: tuple, names: tuple[str, str], vocab_size: int) -> None:
    """The warning of :func:`check_weak_compatible` when a tokenizer was not found: ``strong`` / ``weak`` are
    ``(tokenizer or None, where it was looked for)``, ``names`` the two models' descriptions (strong, weak)."""
    missing = []
    if weak[0] is None:
        missing.append(
            f"none for the weak model ({weak[1]}): pass it as a path to a folder that holds its tokenizer "
            "(weak_model='folder' or weak_model_name_or_path), or save its tokenizer into the folder it was "
            "loaded from"
        )
    if strong[0] is None:
        missing.append(
            f"none for the strong model ({strong[1]}): pass its tokenizer (processing_class / tokenizer) or save "
            "it with the model"
        )
    warnings.warn(
        f"could not compare the tokenizers of the weak model ({names[1]}) and the strong model ({names[0]}): "
        f"{'; and '.join(missing)}. Only the vocabulary size ({vocab_size}), the special token ids of the configs "
        "and the embedding rows were compared, and these do not detect a vocabulary with its tokens permuted.",
        UserWarning,
        stacklevel=3,
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
            "(a local checkpoint folder of an earlier version of the model), or, with a PEFT model, set "
            "`peft_base_as_weak=True` to use its adapter-disabled base as the weak model."
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
