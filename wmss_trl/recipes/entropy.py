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
complete file is verified (exactly one row per sample) and left as is. A sidecar ``<output>.meta.json`` records what
made the scores (``wmss_trl.io``: the weights' safetensors headers, sizes and mtimes, the dtype, the dataset rows'
sha256, the column and masking settings): pointing ``--output`` at a file made by anything else stops with an error
naming what differs. One writer at a time: ``<output>.lock`` names the process writing the file (``--lock_timeout``
waits for it), a duplicated row is never appended, and a file with duplicated rows is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field

from trl import SFTConfig, TrlParser

from ..checks import check_float
from ..data_checks import check_dataset_columns
from ..io import (
    ProvenanceError,
    check_provenance,
    dataset_fingerprint,
    model_fingerprint,
    write_json_atomic,
)
from ..locks import WriterLock, die_with_parent
from .common import DataArguments, cpu_default_argv, load_dataset_splits, load_tokenizer, teardown


META_SUFFIX = ".meta.json"
META_FORMAT = "wmss-entropy/2"
MASK_FIELDS = (
    "max_length",
    "truncation_mode",
    "completion_only_loss",
    "assistant_only_loss",
    "dataset_text_field",
    "chat_template_path",
    "pad_token",
)


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
        metadata={
            "help": "Name of the entropy column, e.g. `entropy_0` for the weak model and `entropy_1` for the "
            "strong one (the names WD-DS selection reads by default)."
        },
    )
    idx_column: str = field(
        default="idx", metadata={"help": "Dataset column with a stable sample index; the row number if absent."}
    )
    write_every: int = field(default=256, metadata={"help": "Samples scored between two appends to the output."})
    entropy_chunk_size: int = field(default=1024, metadata={"help": "Positions per fp32 entropy chunk."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (main process)."})
    lock_timeout: float = field(
        default=0.0,
        metadata={"help": "Seconds to wait for another writer of --output to exit (0: refuse at once, naming it)."},
    )


def make_parser(prog: str = "wmss entropy") -> TrlParser:
    return TrlParser((EntropyArguments, SFTConfig), prog=prog)


# ---------------------------------------------------------------------------------------------------------------
# Provenance and the output file
# ---------------------------------------------------------------------------------------------------------------
def resolved_dtype(model: str, sft_args: SFTConfig) -> str:
    """The dtype the scored weights are loaded in: ``model_init_kwargs["dtype"]`` (TRL's default: float32), the
    checkpoint's own dtype for ``"auto"``."""
    dtype = (sft_args.model_init_kwargs or {}).get("dtype", "float32")
    if dtype in ("auto", None):
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def provenance(ent: EntropyArguments, sft_args: SFTConfig, dataset) -> dict:
    """What makes the scores: the model weights, their dtype and autocast, the dataset rows, and the settings that
    change a score (column names, split, the SFT masking fields)."""
    return {
        "model": model_fingerprint(ent.model),
        "dtype": resolved_dtype(ent.model, sft_args),
        "autocast": {"bf16": bool(sft_args.bf16), "fp16": bool(sft_args.fp16)},
        "dataset": dataset_fingerprint(dataset),
        "settings": {
            "dataset_split": ent.dataset_split,
            "entropy_column": ent.entropy_column,
            "idx_column": ent.idx_column,
            "masking": {k: getattr(sft_args, k, None) for k in MASK_FIELDS},
        },
    }


def start_over(output: str) -> str:
    return (
        f"To start over, delete {output} and {output}{META_SUFFIX} (or choose another --output); they are "
        "recomputed by the next run."
    )


def read_rows(path: str, keys=None) -> dict[int, dict]:
    """Rows of an entropy file keyed by idx, VERIFIED: each idx at most once and (given ``keys``, the dataset's idx
    values) only idx values of the dataset; SystemExit otherwise. A torn last line (a crash mid-write) is cut off."""
    done: dict[int, dict] = {}
    duplicated: list[int] = []
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
        i = int(row["idx"])
        if i in done:
            duplicated.append(i)
        done[i] = row
        good_end += len(line)
    if duplicated:
        raise SystemExit(
            f"{path} holds {len(duplicated)} duplicated rows (idx {sorted(set(duplicated))[:5]}...): two writers "
            f"appended to it at the same time. It cannot be trusted. {start_over(path)}"
        )
    if keys is not None:
        extra = set(done) - {int(k) for k in keys}
        if extra:
            raise SystemExit(
                f"{path} holds rows for idx values that are not in the dataset ({sorted(extra)[:5]}...). "
                f"{start_over(path)}"
            )
    if good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


class RowAppender:
    """Appends rows to the entropy file, refusing an idx already in it and noticing any other writer (the file must
    have exactly the size this writer left it at)."""

    def __init__(self, path: str, done: set[int]):
        self.path, self.done, self.size = path, set(done), os.path.getsize(path)

    def append(self, rows: list[dict]) -> None:
        new = [int(r["idx"]) for r in rows]
        again = sorted(set(new) & self.done) or sorted({i for i in new if new.count(i) > 1})
        if again:
            raise RuntimeError(f"refusing to append idx {again[:5]} to {self.path}: already there.")
        if os.path.getsize(self.path) != self.size:
            raise RuntimeError(
                f"{self.path} changed size while this process was its only writer: another process "
                f"wrote to it. {start_over(self.path)}"
            )
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(new)
        self.size = os.path.getsize(self.path)


def read_meta(meta_path: str, expected: dict) -> dict | None:
    """The existing sidecar (None if absent); SystemExit naming every difference when it describes another model,
    dtype, dataset or settings."""
    if not os.path.exists(meta_path):
        return None
    output = meta_path[: -len(META_SUFFIX)]
    with open(meta_path) as f:
        meta = json.load(f)
    try:
        if meta.get("format") != META_FORMAT:
            raise ProvenanceError(
                f"{output} has the sidecar format {meta.get('format')!r}, not {META_FORMAT!r}. {start_over(output)}"
            )
        check_provenance(output, meta["provenance"], expected["provenance"], start_over(output))
    except ProvenanceError as e:
        raise SystemExit(str(e)) from e
    return meta


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def _open_output(output: str, expected: dict, keys) -> list[int]:
    """Main process, under the lock: check the sidecar, read and verify the rows already there (or create the file).
    Returns the idx values already scored."""
    meta_path = output + META_SUFFIX
    meta = read_meta(meta_path, expected)
    if meta is None and os.path.exists(output) and os.path.getsize(output) > 0:
        raise SystemExit(
            f"{output} exists but has no {META_SUFFIX} sidecar: refusing to append to it. {start_over(output)}"
        )
    if meta is None:
        os.makedirs(os.path.dirname(output), exist_ok=True)
        open(output, "w").close()
        write_json_atomic(meta_path, {**expected, "complete": False, "num_done": 0})
        return []
    done = read_rows(output, keys)
    if meta.get("complete") and len(done) != len(keys):
        print(
            f"{output}: marked complete but holds {len(done)} of {len(keys)} samples; scoring the missing ones.",
            flush=True,
        )
        write_json_atomic(meta_path, {**expected, "complete": False, "num_done": len(done)})
    return sorted(done)


def _check_arguments(ent: EntropyArguments) -> str:
    """The output name, the model (a local safetensors folder), ``write_every`` and ``lock_timeout``, checked before
    anything loads; returns the output's absolute path."""
    from ..weak import require_safetensors

    if not ent.output.endswith((".jsonl", ".json")):
        raise SystemExit(f"--output must be a JSON-lines file ending in .jsonl, got {ent.output!r}.")
    if not os.path.isdir(ent.model):
        raise SystemExit(f"--model {ent.model!r} is not a local checkpoint folder.")
    try:
        require_safetensors(ent.model, "--model")
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if ent.write_every < 1:
        raise SystemExit("--write_every must be >= 1.")
    try:
        ent.lock_timeout = check_float("--lock_timeout", ent.lock_timeout, low=0)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    return os.path.abspath(ent.output)


def run(ent: EntropyArguments, sft_args: SFTConfig) -> dict:
    """Score ``ent.model`` on ``ent.dataset`` into ``ent.output``; returns the final meta. All processes call it."""
    from accelerate.utils import broadcast_object_list

    from ..entropy import EntropyScorer

    output = _check_arguments(ent)
    if sft_args.output_dir in (None, "", "trainer_output"):
        sft_args.output_dir = os.path.dirname(output)

    splits = load_dataset_splits(
        DataArguments(
            dataset_name=ent.dataset, dataset_config=ent.dataset_config, dataset_train_split=ent.dataset_split
        )
    )
    if ent.dataset_split not in splits:
        raise SystemExit(f"split {ent.dataset_split!r} not in {ent.dataset!r} (splits: {list(splits)}).")
    dataset = splits[ent.dataset_split]
    # the scorer prepares rows as TRL's SFT does: its columns, checked before any model loads
    check_dataset_columns(dataset, "sft", name=f"--dataset {ent.dataset} (split {ent.dataset_split!r})", args=sft_args)
    keys = EntropyScorer._keys(dataset, ent.idx_column)
    state = sft_args.distributed_state  # set up with use_cpu as the trainer will be (never a bare PartialState())

    # Decide on the main process (lock, hashing, reading the file), then tell everyone: the same work list everywhere.
    with contextlib.ExitStack() as stack:
        decision = [None]
        if state.is_main_process:
            try:
                lock = WriterLock(output + ".lock", f"the entropy file {output}")
                stack.enter_context(lock.acquire(ent.lock_timeout))
                expected = {
                    "format": META_FORMAT,
                    "provenance": provenance(ent, sft_args, dataset),
                    "model": os.path.abspath(ent.model),
                    "dataset": ent.dataset,
                    "entropy_column": ent.entropy_column,
                    "idx_column": ent.idx_column,
                    "num_rows": len(dataset),
                }
                decision = [{"expected": expected, "done": _open_output(output, expected, keys), "error": None}]
            except (SystemExit, Exception) as e:  # noqa: BLE001 - every rank must learn about it, not hang
                decision = [{"error": f"{type(e).__name__}: {e}" if not isinstance(e, SystemExit) else str(e)}]
        if state.num_processes > 1:
            decision = broadcast_object_list(decision)
        if decision[0]["error"]:
            raise SystemExit(decision[0]["error"])
        return _score(ent, sft_args, dataset, keys, output, decision[0]["expected"], set(decision[0]["done"]))


def _score(ent, sft_args, dataset, keys, output, expected, done) -> dict:
    from tqdm.auto import tqdm

    from ..entropy import EntropyScorer

    state = sft_args.distributed_state
    meta_path = output + META_SUFFIX
    todo = [int(k) for k in keys if int(k) not in done]
    final = {**expected, "complete": True, "num_done": len(dataset)}
    if not todo:
        if state.is_main_process:
            write_json_atomic(meta_path, final)
            print(
                f"{output}: complete ({len(done)} samples, verified: one row per sample), nothing to do.", flush=True
            )
        return final
    if done and state.is_main_process:
        print(f"{output}: resuming, {len(done)} of {len(dataset)} samples already scored.", flush=True)

    tokenizer = load_tokenizer(ent.model, sft_args.trust_remote_code)
    scorer = EntropyScorer(ent.model, dataset, tokenizer, sft_args, ent.idx_column, ent.entropy_chunk_size)
    acc = scorer.accelerator
    acc.print(
        f"wmss entropy: {acc.num_processes} process(es), {acc.distributed_type.value}, {len(todo)} samples to score"
    )
    appender = RowAppender(output, done) if acc.is_main_process else None
    bar = tqdm(
        total=len(todo),
        desc=f"entropy {ent.entropy_column}",
        unit="sample",
        disable=not (ent.progress and acc.is_main_process) or not todo,
    )
    for start in range(0, len(todo), ent.write_every):
        result = scorer.score(todo[start : start + ent.write_every], progress=bar)
        if acc.is_main_process:
            appender.append(
                [
                    {"idx": int(i), ent.entropy_column: (None if math.isnan(h) else float(h)), "num_tokens": int(n)}
                    for i, h, n in zip(result["idx"], result["entropy"], result["num_tokens"])
                ]
            )
        acc.wait_for_everyone()
    bar.close()

    if acc.is_main_process:
        n_rows = len(read_rows(output, keys))
        if n_rows != len(dataset):
            raise RuntimeError(f"{output} holds {n_rows} samples, expected {len(dataset)}.")
        write_json_atomic(meta_path, final)
        acc.print(f"entropies of {ent.model} written to {output} (column {ent.entropy_column!r}).")
    acc.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # started by `wmss pipeline`: stop when it stops
    ent, sft_args = make_parser().parse_args_and_config(args=cpu_default_argv(argv))
    run(ent, sft_args)
    teardown()
    return 0
