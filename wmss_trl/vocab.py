"""A model's vocabulary and tokenizer, and what differs between two of them (for :func:`wmss_trl.weak.check_weak_compatible`).

Each function takes a loaded model (looking through DDP / DeepSpeed wrappers and PEFT) or, where it says so, a local
folder / hub id, of which only ``config.json`` and the tokenizer files are read (no remote code).
"""

from __future__ import annotations

import os


try:
    from peft import PeftModel
except ImportError:  # pragma: no cover - peft is a hard dependency, kept optional for readers
    PeftModel = None


def is_peft_model(model) -> bool:
    return PeftModel is not None and isinstance(model, PeftModel)


# Files that make a folder a tokenizer folder (a fast tokenizer, or a slow one's config / vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Special-token roles compared between two tokenizers. eos and pad are not: they are chosen per run (TRL's `eos_token`
# and `pad_token` settings, pad := eos when unset, change the strong tokenizer at construction) and the strong
# tokenizer's are then used for both models; their tokens' ids are still compared through the vocabulary.
TOKENIZER_ROLES = ("bos", "unk", "sep", "cls", "mask")
# Special-token ids compared between two model configs when a tokenizer cannot be found (configs are not changed at
# construction: transformers aligns them with the tokenizer in `train()`).
CONFIG_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")


def unwrap_model(model):
    """The ``PreTrainedModel`` inside DDP / DeepSpeed wrappers and PEFT."""
    model = getattr(model, "module", model)
    return model.get_base_model() if is_peft_model(model) else model


def text_config(model):
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
    return unwrap_model(model).config.get_text_config()


def vocab_size_of(model) -> int:
    """Vocabulary size of a causal LM's output layer (config-based, so it works on ZeRO-3 shards).

    ``model`` may also be a local checkpoint folder or a hub id (only its ``config.json`` is read, without remote
    code), so a trainer can check a model it has not loaded yet.
    """
    return int(text_config(model).vocab_size)


def model_source(model) -> str:
    """Where a model comes from: its path, or the folder / hub id it was loaded from (``config._name_or_path``)."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(unwrap_model(model).config, "_name_or_path", "") or "")


def describe_model(model) -> str:
    source = model_source(model)
    return source if source else f"an in-memory {type(unwrap_model(model)).__name__} with no _name_or_path"


def find_tokenizer(model, path=None):
    """The tokenizer saved with a model: in ``path`` if given, else where the model comes from (a local folder).

    Returns ``(tokenizer, "from <folder>")``, or ``(None, why)`` when no local folder with tokenizer files
    (:data:`TOKENIZER_FILES`) holds a loadable tokenizer.
    """
    from transformers import AutoTokenizer

    tried = []
    for folder in dict.fromkeys(str(p) for p in (path, model_source(model)) if p):
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


def tokenizer_differences(strong_tok, weak_tok) -> list[str]:
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


def special_ids(model) -> dict[str, tuple[int, ...]]:
    """The :data:`CONFIG_SPECIAL_IDS` a model config sets (a list of eos ids as a sorted tuple)."""
    cfg, ids = text_config(model), {}
    for key in CONFIG_SPECIAL_IDS:
        value = getattr(cfg, key, None)
        if value is not None:
            ids[key] = tuple(sorted(value)) if isinstance(value, (list, tuple)) else (int(value),)
    return ids


def embedding_rows(model) -> dict[str, int]:
    """Rows (vocabulary entries) of the input and output embedding matrices of a loaded model; ``{}`` for a path.

    Under ZeRO-3 a weight is a shard that keeps its full shape in ``ds_shape``. The hidden size may differ between the
    weak and the strong model: only the vocabulary dimension is compared.
    """
    if isinstance(model, (str, os.PathLike)):
        return {}
    base, rows = unwrap_model(model), {}
    for name, get in (("input", base.get_input_embeddings), ("output", base.get_output_embeddings)):
        try:
            weight = getattr(get(), "weight", None)
        except (AttributeError, NotImplementedError):
            weight = None
        if weight is not None:
            rows[name] = int((getattr(weight, "ds_shape", None) or weight.shape)[0])
    return rows
