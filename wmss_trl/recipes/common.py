"""Small helpers shared by the recipes: CPU defaults, tokenizer and dataset loading, the run's outputs, teardown."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import dataclass, field

import torch


logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    """Where the data comes from (a subset of TRL's ``ScriptArguments``, plus local files)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A local data file (any format `datasets` reads: .json/.jsonl/.parquet/.csv/.tsv...), a "
            "folder of data files, a folder saved with `save_to_disk`, a hub dataset name, or `wmss:arith` for "
            "the embedded arithmetic task."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})


def cpu_default_argv(argv: list[str] | None) -> list[str]:
    """With no GPU, add ``--use_cpu true`` to the command line unless given. It must be known when the training
    arguments are *parsed*: without it, 2 launched processes silently run as two world-size-1 jobs (DDP) or fail
    DeepSpeed's batch-size check. Setting ``args.use_cpu`` after parsing is too late."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv += ["--use_cpu", "true"]
    return argv


def check_before_loading(model_args, training_args, role: str = "strong model") -> None:
    """Check the inputs before any model loads, so a bad one fails in seconds, with its fix:

    * ``model_name_or_path`` is given (without it transformers would look ``None`` up on the hub, for a minute);
    * ``model_name_or_path`` and ``weak_model_name_or_path`` hold safetensors weights (the project's one loading
      policy, :func:`wmss_trl.weak.require_safetensors`);
    * a warning when ``bf16`` (TRL's default) would run in software on this CPU (:func:`~wmss_trl.machine.slow_bf16_warning`);
    * ``resume_from_checkpoint`` becomes a *complete* checkpoint (:mod:`wmss_trl.checkpoints`): ``true`` -> the last
      complete one in ``output_dir`` (torn ones skipped with a warning; none: from scratch), a path -> that one,
      refused with what is missing unless complete.
    """
    from ..checkpoints import resolve_resume_from_checkpoint
    from ..machine import slow_bf16_warning
    from ..weak import require_safetensors

    if not model_args.model_name_or_path:
        raise SystemExit(
            f"--model_name_or_path is required: the {role} (a folder of safetensors weights or a hub id)."
        )
    require_safetensors(model_args.model_name_or_path, role)
    require_safetensors(getattr(training_args, "weak_model_name_or_path", None), "weak model")
    training_args.resume_from_checkpoint = resolve_resume_from_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir
    )
    on_cpu = training_args.use_cpu or not torch.cuda.is_available()
    slow = slow_bf16_warning(bool(getattr(training_args, "bf16", False)), on_cpu)
    if slow and training_args.process_index == 0:
        logger.warning(slow)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(path, trust_remote_code=...)``: the recipes' one tokenizer loader, so that a
    command loads exactly what a TRL user's own ``AutoTokenizer`` call would (the toy folders included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


# Suffixes of data files: a missing path ending so is a typo to report, not a hub dataset to look up (which would wait
# for the hub's retries and then say "Couldn't reach ... on the Hub").
_DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow")


def load_dataset_splits(data_args: DataArguments):
    """Return a ``DatasetDict`` for ``--dataset_name``, loaded by ``datasets`` itself:

    * ``wmss:<name>``: an embedded task (:func:`wmss_trl.tasks.load_embedded`);
    * a folder written by ``save_to_disk``: ``datasets.load_from_disk`` (``load_dataset`` refuses those); a single
      saved ``Dataset`` becomes the ``dataset_train_split`` split;
    * a local data file: ``datasets.load_dataset(<its folder>, data_files={dataset_train_split: <file>})``, so datasets
      picks the builder from the extension (every format it reads: json/jsonl, parquet, csv, tsv, txt, arrow...);
    * anything else (a folder of data files, a hub name): ``datasets.load_dataset(name, name=dataset_config)``.

    What it adds to ``datasets``: the ``wmss:`` names, one ``--dataset_name`` for all of the above (TRL's
    ``get_dataset`` / ``DatasetMixtureConfig`` only call ``load_dataset`` on hub names / folders, with no
    ``load_from_disk`` and no single local file), and clear, early errors for a missing name or file.
    """
    from datasets import DatasetDict, config, load_dataset, load_from_disk
    from datasets.exceptions import DatasetNotFoundError

    name = data_args.dataset_name
    if name is None:
        raise ValueError(
            "no dataset: pass --dataset_name (a local file or folder, a saved folder, a hub dataset, or wmss:arith)."
        )
    if name.startswith("wmss:"):
        from .. import tasks

        return tasks.load_embedded(name.split(":", 1)[1])
    if os.path.isdir(name) and any(
        os.path.isfile(os.path.join(name, f))
        for f in (config.DATASETDICT_JSON_FILENAME, config.DATASET_STATE_JSON_FILENAME)
    ):
        ds = load_from_disk(name)
        return ds if isinstance(ds, DatasetDict) else DatasetDict({data_args.dataset_train_split: ds})
    if os.path.isfile(name):
        folder, file = os.path.split(os.path.abspath(name))
        return load_dataset(folder, data_files={data_args.dataset_train_split: file})
    if name.lower().endswith(_DATA_FILE_SUFFIXES):
        raise FileNotFoundError(f"dataset file {name!r} does not exist (looked in {os.path.abspath(name)}).")
    try:
        return load_dataset(name, name=data_args.dataset_config)
    except (DatasetNotFoundError, ConnectionError) as e:
        raise ValueError(
            f"--dataset_name {name!r} is not a local file or folder (none at {os.path.abspath(name)}) and could not "
            f"be loaded from the hub: {e}"
        ) from e


def parse_run(parser, argv: list[str] | None, role: str = "strong model"):
    """``(data_args, training_args, model_args)`` of a training command, checked before anything loads."""
    data_args, training_args, model_args = parser.parse_args_and_config(args=cpu_default_argv(argv))
    check_before_loading(model_args, training_args, role)
    return data_args, training_args, model_args


def load_run(data_args, training_args, model_args, kind: str, **column_checks):
    """The tokenizer and the train / evaluation splits of a training command; the splits' columns are checked for
    ``kind`` (``"sft"``, ``"dpo"``, ``"grpo"``; ``column_checks`` go to ``check_dataset_columns``) before any model
    loads. Sets the model's dtype from ``--dtype``."""
    from ..data_checks import check_dataset_columns

    training_args.model_init_kwargs = {"dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.trust_remote_code)
    splits = load_dataset_splits(data_args)
    train = splits[data_args.dataset_train_split]
    evaluation = splits.get(data_args.dataset_test_split) if training_args.eval_strategy != "no" else None
    for split, dataset in ((data_args.dataset_train_split, train), (data_args.dataset_test_split, evaluation)):
        where = f"--dataset_name {data_args.dataset_name} (split {split!r})"
        check_dataset_columns(dataset, kind, name=where, **column_checks)
    return tokenizer, train, evaluation


def zero_stage(trainer) -> int | None:
    """The DeepSpeed ZeRO stage of a trainer's run (None without DeepSpeed)."""
    plugin = trainer.accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin else None


def run_trainer(trainer, prog: str, details: str, what: str) -> int:
    """Print ``"<prog>: N process(es), <distributed type>, <details>"``, train (resuming from ``--resume_from_checkpoint``),
    write the run's outputs (:func:`finish_run`, naming the model ``what``) and tear down. Returns the exit code 0."""
    state = trainer.accelerator.state
    trainer.accelerator.print(f"{prog}: {state.num_processes} process(es), {state.distributed_type.value}, {details}")
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    finish_run(trainer, what)
    teardown()
    return 0


def finish_run(trainer, what: str) -> None:
    """Write what every command leaves in ``output_dir`` once training ends, the same for each: the final model
    (``trainer.save_model``: weights, config, tokenizer), ``trainer_state.json`` (the log history) and TRL's model
    card ``README.md`` (``trainer.create_model_card``, named as TRL names it at each checkpoint, completed by
    :func:`wmss_trl.card.write_card_section`: the base and weak model and the WMSS settings)."""
    from ..card import write_card_section

    args = trainer.args
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
    name = os.path.basename(os.path.normpath(args.output_dir)) if args.hub_model_id is None else args.hub_model_id
    trainer.create_model_card(model_name=name.split("/")[-1])
    write_card_section(trainer)
    trainer.accelerator.print(f"{what} saved to {args.output_dir} (model, trainer_state.json, README.md model card)")


def teardown() -> None:
    """Wait for every process, then destroy the process group (PyTorch asks every program to do so)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_worker(code: int) -> None:
    """End a process started by ``accelerate launch`` once its work is done and saved: flush the streams, run the
    ``atexit`` handlers (logging, trackers) while the interpreter is whole, then ``os._exit(code)``.

    Skipping interpreter finalization avoids a rare abort at exit ("terminate called without an active exception",
    SIGABRT) seen once in 2-process ZeRO-3 runs under gloo even after :func:`teardown`: a C++ communication thread
    releasing Python-owned tensors while the interpreter is torn down (pytorch/pytorch#179291). Outside a
    multi-process launch this is a plain ``sys.exit(code)``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
