"""WD-DS selection: the official weight formula, its edge cases and errors, the draws, and the trainer wiring."""

import json

import numpy as np
import pytest

from wmss_trl.selection import (
    WeightedEpochSampler,
    dataset_wd_ds_weights,
    resample_indices,
    top_fraction_indices,
    wd_ds_weights,
)
from wmss_trl.sft.selection import WEIGHT_COLUMN


# ------------------------------------------------------------------------------------------------------------------
# Independent naive implementations (loops, plain Python floats)
# ------------------------------------------------------------------------------------------------------------------
def naive_wd_ds(h0, h1, a, b, c):
    n = len(h0)
    d = [h1[i] - h0[i] for i in range(n)]
    z1 = sum(h0) or 1e-12
    z2 = sum(-x for x in d if x < 0) or 1e-12
    z3 = sum(x for x in d if x > 0) or 1e-12
    p = []
    for i in range(n):
        v = a * h0[i] / z1
        if d[i] < 0:
            v += b * (-d[i]) / z2
        if d[i] > 0:
            v += c * d[i] / z3
        p.append(max(v, 0.0))
    s = sum(p)
    return [x / s for x in p]


# ------------------------------------------------------------------------------------------------------------------
# wd_ds_weights
# ------------------------------------------------------------------------------------------------------------------
def test_wd_ds_hand_computed():
    # dH = [-0.5, 0.5, 0, -1]; Z1 = 10, Z2 = 1.5, Z3 = 0.5
    # p1 = 0.1*[.1,.2,.3,.4]; p2 = 0.8*[1/3, 0, 0, 2/3]; p3 = 0.1*[0, 1, 0, 0]
    p = wd_ds_weights([1.0, 2.0, 3.0, 4.0], [0.5, 2.5, 3.0, 3.0])
    expected = [0.01 + 0.8 / 3, 0.02 + 0.1, 0.03, 0.04 + 1.6 / 3]
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, expected, rtol=0, atol=1e-15)
    assert p.sum() == pytest.approx(1.0, abs=1e-15)


def test_wd_ds_all_equal_entropy_is_uniform():
    # no drop, no rise: only the alpha term, proportional to equal H0 -> uniform after renormalisation
    p = wd_ds_weights([2.0] * 5, [2.0] * 5)
    np.testing.assert_allclose(p, np.full(5, 0.2), atol=1e-15)


def test_wd_ds_no_rise():
    # dH = [-0.5, 0]: Z3 = 0 -> 1e-12, gamma term vanishes; p = [0.05 + 0.8, 0.05] / 0.9
    p = wd_ds_weights([1.0, 1.0], [0.5, 1.0])
    np.testing.assert_allclose(p, [0.85 / 0.9, 0.05 / 0.9], atol=1e-15)


def test_wd_ds_no_drop():
    # dH = [+0.5, 0]: Z2 = 0 -> 1e-12, beta term vanishes; p = [0.05 + 0.1, 0.05] / 0.2
    p = wd_ds_weights([1.0, 1.0], [1.5, 1.0])
    np.testing.assert_allclose(p, [0.75, 0.25], atol=1e-15)


def test_wd_ds_coefficients_are_mass_shares():
    # with drops, rises and H0 all present, each signal gets exactly its coefficient's share of the mass
    h0 = np.array([1.0, 2.0, 3.0, 1.0])
    h1 = np.array([0.2, 2.5, 1.0, 1.0])
    a, b, c = 0.3, 0.5, 0.2
    p = wd_ds_weights(h0, h1, a, b, c)
    drop, rise = h1 < h0, h1 > h0
    base = a * h0 / h0.sum()
    assert (p[drop] - base[drop]).sum() == pytest.approx(b, abs=1e-12)
    assert (p[rise] - base[rise]).sum() == pytest.approx(c, abs=1e-12)


def test_wd_ds_all_zero_falls_back_to_uniform(caplog):
    p = wd_ds_weights([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(p, [1 / 3] * 3)
    assert "uniform" in caplog.text


@pytest.mark.parametrize("abc", [(0.1, 0.8, 0.1), (0.2, 0.7, 0.1), (1.0, 0.0, 0.0), (0.0, 0.5, 0.5), (0.3, -0.1, 0.4)])
def test_wd_ds_matches_naive_implementation(abc):
    rng = np.random.default_rng(0)
    h0 = rng.gamma(2.0, 1.0, size=200)
    h1 = np.clip(h0 + rng.normal(0, 0.7, size=200), 0, None)
    h1[:10] = h0[:10]  # some unchanged samples
    p = wd_ds_weights(h0, h1, *abc)
    np.testing.assert_allclose(p, naive_wd_ds(h0.tolist(), h1.tolist(), *abc), rtol=1e-12, atol=1e-15)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert (p >= 0).all()


@pytest.mark.parametrize(
    "h0, h1, match",
    [
        ([1.0, float("nan")], [1.0, 1.0], "NaN or infinite"),
        ([1.0, 1.0], [float("inf"), 1.0], "NaN or infinite"),
        ([1.0, -0.1], [1.0, 1.0], "negative"),
        ([1.0, 2.0], [1.0], "mismatched lengths"),
        ([], [], "empty"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "one-dimensional"),
        (["a"], [1.0], "sequence of numbers"),
    ],
)
def test_wd_ds_errors(h0, h1, match):
    with pytest.raises(ValueError, match=match):
        wd_ds_weights(h0, h1)


def test_wd_ds_rejects_non_finite_coefficient():
    with pytest.raises(ValueError, match="beta must be finite"):
        wd_ds_weights([1.0], [1.0], beta=float("nan"))


# ------------------------------------------------------------------------------------------------------------------
# Draws
# ------------------------------------------------------------------------------------------------------------------
def test_resample_is_the_official_draw():
    w = wd_ds_weights([1.0, 2.0, 3.0, 4.0, 0.5], [0.5, 2.5, 3.0, 3.0, 0.5])
    idx = resample_indices(w, multiplier=1.0, seed=42)
    # official: rng = np.random.default_rng(seed); rng.choice(n_orig, size=int(n_orig * multiplier), replace=True, p=w)
    np.testing.assert_array_equal(idx, np.random.default_rng(42).choice(5, size=5, replace=True, p=w))
    assert len(resample_indices(w, multiplier=2.5)) == 12  # floor(5 * 2.5)
    assert not np.array_equal(resample_indices(w, 3.0, seed=1), resample_indices(w, 3.0, seed=2))


def test_resample_frequencies_follow_weights():
    w = np.array([0.0, 0.1, 0.2, 0.7])
    idx = resample_indices(w, multiplier=5000, seed=0)  # 20000 draws
    freq = np.bincount(idx, minlength=4) / len(idx)
    assert freq[0] == 0.0  # zero weight is never drawn
    np.testing.assert_allclose(freq, w, atol=0.015)


def test_resample_errors():
    with pytest.raises(ValueError, match="gives 0 draws"):
        resample_indices([0.5, 0.5], multiplier=0.1)
    with pytest.raises(ValueError, match="sum to zero"):
        resample_indices([0.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        resample_indices([0.5, -0.5])


def test_top_fraction():
    w = [0.1, 0.3, 0.05, 0.3, 0.25, 0.0]
    # ceil(0.5 * 6) = 3 highest: 0.3 (idx 1), 0.3 (idx 3), 0.25 (idx 4); returned in dataset order
    np.testing.assert_array_equal(top_fraction_indices(w, 0.5), [1, 3, 4])
    # tie at the cut: 0.3 / 0.3 -> the lower index wins
    np.testing.assert_array_equal(top_fraction_indices(w, 0.1), [1])
    # zero-weight rows are never kept
    np.testing.assert_array_equal(top_fraction_indices(w, 1.0), [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_indices(w, 0.0)


def test_weighted_epoch_sampler():
    w = wd_ds_weights([1.0, 2.0, 3.0, 4.0, 0.5, 2.0], [0.5, 2.5, 3.0, 3.0, 0.5, 1.0])
    s = WeightedEpochSampler(w, seed=42)
    assert len(s) == 6
    epoch0 = list(s)
    assert epoch0 == resample_indices(w, 1.0, seed=42).tolist()  # epoch 0 = the official draw
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != epoch0  # redrawn each epoch
    # resumable: a fresh sampler (e.g. after a restart) replays any epoch exactly
    t = WeightedEpochSampler(w, seed=42)
    t.set_epoch(1)
    assert list(t) == epoch1
    big = WeightedEpochSampler(w, num_samples=30000, seed=3)
    freq = np.bincount(list(big), minlength=6) / 30000
    np.testing.assert_allclose(freq, w, atol=0.015)


# ------------------------------------------------------------------------------------------------------------------
# Entropy files -> dataset weights
# ------------------------------------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_dataset_weights_lookup_by_idx(tmp_path):
    from datasets import Dataset

    h0 = {10: 1.0, 11: 2.0, 12: 3.0, 13: 4.0, 14: None}
    h1 = {10: 0.5, 11: 2.5, 12: 3.0, 13: 3.0, 14: None}
    f0 = _write_jsonl(tmp_path / "w.jsonl", [{"idx": k, "entropy_0": v} for k, v in h0.items()])
    f1 = _write_jsonl(tmp_path / "s.jsonl", [{"idx": k, "entropy_1": v} for k, v in reversed(h1.items())])
    ds = Dataset.from_dict({"idx": [13, 10, 14, 11, 12], "text": list("abcde")})
    w = dataset_wd_ds_weights(ds, [f0, f1])
    expected = dict(zip([10, 11, 12, 13], wd_ds_weights([1.0, 2.0, 3.0, 4.0], [0.5, 2.5, 3.0, 3.0])))
    np.testing.assert_allclose(w, [expected[13], expected[10], 0.0, expected[11], expected[12]], atol=1e-15)

    # without an idx column, the row number is the key
    ds_rows = Dataset.from_dict({"text": list("ab")})
    f2 = _write_jsonl(
        tmp_path / "m.jsonl",
        [{"idx": 0, "entropy_0": 1.0, "entropy_1": 0.0}, {"idx": 1, "entropy_0": 1.0, "entropy_1": 1.0}],
    )
    np.testing.assert_allclose(
        dataset_wd_ds_weights(ds_rows, [f2]), naive_wd_ds([1.0, 1.0], [0.0, 1.0], 0.1, 0.8, 0.1)
    )


def test_dataset_weights_errors(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"idx": [0, 1, 2], "text": list("abc")})
    partial = _write_jsonl(tmp_path / "p.jsonl", [{"idx": i, "entropy_0": 1.0, "entropy_1": 0.5} for i in (0, 1)])
    with pytest.raises(ValueError, match=r"do not cover the training dataset: 1 of 3 rows .*\[2\]"):
        dataset_wd_ds_weights(ds, [partial])
    one_sided = _write_jsonl(
        tmp_path / "o.jsonl", [{"idx": i, "entropy_0": 1.0, "entropy_1": None if i == 1 else 0.5} for i in range(3)]
    )
    with pytest.raises(ValueError, match="one of"):
        dataset_wd_ds_weights(ds, [one_sided])
    with pytest.raises(ValueError, match="not found"):
        dataset_wd_ds_weights(ds, [partial], strong_column="entropy_9")
    with pytest.raises(FileNotFoundError):
        dataset_wd_ds_weights(ds, [str(tmp_path / "nope.jsonl")])


# ------------------------------------------------------------------------------------------------------------------
# WMSSSFTTrainer wiring
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def entropy_file(tmp_path):
    """Hand-made entropies for the 16-row arithmetic dataset: rows 0-3 drop a lot, the rest barely change."""
    rows = []
    for i in range(16):
        h0 = 2.0 + 0.1 * i
        h1 = h0 - (1.5 if i < 4 else 0.0) + (0.05 if i == 15 else 0.0)
        rows.append({"idx": i, "entropy_0": h0, "entropy_1": h1})
    return _write_jsonl(tmp_path / "entropy.jsonl", rows), rows


def _trainer(tiny, tmp_path, dataset, **kw):
    from conftest import cpu_args

    from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer

    args = cpu_args(WMSSSFTConfig, tmp_path / "out", weak_model_name_or_path=tiny["weak"], **kw)
    return WMSSSFTTrainer(tiny["strong"], args=args, train_dataset=dataset, processing_class=tiny["tokenizer"])


def test_trainer_resample(tiny, tmp_path, sft_dataset, entropy_file):
    path, rows = entropy_file
    trainer = _trainer(tiny, tmp_path, sft_dataset, selection_mode="resample", entropy_files=[path], max_steps=2)
    w = wd_ds_weights([r["entropy_0"] for r in rows], [r["entropy_1"] for r in rows])
    drawn = np.random.default_rng(42).choice(16, size=16, replace=True, p=w)
    # the trainer's dataset is exactly the official draw (prompts identify the rows)
    expected_prompts = [sft_dataset[int(i)]["prompt"] for i in drawn]
    assert trainer.train_dataset["prompt"] == expected_prompts
    assert trainer.selection_stats["unique_samples"] == len(set(drawn.tolist())) < 16
    trainer.train()
    logged = [h["wmss/unique_samples"] for h in trainer.state.log_history if "wmss/unique_samples" in h]
    assert logged == [float(len(set(drawn.tolist())))]


def test_trainer_top_fraction(tiny, tmp_path, sft_dataset, entropy_file):
    path, _ = entropy_file
    trainer = _trainer(
        tiny, tmp_path, sft_dataset, selection_mode="top_fraction", entropy_files=[path], selection_fraction=0.25
    )
    # the 4 big entropy drops carry 80% of the mass: they are the top quarter
    assert trainer.train_dataset["prompt"] == [sft_dataset[i]["prompt"] for i in range(4)]
    assert trainer.selection_stats == {"mode": "top_fraction", "num_rows": 16, "num_selected": 4, "unique_samples": 4}


def test_trainer_weighted_sampler(tiny, tmp_path, sft_dataset, entropy_file):
    path, rows = entropy_file
    trainer = _trainer(
        tiny,
        tmp_path,
        sft_dataset,
        selection_mode="weighted_sampler",
        entropy_files=[path],
        selection_multiplier=2.0,
        max_steps=3,
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, WeightedEpochSampler)
    assert len(sampler) == 32
    w = wd_ds_weights([r["entropy_0"] for r in rows], [r["entropy_1"] for r in rows])
    np.testing.assert_allclose(sampler.weights, w, atol=1e-12)  # aligned with the prepared rows
    assert len(trainer.get_train_dataloader()) == 8  # 32 draws / batch 4
    assert WEIGHT_COLUMN not in next(iter(trainer.get_train_dataloader()))
    trainer.train()
    assert trainer.state.global_step == 3


def test_weighted_sampler_resume_replays_the_same_batches(tiny, tmp_path, sft_dataset, entropy_file):
    """10 steps straight vs 6 steps + resume from the checkpoint: the same batches in the same order, across an epoch
    boundary (16 draws / batch 2 = 8 steps per epoch), and epoch 1 is a fresh draw."""
    path, _ = entropy_file
    common = dict(selection_mode="weighted_sampler", entropy_files=[path], max_steps=10, per_device_train_batch_size=2)

    def run(out, resume=None, **kw):
        trainer = _trainer(tiny, out, sft_dataset, **common, **kw)
        seen = []
        inner = trainer.data_collator

        def recording(examples):
            batch = inner(examples)
            seen.append(batch["input_ids"].tolist())
            return batch

        trainer.data_collator = recording
        trainer.train(resume_from_checkpoint=resume)
        return seen

    straight = run(tmp_path / "a")  # 10 trained batches + 1 that accelerate's dataloader prefetches
    assert len(straight) == 11
    assert straight[8:10] != straight[0:2]  # epoch 1 redraws
    run(tmp_path / "b", save_strategy="steps", save_steps=6)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "out" / "checkpoint-6"))
    assert resumed == straight[6:]  # the 6 batches already trained are skipped, the rest replayed identically


def test_trainer_selection_errors(tiny, tmp_path, sft_dataset, entropy_file):
    from wmss_trl import WMSSSFTConfig

    path, rows = entropy_file
    short = _write_jsonl(tmp_path / "short.jsonl", rows[:10])
    with pytest.raises(ValueError, match="do not cover the training dataset: 6 of 16"):
        _trainer(tiny, tmp_path, sft_dataset, selection_mode="resample", entropy_files=[short])
    with pytest.raises(ValueError, match="needs `entropy_files`"):
        WMSSSFTConfig(output_dir=str(tmp_path), selection_mode="resample", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="selection_mode must be one of"):
        WMSSSFTConfig(output_dir=str(tmp_path), selection_mode="boost", entropy_files=[path], use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="packing"):
        WMSSSFTConfig(
            output_dir=str(tmp_path),
            selection_mode="weighted_sampler",
            entropy_files=[path],
            packing=True,
            use_cpu=True,
            bf16=False,
        )


# ------------------------------------------------------------------------------------------------------------------
# Provenance of the entropy files (their `wmss entropy` sidecars)
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored_files(tiny, tmp_path_factory):
    """`wmss entropy` of the weak (entropy_0) and strong (entropy_1) tiny models on a 16-row dataset."""
    from conftest import arithmetic_prompt_completion

    from wmss_trl.recipes.entropy import main

    root = tmp_path_factory.mktemp("scored")
    data = str(root / "data.jsonl")
    arithmetic_prompt_completion(16).to_json(data)
    files = []
    for model, column in ((tiny["weak"], "entropy_0"), (tiny["strong"], "entropy_1")):
        out = str(root / f"{column}.jsonl")
        main(
            [
                "--model",
                model,
                "--dataset",
                data,
                "--output",
                out,
                "--entropy_column",
                column,
                "--bf16",
                "false",
                "--progress",
                "false",
            ]
        )
        files.append(out)
    return files


def test_entropy_files_of_another_dataset_are_refused(scored_files, tiny, tmp_path):
    from conftest import arithmetic_prompt_completion

    from wmss_trl.io import ProvenanceError

    weights = dataset_wd_ds_weights(arithmetic_prompt_completion(16), scored_files)  # the rows they were made on
    trainer = _trainer(
        tiny, tmp_path, arithmetic_prompt_completion(16), selection_mode="top_fraction", entropy_files=scored_files
    )
    assert trainer.selection_stats["num_rows"] == 16
    assert weights.shape == (16,) and weights.sum() == pytest.approx(1.0)
    other = arithmetic_prompt_completion(16, offset=5)  # same length, other rows
    with pytest.raises(ProvenanceError, match=r"entropy_0\.jsonl.*differs in: dataset\.rows_sha256: "):
        dataset_wd_ds_weights(other, scored_files)
    with pytest.raises(ValueError, match="another dataset than this training dataset.*wmss entropy --dataset"):
        _trainer(tiny, tmp_path, other, selection_mode="resample", entropy_files=scored_files)


def test_incomplete_or_inconsistent_entropy_files_are_refused(scored_files, tmp_path):
    import shutil

    from conftest import arithmetic_prompt_completion

    ds = arithmetic_prompt_completion(16)
    weak, strong = (shutil.copy(p, tmp_path) for p in scored_files)
    for p in scored_files:
        shutil.copy(p + ".meta.json", tmp_path)
    meta = json.load(open(weak + ".meta.json"))
    json.dump({**meta, "complete": False, "num_done": 8}, open(weak + ".meta.json", "w"))
    with pytest.raises(ValueError, match=r"is incomplete \(8 of 16 samples\).*Re-run `wmss entropy`"):
        dataset_wd_ds_weights(ds, [weak, strong])
    json.dump(meta, open(weak + ".meta.json", "w"))
    lines = open(weak).read().splitlines(keepends=True)
    open(weak, "w").writelines(lines[:15])  # a row lost although the file says complete
    with pytest.raises(ValueError, match="holds 15 samples but its sidecar says 16"):
        dataset_wd_ds_weights(ds.select(range(15)), [weak])
