"""The importance-weight modes of the weak negatives (``weak_is_mode``, TRL's ``vllm_importance_sampling_mode``
names): each estimator against a naive per-token / per-sequence loop, the config rules, and the mode in a trainer."""

import math
import os
import sys
import warnings

import pytest
import torch


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from grpo_common import grpo_args, has_digit, prompt_dataset  # noqa: E402

from wmss_trl.advantages import IS_MODES, importance_weights, truncated_importance_weights  # noqa: E402


def naive_weights(policy, behaviour, mask, mode, clip_max, clip_min):
    """TRL's rule written out with Python floats, one row and one token at a time (math.exp, explicit ifs)."""
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    out = []
    for p_row, b_row, m_row in zip(policy.tolist(), behaviour.tolist(), mask.tolist()):
        diffs = []
        for p, b, m in zip(p_row, b_row, m_row):
            d = (p - b) * m
            diffs.append(0.0 if math.isnan(d) else d)
        if mode.startswith("sequence"):
            total = 0.0
            for d in diffs:
                total += d
            ratios = [math.exp(total) if total < 700 else math.inf] * len(diffs)
        else:
            ratios = [math.exp(d) if d < 700 else math.inf for d in diffs]
        row = []
        for r, m in zip(ratios, m_row):
            if mode.endswith("truncate"):
                w = min(max(r, low), high)
            else:
                w = r if low <= r <= high else 0.0
            row.append(w * m)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def random_logps(seed, rows=6, tokens=7):
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(rows, tokens, generator=g) * 3
    behaviour = -torch.rand(rows, tokens, generator=g) * 3
    lengths = torch.randint(0, tokens + 1, (rows,), generator=g)
    mask = (torch.arange(tokens) < lengths.unsqueeze(1)).long()
    return policy, behaviour, mask


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("bounds", [(2.0, None), (3.0, 0.5), (None, 0.5), (1.2, 0.9)])
def test_each_mode_matches_naive_loop(mode, bounds):
    clip_max, clip_min = bounds
    for seed in range(5):
        policy, behaviour, mask = random_logps(seed)
        rho = importance_weights(policy, behaviour, mask, mode, clip_max, clip_min)
        expected = naive_weights(policy, behaviour, mask, mode, clip_max, clip_min)
        assert rho.shape == policy.shape and rho.dtype == torch.float32
        torch.testing.assert_close(rho.double(), expected, rtol=1e-5, atol=1e-7)
        # the estimator is one of its mode's: sequence modes give one value per row, masks give 0 or the ratio
        if mode.startswith("sequence"):
            for row, m in zip(rho, mask.bool()):
                assert len(set(row[m].tolist())) <= 1
    # the random draws hit every branch of the bounds (clipped, masked, kept) for at least one seed
    policy, behaviour, mask = random_logps(0)
    token = importance_weights(policy, behaviour, mask, "token_mask", 2.0, 0.5)
    assert ((token == 0) & mask.bool()).any() and ((token > 0) & mask.bool()).any()


def test_sequence_ratio_is_the_product_of_token_ratios():
    """As TRL (grpo_trainer.py: per_token_logps_diff.sum(dim=-1)): the product, not a geometric mean."""
    policy = torch.tensor([[-1.0, -1.0, -1.0, 0.0]])
    behaviour = torch.tensor([[-1.5, -1.5, -1.5, 9.0]])  # each token ratio e^0.5; the last token is masked
    mask = torch.tensor([[1, 1, 1, 0]])
    rho = importance_weights(policy, behaviour, mask, "sequence_truncate", 100.0)
    torch.testing.assert_close(rho, torch.tensor([[math.exp(1.5)] * 3 + [0.0]]))
    # e^1.5 = 4.48 > 3: masked out entirely by sequence_mask, while every token ratio (1.65) is kept by token_mask
    assert (importance_weights(policy, behaviour, mask, "sequence_mask", 3.0) == 0).all()
    torch.testing.assert_close(
        importance_weights(policy, behaviour, mask, "token_mask", 3.0), torch.tensor([[math.exp(0.5)] * 3 + [0.0]])
    )


def test_default_mode_is_the_former_truncation():
    """token_truncate with C_max = c and no C_min is the former min(exp(log pi_old - log pi_w), c) * mask, and
    stays finite for huge log-ratios (clamped in log space)."""
    pol = torch.tensor([[-1.0, -0.1, 50.0, -2.0], [-5.0, -1.0, -1.0, -1.0]])
    beh = torch.tensor([[-2.0, -0.1, -50.0, -1.0], [-1.0, -1.0, 200.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    former = torch.minimum(torch.exp(pol - beh), torch.tensor(2.0)) * mask
    torch.testing.assert_close(importance_weights(pol, beh, mask, "token_truncate", 2.0), former)
    torch.testing.assert_close(truncated_importance_weights(pol, beh, mask, 2.0), former)
    seq = importance_weights(pol, beh, mask, "sequence_truncate", 2.0)
    assert torch.isfinite(seq).all() and seq.max() <= 2.0


def test_nan_log_prob_counts_as_ratio_one():
    """TRL: a NaN sampling log-prob gives a zero log-ratio (ratio 1, no correction), not NaN or 0."""
    pol = torch.tensor([[-1.0, -1.0]])
    beh = torch.tensor([[float("nan"), -1.0]])
    mask = torch.ones(1, 2)
    for mode in IS_MODES:
        torch.testing.assert_close(importance_weights(pol, beh, mask, mode, 2.0), torch.ones(1, 2))


def test_helper_refuses_bad_mode_and_bounds():
    pol, beh, mask = random_logps(0)
    with pytest.raises(ValueError, match="token_truncate, token_mask"):
        importance_weights(pol, beh, mask, "token", 2.0)
    with pytest.raises(ValueError, match="> 0"):
        importance_weights(pol, beh, mask, "token_mask", 0.0)
    with pytest.raises(ValueError, match="below the clip"):
        importance_weights(pol, beh, mask, "sequence_truncate", 1.0, 1.0)


# ---- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(weak_is_mode="sequence"), "weak_is_mode must be one of 'token_truncate'"),
        (dict(weak_is_mode="token_truncate", weak_is_clip_max=None), "needs a bound"),
        (dict(weak_is_clip_max=1.0, weak_is_clip_min=1.0), r"weak_is_clip_min \(1.0\) must be less than"),
        (dict(weak_is_clip_max=0.0), "weak_is_clip_max"),
        (dict(weak_is_clip_max=float("inf")), "weak_is_clip_max"),
        (dict(weak_is_clip_min=-0.5), "weak_is_clip_min"),
        (dict(weak_is_clip_min="low"), "weak_is_clip_min"),
        (dict(weak_is_clip=-1.0), "weak_is_clip"),
    ],
)
def test_config_refuses_bad_is_settings(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        grpo_args(tmp_path, **kw)


def test_config_is_defaults_and_conversions(tmp_path):
    args = grpo_args(tmp_path)
    assert (args.weak_is_mode, args.weak_is_clip_max, args.weak_is_clip_min) == ("token_truncate", 2.0, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults warn about nothing
        grpo_args(tmp_path)
    args = grpo_args(tmp_path, weak_is_mode="sequence_mask", weak_is_clip_max=None, weak_is_clip_min="0.25")
    assert args.weak_is_clip_max is None and args.weak_is_clip_min == 0.25


def test_deprecated_weak_is_clip_becomes_clip_max(tmp_path):
    with pytest.warns(FutureWarning, match="weak_is_clip is deprecated: use weak_is_clip_max"):
        args = grpo_args(tmp_path, weak_is_clip="1.5")
    assert args.weak_is_clip_max == 1.5 and type(args.weak_is_clip_max) is float


# ---- in the trainer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token_mask", "sequence_truncate"])
def test_trainer_applies_the_mode(tiny, tmp_path, mode):
    """The negatives' token weights of a real generation batch are the mode's estimator of the policy and behaviour
    log-probs the trainer recorded, and the negatives' token advantages carry them."""
    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.grpo import SOURCE_WEAK_NEGATIVE
    from wmss_trl.toy import load_tokenizer

    args = grpo_args(
        tmp_path,
        per_device_train_batch_size=16,  # one generation batch of 32 rows = 8 prompts x 4, as TRL hands it over
        gradient_accumulation_steps=2,
        num_weak_generations=2,
        weak_is_mode=mode,
        weak_is_clip_max=1.5,
        weak_is_clip_min=0.5,
    )
    trainer = WMSSGRPOTrainer(
        tiny["strong"],
        has_digit,
        args=args,
        train_dataset=prompt_dataset(16),
        processing_class=load_tokenizer(tiny["strong"]),
        weak_model=tiny["weak"],
    )
    trainer.model.train()
    ds = trainer.train_dataset
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([dict(ds[i]) for i in range(8) for _ in range(4)])
    stats = trainer.wmss_stats
    neg = out["wmss_source"] == SOURCE_WEAK_NEGATIVE
    assert neg.any()
    n_pol = out["wmss_source"].numel() - stats.behaviour_logps.size(0)
    behaviour = torch.cat([torch.zeros(n_pol, stats.behaviour_logps.size(1)), stats.behaviour_logps])
    mask = out["completion_mask"]
    expected = naive_weights(stats.policy_logps[neg], behaviour[neg], mask[neg], mode, 1.5, 0.5)
    torch.testing.assert_close(stats.is_weight[neg].double(), expected, rtol=1e-5, atol=1e-7)
    weak_adv = stats.negatives["weak_adv"][stats.negatives["selected"]]
    torch.testing.assert_close(
        out["advantages"][neg] * mask[neg], weak_adv.unsqueeze(1) * stats.is_weight[neg] * mask[neg]
    )
