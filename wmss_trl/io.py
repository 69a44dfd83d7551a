"""Storage shared by every artefact wmss_trl writes: atomic JSON, fingerprints (provenance).

* :func:`write_json_atomic`: write to ``<path>.tmp``, fsync, ``os.replace``: a reader sees the old file or the new one.
* Fingerprints record what made an artefact, cheaply:

      model folder   config.json (sha256) + for every weight file: size, mtime_ns, sha256 of its safetensors
                     header (names, dtypes, shapes, metadata) and of 16 sampled 4 KiB blocks; never a full hash of GBs
      loaded model   dtype, parameter count and sha256 of a strided sample of every parameter (<= 4096 values each)
      dataset        number of rows, column names and sha256 of the rows as canonical JSON (so the same rows give the
                     same fingerprint however they were loaded); datasets' own ``_fingerprint`` is recorded as a hint

  :func:`check_provenance` compares the record stored with an artefact to the current one and refuses a mismatch
  with a :class:`ProvenanceError` naming every field that differs (old -> new) and how to start over.

Locks and processes that die with their parent are in :mod:`wmss_trl.locks`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

# scripts/saturation.py imports WriterLock from here; its measurement code is frozen for the experiment's rows (a
# changed line there refuses every stored row), so the name stays importable from this module
from .locks import WriterLock  # noqa: F401


WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------
def write_json_atomic(path, obj, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path`` via ``<path>.tmp`` + fsync + ``os.replace`` (never a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows) -> None:
    """Write ``rows`` as JSON lines to ``path`` via ``<path>.tmp`` + fsync + ``os.replace`` (never a half-written
    file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonable(obj):
    """``obj`` as it reads back from JSON (tuples -> lists, other types -> str): stored and fresh records compare."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------------
def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def safetensors_header_sha256(path) -> str:
    """sha256 of a safetensors file's header (8-byte length + JSON: tensor names, dtypes, shapes, offsets, meta)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (n,) = struct.unpack("<Q", head)
        return hashlib.sha256(head + f.read(n)).hexdigest()


def file_sample_sha256(path, blocks: int = 16, block_size: int = 4096) -> str:
    """sha256 of ``blocks`` blocks of ``block_size`` bytes at evenly spaced offsets of a file (the whole file when it
    is small): a cheap look at the values of a weight file of any size."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= blocks * block_size:
            h.update(f.read())
        else:
            for k in range(blocks):
                f.seek(k * (size - block_size) // (blocks - 1))
                h.update(f.read(block_size))
    return h.hexdigest()


def model_fingerprint(path) -> dict:
    """What identifies the weights of a checkpoint folder without reading them all: ``config.json``'s sha256, and per
    weight file its size, mtime_ns, safetensors header sha256 and a sampled sha256 of its bytes
    (:func:`file_sample_sha256`). Rewriting a weight file changes its mtime (and almost surely the sampled bytes)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a model checkpoint folder.")
    weights = {}
    for f in sorted(path.iterdir()):
        if not f.is_file() or not f.name.endswith(WEIGHT_SUFFIXES) or f.name.startswith("training_args"):
            continue
        st = f.stat()
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if f.name.endswith(".safetensors"):
            entry["header_sha256"] = safetensors_header_sha256(f)
            entry["sample_sha256"] = file_sample_sha256(f)
        elif f.name.endswith(".json"):
            entry["sha256"] = file_sha256(f)
        weights[f.name] = entry
    config = path / "config.json"
    if not weights and not config.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json or weight files; is it a model checkpoint folder?")
    return {"config_sha256": file_sha256(config) if config.is_file() else None, "weights": weights}


def path_fingerprint(path) -> dict:
    """A model folder (it has ``config.json``): :func:`model_fingerprint`; a file: its size and sha256; another folder
    (e.g. a ``save_to_disk`` dataset): size and sha256 of every file in it, by relative name."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return model_fingerprint(p)
    if p.is_file():
        return {"size": p.stat().st_size, "sha256": file_sha256(p)}
    if p.is_dir():
        return {
            str(f.relative_to(p)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(p.rglob("*"))
            if f.is_file()
        }
    raise FileNotFoundError(f"{str(path)!r} does not exist.")


def loaded_model_fingerprint(model, sample: int = 4096) -> dict:
    """What identifies a model in memory: dtype, parameter count and sha256 of a strided sample of every parameter
    (at most ``sample`` values per tensor, in fp32), in ``named_parameters`` order. Other weights or another dtype
    give another fingerprint; the same checkpoint loaded twice the same way gives the same one."""
    import torch

    base = getattr(model, "module", model)
    h = hashlib.sha256()
    count, dtypes = 0, set()
    with torch.no_grad():
        for name, p in base.named_parameters():
            flat = p.detach().reshape(-1)
            count += flat.numel()
            dtypes.add(str(p.dtype).removeprefix("torch."))
            step = max(1, flat.numel() // sample)
            values = flat[::step][:sample].to(device="cpu", dtype=torch.float32).contiguous()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(values.numpy().tobytes())
    return {"dtype": ",".join(sorted(dtypes)), "num_parameters": count, "weights_sample_sha256": h.hexdigest()}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what a tokenizer maps text to: its vocabulary, special tokens and chat template."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    return sha256_json(
        {
            "vocab": sorted(tok.get_vocab().items()),
            "special": tok.special_tokens_map,
            "chat_template": getattr(tok, "chat_template", None),
        }
    )


def dataset_fingerprint(dataset, batch_size: int = 1000) -> dict:
    """``{"num_rows", "columns", "rows_sha256"}`` of a ``datasets.Dataset``: sha256 of its rows as canonical JSON,
    batch by batch (independent of how it was loaded), plus datasets' ``_fingerprint`` as ``datasets_fingerprint``
    (a hint only: it changes when a file is touched, and is random after some transforms, so it is not compared)."""
    h = hashlib.sha256(json.dumps(sorted(dataset.column_names)).encode())
    for batch in dataset.iter(batch_size=batch_size):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return {
        "num_rows": len(dataset),
        "columns": sorted(dataset.column_names),
        "rows_sha256": h.hexdigest(),
        "datasets_fingerprint": getattr(dataset, "_fingerprint", None),
    }


NOT_COMPARED = ("datasets_fingerprint",)  # recorded for the reader's information, never a reason to refuse


def provenance_diff(old, new, prefix: str = "") -> list[str]:
    """Every leaf where two provenance records differ, as ``"key.sub: old -> new"`` (``NOT_COMPARED`` keys skipped)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if key in NOT_COMPARED:
                continue
            out += provenance_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    old, new = jsonable(old), jsonable(new)
    if old == new:
        return []

    def short(v):
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 80 else text[:77] + "..."

    return [f"{prefix.rstrip('.')}: {short(old)} -> {short(new)}"]


class ProvenanceError(ValueError):
    """A stored artefact was made by something else than what would make it now."""


def check_provenance(artefact: str, stored: dict, current: dict, start_over: str) -> None:
    """Raise :class:`ProvenanceError` when ``stored`` (the record kept with ``artefact``) differs from ``current``; the
    message lists every differing field (stored -> now) and ``start_over`` (which file/folder to delete)."""
    diff = provenance_diff(stored, current)
    if diff:
        raise ProvenanceError(
            f"{artefact} was made by something else than this run; it differs in: {'; '.join(diff)} (stored -> now). "
            f"Refusing to reuse it. {start_over}"
        )
