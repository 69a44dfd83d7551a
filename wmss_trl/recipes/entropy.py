"""``wmss entropy``: per-sample mean token entropy of a model on a dataset (WD-DS's H0 / H1), resumable.

    wmss entropy --model WEAK   --dataset data.jsonl --output entropy/weak.jsonl   --entropy_column entropy_0
    wmss entropy --model STRONG --dataset data.jsonl --output entropy/strong.jsonl --entropy_column entropy_1
    wmss entropy ... --accelerate_config zero3          # every process scores a shard

The scores cover exactly the tokens ``trl sft`` trains: the SFT flags (``--max_length``, ``--completion_only_loss``,
``--assistant_only_loss``, ``--config sft.yaml``...) are accepted and shape the masks the same way.
``--per_device_eval_batch_size`` is the scoring batch size.

Output: JSON lines ``{"idx": int, "<entropy_column>": float | null, "num_tokens": int}``, readable with
``datasets.load_dataset("json", data_files=...)``; null marks a sample with no trained token. The rows are appended
in chunks of ``--write_every`` samples, so a re-run with the same ``--output`` skips the samples already scored and a
complete file is left as is. A sidecar ``<output>.meta.json`` records the model and the dataset fingerprint: pointing
``--output`` at a file written for another model, dataset, column or masking stops with an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from trl import SFTConfig, TrlParser

from .common import DataArguments, cpu_default_argv, load_dataset_splits, load_tokenizer, teardown

META_SUFFIX = ".meta.json"
META_FORMAT = "wmss-entropy/1"
MASK_FIELDS = ("max_length", "truncation_mode", "completion_only_loss", "assistant_only_loss", "dataset_text_field",
               "chat_template_path", "pad_token")


@dataclass
class EntropyArguments:
    """What to score and where to write it."""

    model: str = field(metadata={"help": "Local folder of the model to score (safetensors; its tokenizer is used)."})
    dataset: str = field(
        metadata={"help": "The dataset: a local .jsonl/.json/.parquet file, a `save_to_disk` folder, or a hub name."}
    )
    output: str = field(metadata={"help": "Output JSON-lines file (.jsonl). Re-running with it resumes."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to score."})
    entropy_column: str = field(
        default="entropy",
        metadata={"help": "Name of the entropy column, e.g. `entropy_0` for the weak model and `entropy_1` for the "
                  "strong one (the names WD-DS selection reads by default)."},
    )
    idx_column: str = field(
        default="idx", metadata={"help": "Dataset column with a stable sample index; the row number if absent."}
    )
    write_every: int = field(default=256, metadata={"help": "Samples scored between two appends to the output."})
    entropy_chunk_size: int = field(default=1024, metadata={"help": "Positions per fp32 entropy chunk."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (main process)."})


def make_parser(prog: str = "wmss entropy") -> TrlParser:
    return TrlParser((EntropyArguments, SFTConfig), prog=prog)


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints and the output file
# ---------------------------------------------------------------------------------------------------------------
def dataset_fingerprint(dataset, batch_size: int = 1000) -> str:
    """sha256 of the dataset's content (column names + rows as canonical JSON); independent of how it was loaded."""
    h = hashlib.sha256(json.dumps(sorted(dataset.column_names)).encode())
    h.update(str(len(dataset)).encode())
    for batch in dataset.iter(batch_size=batch_size):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """sha256 over the model folder's config and weight files (names and contents)."""
    h = hashlib.sha256()
    names = sorted(
        f for f in os.listdir(path)
        if f == "config.json" or f.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
    )
    if not names:
        raise FileNotFoundError(f"{path!r} has no config.json or weight files; is it a model checkpoint folder?")
    for name in names:
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def read_done(path: str) -> dict[int, dict]:
    """Rows already in ``path`` keyed by idx. A torn last line (crash during a write) is cut off the file."""
    done: dict[int, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    good_end = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # torn write
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        done[int(row["idx"])] = row
        good_end += len(line)
    if good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def append_rows(path: str, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def check_meta(meta_path: str, expected: dict) -> dict | None:
    """The existing sidecar (None if absent); SystemExit when it describes another model / dataset / masking."""
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    for key in ("format", "model_fingerprint", "dataset_fingerprint", "entropy_column", "idx_column", "masking"):
        if meta.get(key) != expected.get(key):
            raise SystemExit(
                f"{meta_path[: -len(META_SUFFIX)]} was written for another run ({key} differs: "
                f"{meta.get(key)!r} in the file vs {expected.get(key)!r} now; model {meta.get('model')!r}, dataset "
                f"{meta.get('dataset')!r}). Choose another --output, or delete the file and its {META_SUFFIX} sidecar "
                "to recompute."
            )
    return meta


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def run(ent: EntropyArguments, sft_args: SFTConfig) -> dict:
    """Score ``ent.model`` on ``ent.dataset`` into ``ent.output``; returns the final meta. All processes call it."""
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    from ..entropy import EntropyScorer

    if not ent.output.endswith((".jsonl", ".json")):
        raise SystemExit(f"--output must be a JSON-lines file ending in .jsonl, got {ent.output!r}.")
    if not os.path.isdir(ent.model):
        raise SystemExit(f"--model {ent.model!r} is not a local checkpoint folder.")
    if ent.write_every < 1:
        raise SystemExit("--write_every must be >= 1.")
    output = os.path.abspath(ent.output)
    meta_path = output + META_SUFFIX
    if sft_args.output_dir in (None, "", "trainer_output"):
        sft_args.output_dir = os.path.dirname(output)

    splits = load_dataset_splits(
        DataArguments(dataset_name=ent.dataset, dataset_config=ent.dataset_config, dataset_train_split=ent.dataset_split)
    )
    if ent.dataset_split not in splits:
        raise SystemExit(f"split {ent.dataset_split!r} not in {ent.dataset!r} (splits: {list(splits)}).")
    dataset = splits[ent.dataset_split]
    keys = EntropyScorer._keys(dataset, ent.idx_column)
    state = sft_args.distributed_state  # set up with use_cpu as the trainer will be (never a bare PartialState())

    expected = {
        "format": META_FORMAT,
        "model": os.path.abspath(ent.model),
        "dataset": ent.dataset,
        "dataset_split": ent.dataset_split,
        "entropy_column": ent.entropy_column,
        "idx_column": ent.idx_column,
        "masking": {k: getattr(sft_args, k, None) for k in MASK_FIELDS},
        "num_rows": len(dataset),
    }
    # Decide on the main process (hashing, reading the file), then tell everyone: the same work list on every rank.
    decision = [None]
    if state.is_main_process:
        try:
            expected["model_fingerprint"] = model_fingerprint(ent.model)
            expected["dataset_fingerprint"] = dataset_fingerprint(dataset)
            meta = check_meta(meta_path, expected)
            if meta is None and os.path.exists(output) and os.path.getsize(output) > 0:
                raise SystemExit(f"{output} exists but has no {META_SUFFIX} sidecar: refusing to append to it.")
            done = read_done(output) if meta is not None else {}
            if meta is None:
                os.makedirs(os.path.dirname(output), exist_ok=True)
                open(output, "w").close()
                write_json(meta_path, {**expected, "complete": False, "num_done": 0})
            decision = [{"expected": expected, "done": sorted(done), "error": None}]
        except (SystemExit, Exception) as e:  # noqa: BLE001 - every rank must learn about it, not hang
            decision = [{"error": f"{type(e).__name__}: {e}" if not isinstance(e, SystemExit) else str(e)}]
    if state.num_processes > 1:
        decision = broadcast_object_list(decision)
    if decision[0]["error"]:
        raise SystemExit(decision[0]["error"])
    expected, done = decision[0]["expected"], set(decision[0]["done"])

    todo = [int(k) for k in keys if int(k) not in done]
    final = {**expected, "complete": True, "num_done": len(dataset)}
    if not todo:
        if state.is_main_process:
            write_json(meta_path, final)
            print(f"{output}: complete ({len(done)} samples), nothing to do.", flush=True)
        return final
    if done and state.is_main_process:
        print(f"{output}: resuming, {len(done)} of {len(dataset)} samples already scored.", flush=True)

    tokenizer = load_tokenizer(ent.model, sft_args.trust_remote_code)
    scorer = EntropyScorer(ent.model, dataset, tokenizer, sft_args, ent.idx_column, ent.entropy_chunk_size)
    acc = scorer.accelerator
    acc.print(f"wmss entropy: {acc.num_processes} process(es), {acc.distributed_type.value}, {len(todo)} samples to score")
    bar = tqdm(total=len(todo), desc=f"entropy {ent.entropy_column}", unit="sample",
               disable=not (ent.progress and acc.is_main_process) or not todo)
    for start in range(0, len(todo), ent.write_every):
        result = scorer.score(todo[start : start + ent.write_every], progress=bar)
        if acc.is_main_process:
            rows = [
                {"idx": int(i), ent.entropy_column: (None if math.isnan(h) else float(h)), "num_tokens": int(n)}
                for i, h, n in zip(result["idx"], result["entropy"], result["num_tokens"])
            ]
            append_rows(output, rows)
        acc.wait_for_everyone()
    bar.close()

    if acc.is_main_process:
        n_lines = len(read_done(output))
        if n_lines != len(dataset):
            raise RuntimeError(f"{output} holds {n_lines} samples, expected {len(dataset)}.")
        write_json(meta_path, final)
        acc.print(f"entropies of {ent.model} written to {output} (column {ent.entropy_column!r}).")
    acc.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> int:
    ent, sft_args = make_parser().parse_args_and_config(args=cpu_default_argv(argv))
    run(ent, sft_args)
    teardown()
    return 0
