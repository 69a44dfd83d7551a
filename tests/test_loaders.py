"""What the commands load: datasets by `datasets`' own dispatch (plus `wmss:` names and clear errors), tokenizers by
plain `AutoTokenizer`, and the core (`wmss_trl.weak`) without importing the recipes."""

import json
import os
import subprocess
import sys
import time

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from wmss_trl.recipes.common import DataArguments, load_dataset_splits, load_tokenizer


ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}, {"prompt": "3+3=", "answer": "6"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(name, **kw):
    return load_dataset_splits(DataArguments(dataset_name=str(name), **kw))


def test_single_file_is_the_train_split(tmp_path):
    splits = load(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert list(splits) == ["train"] and splits["train"].to_list() == ROWS
    assert list(load(write_jsonl(tmp_path / "e.jsonl", ROWS), dataset_train_split="fit")) == ["fit"]


def test_any_format_datasets_reads(tmp_path):
    """The builder comes from `datasets` (here the tab-separated csv builder), not from a list of ours."""
    (tmp_path / "d.tsv").write_text("prompt\tanswer\n1+1=\t2\n2+2=\t4\n")
    rows = [{"prompt": "1+1=", "answer": 2}, {"prompt": "2+2=", "answer": 4}]
    assert load(tmp_path / "d.tsv")["train"].to_list() == rows


def test_folder_of_data_files_has_its_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "test.jsonl", ROWS[2:])
    splits = load(tmp_path)
    assert splits["train"].to_list() == ROWS[:2] and splits["test"].to_list() == ROWS[2:]


def test_saved_folders_load_from_disk(tmp_path):
    saved = DatasetDict({"train": Dataset.from_list(ROWS[:2]), "test": Dataset.from_list(ROWS[2:])})
    saved.save_to_disk(tmp_path / "dd")
    assert load(tmp_path / "dd")["test"].to_list() == ROWS[2:]
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    assert load(tmp_path / "ds")["train"].to_list() == ROWS


def test_embedded_task():
    splits = load("wmss:arith")
    assert {"train", "test"} <= set(splits) and "prompt" in splits["train"].column_names


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--dataset_name"):
        load_dataset_splits(DataArguments())
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):  # a typo'd file: said at once, not asked of the hub
        load(tmp_path / "nope.jsonl")
    assert time.monotonic() - start < 5
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: the hub is not reached
    with pytest.raises(ValueError, match="not a local file or folder"):
        load("no-such-org/no-such-dataset")


def test_load_tokenizer_is_auto_tokenizer(tiny):
    """A command loads the tokenizer a TRL user's own `AutoTokenizer.from_pretrained` would (the class the folder
    names), not a generic class of ours."""
    assert type(load_tokenizer(tiny["strong"])) is type(AutoTokenizer.from_pretrained(tiny["strong"]))


def test_toy_folder_tokenizer_round_trips_through_load_tokenizer(tiny):
    """A saved toy folder, loaded as the commands load it, gives the ids and text of the tokenizer that saved it.
    Holds once `wmss_trl.toy` saves a tokenizer `AutoTokenizer` reads faithfully (issue 15, item 4)."""
    text = "12+30=42\n(7*8) ? x"
    loaded = load_tokenizer(tiny["strong"])
    ids = tiny["tokenizer"](text)["input_ids"]
    assert loaded(text)["input_ids"] == ids and loaded.decode(ids) == text


def test_core_does_not_import_the_recipes(tiny):
    """`wmss_trl.weak` (the core) finds a model's tokenizer with transformers, without importing `wmss_trl.recipes`."""
    code = (
        "import sys\nfrom wmss_trl.vocab import find_tokenizer\n"
        f"tok, source = find_tokenizer({tiny['strong']!r})\n"
        "assert tok is not None and source.startswith('from '), source\n"
        "assert not any(m.startswith('wmss_trl.recipes') for m in sys.modules), sorted(sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
