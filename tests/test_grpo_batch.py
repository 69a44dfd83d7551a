"""wmss_trl.grpo.batch: the WMSS-GRPO batch assembly as pure functions, without a trainer or a model."""

import torch

from wmss_trl.grpo.batch import (
    SOURCE_POLICY,
    SOURCE_WEAK_NEGATIVE,
    SOURCE_WEAK_UNUSED,
    append_weak_rows,
    extend_logps_fields,
    loss_rows,
    pad_to,
    select_rows,
    weak_row_parents,
)


PAD = 0


def trl_batch():
    """Two policy rows as TRL returns them: prompts left-padded to 3, completions right-padded to 2."""
    return {
        "prompt_ids": torch.tensor([[PAD, 5, 6], [7, 8, 9]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "completion_ids": torch.tensor([[3, PAD], [4, 4]]),
        "completion_mask": torch.tensor([[1, 0], [1, 1]]),
    }


def test_weak_row_parents_give_every_group_k_rows():
    # B = 8 policy rows in groups of G = 4, K = 2 weak rows per group: weak row l takes policy row l * G // K
    parents = weak_row_parents(8, num_generations=4, num_weak_generations=2)
    assert parents == [0, 2, 4, 6]
    assert [p // 4 for p in parents] == [0, 0, 1, 1]
    assert weak_row_parents(4, 4, 4) == [0, 1, 2, 3]


def test_append_weak_rows_pads_to_the_longest_row():
    out = trl_batch()
    new = append_weak_rows(out, [[1, 2, 3, 4], [5]], [[9, 9, 9], [8]], PAD, weak_mask=torch.tensor([True, False]))
    assert new["prompt_ids"].tolist() == [[PAD, PAD, 5, 6], [PAD, 7, 8, 9], [1, 2, 3, 4], [PAD, PAD, PAD, 5]]
    assert new["prompt_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert new["completion_ids"].tolist() == [[3, PAD, PAD], [4, 4, PAD], [9, 9, 9], [8, PAD, PAD]]
    # the second weak row is masked out (e.g. truncated with mask_truncated_completions)
    assert new["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]]
    assert out["prompt_ids"].shape == (2, 3)  # TRL's batch itself is left as it was


def test_extend_logps_fields():
    out = {
        "old_per_token_logps": torch.tensor([[-1.0], [-2.0]]),
        "sampling_per_token_logps": torch.tensor([[-3.0], [-4.0]]),
        "importance_sampling_ratio": torch.tensor([[0.5], [2.0]]),  # sequence level: one column
        "advantages": torch.tensor([1.0, -1.0]),
    }
    extend_logps_fields(
        out, 2, weak_old_logps=torch.tensor([[-5.0, -6.0]]), weak_sampling_logps=torch.tensor([[-7.0, -8.0]])
    )
    assert out["old_per_token_logps"].tolist() == [[-1.0, 0.0], [-2.0, 0.0], [-5.0, -6.0]]
    assert out["sampling_per_token_logps"].tolist() == [[-3.0, 0.0], [-4.0, 0.0], [-7.0, -8.0]]
    assert out["importance_sampling_ratio"].tolist() == [[0.5], [2.0], [1.0]]
    # absent fields stay absent
    bare = {"advantages": torch.zeros(1)}
    extend_logps_fields(bare, 2, torch.zeros(1, 2), torch.zeros(1, 2))
    assert set(bare) == {"advantages"}


def test_loss_rows_drop_padding_and_top_up():
    source = torch.tensor([SOURCE_POLICY, SOURCE_WEAK_UNUSED, SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED])
    assert loss_rows(source, 2).tolist() == [True, False, True, False]
    # another process keeps 3 rows: top up with the first unused row, so every process runs the same count
    assert loss_rows(source, 3).tolist() == [True, True, True, False]
    assert loss_rows(source, 4).tolist() == [True, True, True, True]
    assert source.tolist() == [SOURCE_POLICY, SOURCE_WEAK_UNUSED, SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED]


def test_select_rows_keeps_per_row_tensors_only():
    batch = {
        "completion_ids": torch.arange(6).view(3, 2),
        "advantages": torch.tensor([1.0, 2.0, 3.0]),
        "num_items_in_batch": torch.tensor(7),
        "other": [1, 2, 3],
    }
    kept = select_rows(batch, torch.tensor([True, False, True]))
    assert kept["completion_ids"].tolist() == [[0, 1], [4, 5]] and kept["advantages"].tolist() == [1.0, 3.0]
    assert kept["num_items_in_batch"].item() == 7 and kept["other"] == [1, 2, 3]


def test_pad_to():
    t = torch.tensor([[1, 2]])
    assert pad_to(t, 4, 0).tolist() == [[1, 2, 0, 0]] and pad_to(t, 3, 9, "left").tolist() == [[9, 1, 2]]
    assert pad_to(t, 1, 0) is t
