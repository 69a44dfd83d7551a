"""wmss_trl.io: fingerprints, provenance diffs, atomic JSON (the locks: tests/test_locks.py)."""

import json
import time

import pytest
import torch

from wmss_trl.io import (
    ProvenanceError,
    check_provenance,
    dataset_fingerprint,
    loaded_model_fingerprint,
    model_fingerprint,
    provenance_diff,
    write_json_atomic,
)


def test_provenance_diff_names_every_leaf():
    old = {
        "model": {"weights": {"a.safetensors": {"size": 1, "mtime_ns": 5}}},
        "dtype": "float32",
        "dataset": {"rows_sha256": "x", "datasets_fingerprint": "f1"},
        "settings": {"k": [1, 2]},
    }
    new = json.loads(json.dumps(old))
    assert provenance_diff(old, new) == []
    new["dataset"]["datasets_fingerprint"] = "f2"  # a hint only, never compared
    assert provenance_diff(old, new) == []
    new["model"]["weights"]["a.safetensors"]["mtime_ns"] = 6
    new["dtype"] = "bfloat16"
    new["settings"]["k"] = (1, 3)
    assert provenance_diff(old, new) == [
        'dtype: "float32" -> "bfloat16"',
        "model.weights.a.safetensors.mtime_ns: 5 -> 6",
        "settings.k: [1, 2] -> [1, 3]",
    ]
    with pytest.raises(ProvenanceError, match=r"thing.*dtype: \"float32\" -> \"bfloat16\".*Delete it\."):
        check_provenance("thing", old, new, "Delete it.")


def test_model_fingerprint_sees_rewritten_weights_not_copies(tiny, tmp_path):
    import shutil

    from wmss_trl.toy import build_tiny_model

    folder = tmp_path / "m"
    shutil.copytree(tiny["weak"], folder)  # copy2 keeps mtimes: the same fingerprint
    assert model_fingerprint(folder) == model_fingerprint(tiny["weak"])
    fp = model_fingerprint(folder)
    assert set(fp["weights"]) == {"model.safetensors"} and fp["weights"]["model.safetensors"]["header_sha256"]
    time.sleep(0.01)
    build_tiny_model(tiny["tokenizer"], seed=7).save_pretrained(folder)  # same shapes and header, other values
    new = model_fingerprint(folder)
    assert new["weights"]["model.safetensors"]["header_sha256"] == fp["weights"]["model.safetensors"]["header_sha256"]
    assert any("mtime_ns" in d for d in provenance_diff(fp, new))


def test_loaded_model_and_dataset_fingerprints(tiny):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    b = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    assert loaded_model_fingerprint(a) == loaded_model_fingerprint(b)
    strong = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    assert loaded_model_fingerprint(a) != loaded_model_fingerprint(strong)
    assert loaded_model_fingerprint(a.to(torch.bfloat16))["dtype"] == "bfloat16"
    rows = [{"q": str(i), "a": i} for i in range(5)]
    d1, d2 = Dataset.from_list(rows), Dataset.from_dict({"a": list(range(5)), "q": [str(i) for i in range(5)]})
    strip = lambda fp: {k: v for k, v in fp.items() if k != "datasets_fingerprint"}  # noqa: E731
    assert strip(dataset_fingerprint(d1)) == strip(dataset_fingerprint(d2))  # same rows, however built
    d3 = Dataset.from_list([{**r, "a": r["a"] + 1} for r in rows])
    assert provenance_diff(dataset_fingerprint(d1), dataset_fingerprint(d3))[0].startswith("rows_sha256:")


def test_write_json_atomic_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": {(1, 2): 3}})  # fails halfway through the dump (tuple key)
    assert json.loads(path.read_text()) == {"a": 1}  # the failed write did not touch the file


def test_write_jsonl_atomic_replaces_whole_files(tmp_path):
    from wmss_trl.io import write_jsonl_atomic

    path = tmp_path / "rows.jsonl"
    write_jsonl_atomic(path, [{"a": 1}, {"b": [2, 3]}])
    write_jsonl_atomic(path, ({"i": i} for i in range(3)))  # a generator, and a second write over the first
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no .tmp left behind
