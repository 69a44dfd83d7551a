"""The pipeline's phases, in order: the weak base model and the data (built when not given), phase 1 SFT (its
launched worker too), the entropies H0 / H1, the WD-DS weights and phase 3 WD-JT. Each returns what its marker
records."""

from __future__ import annotations

import json
import os
import random
import shutil

from ...io import write_json_atomic, write_jsonl_atomic
from .config import write_yaml
from .processes import CHILD_LOCK_TIMEOUT, run_command
from .run import Run, log


def make_arithmetic_rows(num_samples: int = 512, max_operand: int = 50, seed: int = 0) -> list[dict]:
    """A minimal conversational prompt/completion task: ``"a+b="`` or ``"a-b="`` -> the result, with an ``idx``."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_samples):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        result = a + b if op == "+" else a - b
        rows.append(
            {
                "idx": i,
                "prompt": [{"role": "user", "content": f"{a}{op}{b}="}],
                "completion": [{"role": "assistant", "content": str(result)}],
            }
        )
    return rows


def phase_base(run: Run) -> dict:
    if run.cfg["base_model"] is not None:
        if not os.path.isfile(os.path.join(run.weak, "config.json")):
            raise SystemExit(f"base_model {run.weak!r} is not a checkpoint folder (no config.json).")
        return {"base_model": run.weak, "built": False}
    from ...toy import build_char_tokenizer, build_tiny_model, save_model_and_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, **run.cfg["toy_model"])
    tmp = run.dir / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_and_tokenizer(model, tok, str(tmp))
    shutil.rmtree(run.weak, ignore_errors=True)
    os.replace(tmp, run.weak)
    return {"base_model": run.weak, "built": True, "parameters": sum(p.numel() for p in model.parameters())}


def phase_data(run: Run) -> dict:
    if run.cfg["dataset"] is not None:
        return {"dataset": run.data, "generated": False}
    rows = make_arithmetic_rows(**run.cfg["toy_data"])
    os.makedirs(os.path.dirname(run.data), exist_ok=True)
    write_jsonl_atomic(run.data, rows)
    return {"dataset": run.data, "generated": True, "num_samples": len(rows)}


def training_config(run: Run, section: str) -> dict:
    cfg = {**run.cfg["common"], **run.cfg[section]}
    for reserved in ("output_dir", "model_name_or_path", "dataset_name"):
        if reserved in cfg:
            raise SystemExit(f"{reserved!r} is set by the pipeline; remove it from `{section}` / `common`.")
    return cfg


def last_checkpoint(folder: str) -> str | None:
    """The last *complete* checkpoint in ``folder``: a torn one (a kill or a full disk mid-save) is skipped with a
    warning, so a re-run never resumes from it (:mod:`wmss_trl.checkpoints`)."""
    from ...checkpoints import last_complete_checkpoint

    return last_complete_checkpoint(folder)


def phase_sft(run: Run) -> dict:
    if run.cfg["strong_model"] is not None:
        if not os.path.isfile(os.path.join(run.strong, "config.json")):
            raise SystemExit(f"strong_model {run.strong!r} is not a checkpoint folder (no config.json).")
        return {"strong_model": run.strong, "trained": False}
    run_command(run, "sft", ["pipeline", "--phase", "sft", "--output_dir", str(run.dir)])
    if not os.path.isfile(os.path.join(run.strong, "config.json")):
        raise SystemExit(f"phase 1 finished but {run.strong} holds no model.")
    return {"strong_model": run.strong, "trained": True}


def worker_sft(run: Run) -> int:
    """Phase 1 inside its (possibly launched) process: plain TRL SFT of the base into the strong model."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from ..common import DataArguments, load_dataset_splits, load_tokenizer, teardown

    kwargs = training_config(run, "sft")
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)  # before the config exists: see cpu-setup T2/T3
    args = SFTConfig(output_dir=run.strong, **kwargs)
    train = load_dataset_splits(DataArguments(dataset_name=run.data))["train"]
    trainer = SFTTrainer(run.weak, args=args, train_dataset=train, processing_class=load_tokenizer(run.weak))
    trainer.accelerator.print(
        f"phase 1 SFT: {trainer.accelerator.num_processes} process(es), {trainer.accelerator.distributed_type.value}"
    )
    trainer.train(resume_from_checkpoint=last_checkpoint(run.strong))
    trainer.save_model(run.strong)
    teardown()
    return 0


def check_pair(run: Run) -> None:
    """Weak and strong models must share the tokenizer (WMSS compares / mixes them token by token)."""
    from ...weak import check_weak_compatible
    from ..common import load_tokenizer

    try:
        check_weak_compatible(run.strong, run.weak, load_tokenizer(run.strong), run.weak)
    except ValueError as e:
        raise SystemExit(f"weak model {run.weak} and strong model {run.strong} cannot be paired: {e}") from e


def entropy_config(run: Run) -> str:
    """The YAML of the entropy passes: WD-JT's masking fields (those ``wmss entropy`` records, and
    ``dataset_kwargs``) and bf16, then the `entropy` section."""
    from ..entropy import MASK_FIELDS

    wdjt = training_config(run, "wdjt")
    cfg = {k: wdjt[k] for k in (*MASK_FIELDS, "dataset_kwargs") if k in wdjt}
    cfg.update(bf16=wdjt.get("bf16", False), report_to="none")
    cfg.update(run.cfg["entropy"] or {})
    return write_yaml(run.dir / "configs" / "entropy.yaml", cfg)


def phase_entropy(run: Run, which: str) -> dict:
    model, column = (run.weak, "entropy_0") if which == "weak" else (run.strong, "entropy_1")
    output = run.entropy(which)
    run_command(
        run,
        f"entropy_{which}",
        [
            "entropy",
            "--config",
            entropy_config(run),
            "--model",
            model,
            "--dataset",
            run.data,
            "--output",
            output,
            "--entropy_column",
            column,
            "--progress",
            "false",
            "--lock_timeout",
            str(CHILD_LOCK_TIMEOUT),
        ],
    )
    with open(output + ".meta.json") as f:
        if not json.load(f)["complete"]:
            raise SystemExit(f"{output} is incomplete after the entropy phase.")
    return {"output": output, "column": column}


def phase_wd_ds(run: Run) -> dict:
    """Join H0 and H1 on idx, compute the WD-DS weights, write them (with the entropies) and a summary."""
    import numpy as np

    from ...selection import merge_entropy_files, resample_indices, unique_count, wd_ds_weights

    sel = run.cfg["selection"]
    sources = [run.entropy("weak"), run.entropy("strong")]
    idx, cols = merge_entropy_files(sources, ["entropy_0", "entropy_1"])
    h0, h1 = cols["entropy_0"], cols["entropy_1"]
    valid = ~np.isnan(h0) & ~np.isnan(h1)
    weights = np.zeros(len(idx))
    weights[valid] = wd_ds_weights(
        h0[valid],
        h1[valid],
        sel.get("selection_alpha", 0.1),
        sel.get("selection_beta", 0.8),
        sel.get("selection_gamma", 0.1),
    )
    os.makedirs(os.path.dirname(run.merged), exist_ok=True)
    write_jsonl_atomic(
        run.merged,
        (
            {"idx": i, "entropy_0": None if a != a else a, "entropy_1": None if b != b else b, "wd_ds_weight": w}
            for i, a, b, w in zip(idx.tolist(), h0.tolist(), h1.tolist(), weights.tolist())
        ),
    )
    _write_merged_meta(run, int(len(idx)))
    dh = (h1 - h0)[valid]
    draw = resample_indices(weights, sel.get("selection_multiplier", 1.0), sel.get("selection_seed", 42))
    summary = {
        "num_samples": int(len(idx)),
        "num_scored": int(valid.sum()),
        "mean_entropy_weak": float(h0[valid].mean()),
        "mean_entropy_strong": float(h1[valid].mean()),
        "fraction_entropy_dropped": float((dh < 0).mean()),
        "fraction_entropy_rose": float((dh > 0).mean()),
        "max_weight_times_n": float(weights.max() * valid.sum()),
        "unique_samples_in_resample": unique_count(draw),
    }
    write_json_atomic(run.dir / "wd_ds" / "summary.json", summary)
    log("WD-DS: " + json.dumps(summary))
    return {"output": run.merged, **summary}


def _write_merged_meta(run: Run, num_rows: int) -> None:
    """The sidecar of the WD-DS file, in ``wmss entropy``'s format: complete, its three columns, the dataset's
    provenance and the fingerprints of the two entropy files it was merged from."""
    from ..entropy import META_FORMAT, META_SUFFIX

    with open(run.entropy("weak") + META_SUFFIX) as f:
        dataset_provenance = json.load(f)["provenance"]["dataset"]  # the same in both: merge_entropy_files checked it
    write_json_atomic(
        run.merged + META_SUFFIX,
        {
            "format": META_FORMAT,
            "complete": True,
            "num_rows": num_rows,
            "num_done": num_rows,
            "entropy_column": ["entropy_0", "entropy_1", "wd_ds_weight"],
            "idx_column": "idx",
            "provenance": {
                "dataset": dataset_provenance,
                "sources": run.fingerprints(["entropy_weak", "entropy_strong"]),
            },
        },
    )


def phase_wdjt(run: Run) -> dict:
    cfg = training_config(run, "wdjt")
    cfg.update(run.cfg["selection"] or {})
    cfg.update(
        model_name_or_path=run.strong,
        weak_model_name_or_path=run.weak,
        dataset_name=run.data,
        output_dir=run.final,
        entropy_files=[run.merged],
        weak_entropy_column="entropy_0",
        strong_entropy_column="entropy_1",
    )
    if cfg.get("selection_mode") is None:
        cfg.pop("entropy_files")
    checkpoint = last_checkpoint(run.final)
    if checkpoint:
        cfg["resume_from_checkpoint"] = checkpoint
    config = write_yaml(run.dir / "configs" / "wdjt.yaml", cfg)
    run_command(run, "wdjt", ["pipeline", "--phase", "wdjt", "--output_dir", str(run.dir), "--config", config])
    if not os.path.isfile(os.path.join(run.final, "config.json")):
        raise SystemExit(f"WD-JT finished but {run.final} holds no model.")
    return {"final_model": run.final}
