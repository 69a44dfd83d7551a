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


# Files that make a folder a tokenizer folder (a fast tokenizer, or a slow one's config / vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Special-token roles compared between two tokenizers. eos and pad are not: they are chosen per run (TRL's `eos_token`
# and `pad_token` settings, pad := eos when unset, change the strong tokenizer at construction) and the strong
# tokenizer's are then used for both models; their tokens' ids are still compared through the vocabulary.
TOKENIZER_ROLES = ("bos", "unk", "sep", "cls", "mask")
# Special-token ids compared between two model configs when a tokenizer cannot be found (configs are not changed at
# construction: transformers aligns them with the tokenizer in `train()`).
CONFIG_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")


def _unwrap(model):
    """The ``PreTrainedModel`` inside DDP / DeepSpeed wrappers and PEFT."""
    model = getattr(model, "module", model)
    return model.get_base_model() if is_peft_model(model) else model


def _text_config(model):
    """The text config of a loaded model, or of a local folder / hub id (``config.json`` only, no remote code)."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(model, trust_remote_code=False).get_text_config()
        except OSError as e:
            raise FileNotFoundError(
                f"could not read the config of {str(model)!r}: {e}. Pass a local checkpoint folder (config.json + "
                "model.safetensors) or a reachable hub id."
            ) from e
    return _unwrap(model).config.get_text_config()


def vocab_size_of(model) -> int:
    """Vocabulary size of a causal LM's output layer (config-based, so it works on ZeRO-3 shards).

    ``model`` may also be a local checkpoint folder or a hub id (only its ``config.json`` is read, without remote
    code), so a trainer can check a model it has not loaded yet.
    """
    return int(_text_config(model).vocab_size)


def _source_of(model) -> str:
    """Where a model comes from: its path, or the folder / hub id it was loaded from (``config._name_or_path``)."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(_unwrap(model).config, "_name_or_path", "") or "")


def _describe(model) -> str:
    source = _source_of(model)
    return source if source else f"an in-memory {type(_unwrap(model)).__name__} with no _name_or_path"


def _find_tokenizer(model, path=None):
    """The tokenizer saved with a model: in ``path`` if given, else where the model comes from (a local folder).

    Returns ``(tokenizer, "from <folder>")``, or ``(None, why)`` when no local folder with tokenizer files
    (:data:`TOKENIZER_FILES`) holds a loadable tokenizer.
    """
    from transformers import AutoTokenizer

    tried = []
    for folder in dict.fromkeys(str(p) for p in (path, _source_of(model)) if p):
        if not os.path.isdir(folder):
            tried.append(f"{folder!r} is not a local folder")
        elif not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
            tried.append(f"{folder!r} has no tokenizer files")
        else:
            try:
                return AutoTokenizer.from_pretrained(folder), f"from {folder}"
            except Exception as e:  # noqa: BLE001 - any failure means: not comparable, said in the warning
                tried.append(f"the tokenizer in {folder!r} could not be loaded ({type(e).__name__}: {e})")
    return None, "; ".join(tried) or "the model was not loaded from a folder (no config._name_or_path)"


def _tokenizer_differences(strong_tok, weak_tok) -> list[str]:
    """What differs between two tokenizers: the token -> id map (added tokens included), the added tokens (content,
    special flag) and the ids of the :data:`TOKENIZER_ROLES` special tokens set in both. Empty when they agree."""
    from transformers import ProcessorMixin

    strong_tok, weak_tok = (t.tokenizer if isinstance(t, ProcessorMixin) else t for t in (strong_tok, weak_tok))
    problems = []
    v_s, v_w = strong_tok.get_vocab(), weak_tok.get_vocab()
    if v_s != v_w:
        moved = [t for t in v_s.keys() & v_w.keys() if v_s[t] != v_w[t]]
        detail = [f"{len(moved)} of {len(v_s)} tokens have another id"] if moved else []
        if moved:
            t = min(moved, key=v_s.get)
            detail[0] += f" (e.g. {t!r}: {v_s[t]} in the strong tokenizer, {v_w[t]} in the weak one)"
        only_s, only_w = len(v_s.keys() - v_w.keys()), len(v_w.keys() - v_s.keys())
        detail += [f"{only_s} tokens are only in the strong tokenizer"] if only_s else []
        detail += [f"{only_w} tokens are only in the weak tokenizer"] if only_w else []
        problems.append("different token -> id maps: " + ", ".join(detail))
    added_s = {i: (t.content, t.special) for i, t in strong_tok.added_tokens_decoder.items()}
    added_w = {i: (t.content, t.special) for i, t in weak_tok.added_tokens_decoder.items()}
    if added_s != added_w:
        ids = sorted(i for i in added_s.keys() | added_w.keys() if added_s.get(i) != added_w.get(i))
        shown = ", ".join(f"id {i}: {added_s.get(i)} vs {added_w.get(i)}" for i in ids[:3])
        problems.append(f"different added tokens (content, special) at {len(ids)} ids ({shown})")
    for role in TOKENIZER_ROLES:
        id_s, id_w = getattr(strong_tok, f"{role}_token_id", None), getattr(weak_tok, f"{role}_token_id", None)
        if id_s is not None and id_w is not None and id_s != id_w:
            problems.append(f"different {role}_token ids ({id_s} in the strong tokenizer, {id_w} in the weak one)")
    return problems


def _special_ids(model) -> dict[str, tuple[int, ...]]:
    """The :data:`CONFIG_SPECIAL_IDS` a model config sets (a list of eos ids as a sorted tuple)."""
    cfg, ids = _text_config(model), {}
    for key in CONFIG_SPECIAL_IDS:
        value = getattr(cfg, key, None)
        if value is not None:
            ids[key] = tuple(sorted(value)) if isinstance(value, (list, tuple)) else (int(value),)
    return ids


def _embedding_rows(model) -> dict[str, int]:
    """Rows (vocabulary entries) of the input and output embedding matrices of a loaded model; ``{}`` for a path.

    Under ZeRO-3 a weight is a shard that keeps its full shape in ``ds_shape``. The hidden size may differ between the
    weak and the strong model: only the vocabulary dimension is compared.
    """
    if isinstance(model, (str, os.PathLike)):
        return {}
    base, rows = _unwrap(model), {}
    for name, get in (("input", base.get_input_embeddings), ("output", base.get_output_embeddings)):
        try:
            weight = getattr(get(), "weight", None)
        except (AttributeError, NotImplementedError):
            weight = None
        if weight is not None:
            rows[name] = int((getattr(weight, "ds_shape", None) or weight.shape)[0])
    return rows


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
    strong_name, weak_name = _describe(strong_model), _describe(weak_model)
    v_strong, v_weak = vocab_size_of(strong_model), vocab_size_of(weak_model)
    if v_strong != v_weak:
        raise ValueError(
            f"weak and strong models have different vocabularies: strong vocab_size={v_strong}, weak "
            f"vocab_size={v_weak}. WMSS mixes logits token by token, so the weak model must be an earlier "
            "checkpoint of the same model (same tokenizer). Pass a weak checkpoint trained with the strong model's "
            f"tokenizer (weak model: {weak_name}; strong model: {strong_name})."
        )
    rows_s, rows_w = _embedding_rows(strong_model), _embedding_rows(weak_model)
    problems = [
        f"the {name} embeddings have {rows_s[name]} rows in the strong model, {rows_w[name]} in the weak one"
        for name in rows_s.keys() & rows_w.keys()
        if rows_s[name] != rows_w[name]
    ]
    if tokenizer is not None:
        strong_tok, strong_src = tokenizer, "the tokenizer passed in (processing_class / tokenizer)"
    else:
        strong_tok, strong_src = _find_tokenizer(strong_model)
    weak_tok, weak_src = _find_tokenizer(weak_model, weak_tokenizer_path)
    compared = strong_tok is not None and weak_tok is not None
    if compared:
        problems += _tokenizer_differences(strong_tok, weak_tok)
        fix = (
            f"if you know the token ids of both are the same, copy the strong model's tokenizer into the weak model's "
            f"folder ({weak_src.removeprefix('from ')})"
        )
    else:
        ids_s, ids_w = _special_ids(strong_model), _special_ids(weak_model)
        problems += [
            f"different {key} in the configs ({list(ids_s[key])} in the strong model, {list(ids_w[key])} in the weak)"
            for key in sorted(ids_s.keys() & ids_w.keys())
            if ids_s[key] != ids_w[key]
        ]
        fix = "if the weak model does use the strong model's tokenizer, save that tokenizer with it, pass its folder"
    if problems:
        sources = f"weak tokenizer {weak_src}, strong tokenizer {strong_src}" if compared else "tokenizers not found"
        raise ValueError(
            f"the weak model ({weak_name}) and the strong model ({strong_name}) do not share a tokenizer ({sources}): "
            f"{'; '.join(problems)}. WMSS mixes logits token by token, so the weak model must use the strong model's "
            f"tokenizer: pass an earlier checkpoint of the strong model (trained with its tokenizer) as the weak "
            f"model; {fix}."
        )
    if not compared and os.environ.get("RANK", "0") == "0":
        missing = []
        if weak_tok is None:
            missing.append(
                f"none for the weak model ({weak_src}): pass it as a path to a folder that holds its tokenizer "
                "(weak_model='folder' or weak_model_name_or_path), or save its tokenizer into the folder it was "
                "loaded from"
            )
        if strong_tok is None:
            missing.append(
                f"none for the strong model ({strong_src}): pass its tokenizer (processing_class / tokenizer) or save "
                "it with the model"
            )
        warnings.warn(
            f"could not compare the tokenizers of the weak model ({weak_name}) and the strong model ({strong_name}): "
            f"{'; and '.join(missing)}. Only the vocabulary size ({v_strong}), the special token ids of the configs "
            "and the embedding rows were compared, and these do not detect a vocabulary with its tokens permuted.",
            UserWarning,
            stacklevel=2,
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
