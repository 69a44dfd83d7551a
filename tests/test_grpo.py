"""WMSS-GRPO: advantage math vs naive formulas, reduction to vanilla GRPO, weak negatives, WD-JT in RL, LoRA, errors."""

import math
import os
import sys

import pytest
import torch


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from grpo_common import digit_fraction, grpo_args, has_digit, prompt_dataset  # noqa: E402

from wmss_trl.advantages import (  # noqa: E402
    advantages_with_weak_negatives,
    entropy_advantage_weights,
    select_weak_negatives,
    truncated_importance_weights,
)


# ------------------------------------------------------------------------------------------------------------------
# pure math
# ------------------------------------------------------------------------------------------------------------------


def naive_entropy_weights(hw, hp, mask, a, b, c, lo=None, hi=None):
    """The WD-DS-style weight written out token by token, with plain Python floats."""
    toks = [(i, j) for i in range(hw.shape[0]) for j in range(hw.shape[1]) if mask[i, j]]
    w_terms = [float(hw[t]) for t in toks]
    drop = [max(0.0, float(hw[t] - hp[t])) for t in toks]
    rise = [max(0.0, float(hp[t] - hw[t])) for t in toks]
    means = [sum(x) / len(toks) for x in (w_terms, drop, rise)]
    raw = []
    for k in range(len(toks)):
        v = 0.0
        for coef, vals, mean in zip((a, b, c), (w_terms, drop, rise), means):
            if mean > 0:
                v += coef * vals[k] / mean
        raw.append(v)
    mean_raw = sum(raw) / len(raw)
    out = torch.zeros(hw.shape, dtype=torch.float64)
    for k, t in enumerate(toks):
        w = raw[k] / mean_raw
        if lo is not None:
            w = max(lo, w)
        if hi is not None:
            w = min(hi, w)
        out[t] = w
    return out


@pytest.mark.parametrize("coefs", [(0.1, 0.8, 0.1), (1.0, 0.0, 0.0), (0.2, 0.3, 0.5)])
def test_entropy_weights_match_naive_formula(coefs):
    g = torch.Generator().manual_seed(0)
    hw, hp = torch.rand(5, 7, generator=g) * 3, torch.rand(5, 7, generator=g) * 3
    mask = torch.rand(5, 7, generator=g) > 0.3
    w = entropy_advantage_weights(hw, hp, mask, coefs)
    expected = naive_entropy_weights(hw, hp, mask, *coefs)
    torch.testing.assert_close(w.double(), expected, rtol=1e-5, atol=1e-6)
    assert w[mask].mean().item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~mask] == 0).all()
    # clipping after normalisation
    wc = entropy_advantage_weights(hw, hp, mask, coefs, min_weight=0.5, max_weight=1.5)
    torch.testing.assert_close(
        wc.double(), naive_entropy_weights(hw, hp, mask, *coefs, 0.5, 1.5), rtol=1e-5, atol=1e-6
    )


def test_entropy_weights_degenerate_cases():
    mask = torch.ones(2, 3, dtype=torch.bool)
    h = torch.full((2, 3), 2.0)
    # policy entropy == weak entropy: only the base term is active, weights = H_w / mean(H_w) = 1
    torch.testing.assert_close(entropy_advantage_weights(h, h, mask), torch.ones(2, 3))
    # all zero: weights fall back to 1
    z = torch.zeros(2, 3)
    torch.testing.assert_close(entropy_advantage_weights(z, z, mask), torch.ones(2, 3))
    # the global statistics: splitting the batch with a summing reducer gives the full-batch weights
    g = torch.Generator().manual_seed(1)
    hw, hp, m = torch.rand(6, 4, generator=g), torch.rand(6, 4, generator=g), torch.rand(6, 4, generator=g) > 0.2
    full = entropy_advantage_weights(hw, hp, m)
    local = {}  # each half's local sums, as the other process would contribute them
    for half, rows in ((0, slice(0, 3)), (1, slice(3, 6))):
        entropy_advantage_weights(hw[rows], hp[rows], m[rows], reduce_sum=lambda t, h=half: local.setdefault(h, t))
    part0 = entropy_advantage_weights(hw[:3], hp[:3], m[:3], reduce_sum=lambda t: t + local[1])
    part1 = entropy_advantage_weights(hw[3:], hp[3:], m[3:], reduce_sum=lambda t: t + local[0])
    torch.testing.assert_close(torch.cat([part0, part1]), full)


def test_select_weak_negatives():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, float("nan"), 0.2, 0.0]])
    plaus = torch.tensor([[-1.0, -0.5, -0.1, -3.0], [-1.0, -1.0, -1.0, -1.0], [-2.0, -0.1, -0.3, -1.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    sel = select_weak_negatives(rewards, plaus, threshold=0.5, max_negatives=2, valid=valid)
    expected = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]]).bool()
    assert torch.equal(sel, expected)  # the 2 most plausible wrong ones; never right, NaN or invalid
    assert torch.equal(select_weak_negatives(rewards, plaus, 0.5, 1, valid).sum(1), torch.tensor([1, 0, 1]))


def trl_group_advantages(rewards, scale="group"):
    """TRL 1.16's inline formula (sum_then_normalize), written out."""
    from trl.trainer.utils import nanstd

    g = rewards.shape[1]
    mean = torch.nanmean(rewards, dim=1, keepdim=True)
    if scale == "group":
        std = nanstd(rewards, dim=1).unsqueeze(1)
    elif scale == "batch":
        std = nanstd(rewards.flatten()).expand(rewards.shape[0], 1)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    assert adv.shape[1] == g
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_with_weak_negatives(scale):
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, float("nan"), 0.5]])
    weak = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.4, 0.0]])
    selected = torch.tensor([[1, 0], [1, 1], [0, 0]]).bool()
    from trl.trainer.utils import nanstd

    batch_std = nanstd(rewards.flatten())
    adv, wadv, touched = advantages_with_weak_negatives(rewards, weak, selected, scale, batch_std)
    assert touched.tolist() == [True, True, False]
    # untouched group: exactly TRL's advantages
    torch.testing.assert_close(adv[2], trl_group_advantages(rewards, scale)[2])
    # touched groups: statistics over policy rewards + selected negatives
    for i in (0, 1):
        pooled = torch.cat([rewards[i], weak[i][selected[i]]])
        mean = pooled.mean()
        div = {"group": pooled.std() + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
        torch.testing.assert_close(adv[i], (rewards[i] - mean) / div)
        expected_w = torch.where(selected[i], ((weak[i] - mean) / div).clamp(max=0), torch.zeros(2))
        torch.testing.assert_close(wadv[i], expected_w)
    assert (wadv <= 0).all() and (wadv[~selected] == 0).all()
    # an all-correct group gets a learning signal from its negatives
    assert (adv[1] > 0).all()


def test_weak_negative_advantage_never_positive():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rewards = torch.rand(8, 4, generator=g).round()
        weak = torch.rand(8, 3, generator=g)
        sel = select_weak_negatives(weak, torch.rand(8, 3, generator=g), 0.9, 2)
        for scale in ("group", "batch", "none"):
            _, wadv, _ = advantages_with_weak_negatives(rewards, weak, sel, scale, torch.tensor(0.5))
            assert (wadv <= 0).all()


def test_truncated_importance_weights_bounded():
    pol = torch.tensor([[-1.0, -0.1, 50.0, -2.0], [-5.0, -1.0, -1.0, -1.0]])
    beh = torch.tensor([[-2.0, -0.1, -50.0, -1.0], [-1.0, -1.0, 200.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    rho = truncated_importance_weights(pol, beh, mask, clip=2.0)
    expected = torch.minimum(torch.exp(pol - beh), torch.tensor(2.0)) * mask
    torch.testing.assert_close(rho, expected)
    assert torch.isfinite(rho).all() and (rho >= 0).all() and (rho <= 2.0).all()
    with pytest.raises(ValueError):
        truncated_importance_weights(pol, beh, mask, clip=0.0)


# ------------------------------------------------------------------------------------------------------------------
# config validation
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(
                per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=8, num_weak_generations=1
            ),
            "breaks the batch layout",
        ),
        (dict(num_weak_generations=2, max_weak_negatives=3), "max_weak_negatives"),
        (dict(num_weak_generations=1, multi_objective_aggregation="normalize_then_sum"), "sum_then_normalize"),
        (
            dict(
                entropy_weighted_advantages=True, entropy_weight_alpha=0, entropy_weight_beta=0, entropy_weight_gamma=0
            ),
            "at least one of entropy_weight_alpha, entropy_weight_beta, entropy_weight_gamma must be > 0",
        ),
        (
            dict(entropy_weight_min=2.0, entropy_weight_max=1.0),
            r"entropy_weight_min \(2.0\) must be <= entropy_weight_max",
        ),
    ],
)
def test_config_rejects_bad_values(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        grpo_args(tmp_path, **kw)


# every numeric WMSS field: values refused (non-finite, out of range, not a number) and a string that is kept converted
NUMERIC_FIELDS = {
    # field: (refused values, (accepted string, stored value), extra config the field needs)
    "mixing_lambda": ([0.0, 1.5, -0.5, float("nan"), "half"], ("0.5", 0.5), {}),
    "mixing_chunk_size": ([0, -3, 2.5, "many"], ("64", 64), {}),
    "num_weak_generations": ([-1, 1.5, "two"], ("2", 2), {}),
    "max_weak_negatives": ([0, 3, 1.5, "one"], ("1", 1), {"num_weak_generations": 2}),
    "weak_negative_threshold": ([float("nan"), float("inf"), "low"], ("0.25", 0.25), {}),
    "weak_is_clip": ([0.0, -1.0, float("nan"), float("inf")], ("1.5", 1.5), {}),
    "entropy_weight_alpha": ([-0.1, float("nan"), "a"], ("0.2", 0.2), {}),
    "entropy_weight_beta": ([-0.1, float("inf")], ("0.7", 0.7), {}),
    "entropy_weight_gamma": ([-1.0, float("nan")], ("0.3", 0.3), {}),
    "entropy_weight_min": ([-0.1, float("nan"), "low"], ("0.5", 0.5), {}),
    "entropy_weight_max": ([-1.0, 0.0, float("nan"), float("inf")], ("2", 2.0), {}),
    "weak_rollout_prefetch": ([-1, 0.5, "x"], ("2", 2), {}),
}


@pytest.mark.parametrize("name", sorted(NUMERIC_FIELDS))
def test_every_numeric_field_is_validated_and_converted(tmp_path, name):
    """Each numeric WMSS field is refused when non-finite, out of range or not a number (e.g. entropy_weight_max=-1
    would flip the sign of every token advantage, weak_negative_threshold=NaN would make no answer wrong), with its
    name in the message; a numeric string (as from some YAML/JSON paths) is stored as the number."""
    refused, (text, value), extra = NUMERIC_FIELDS[name]
    for bad in refused:
        with pytest.raises(ValueError, match=name):
            grpo_args(tmp_path, **extra, **{name: bad})
    args = grpo_args(tmp_path, **extra, **{name: text})
    stored = getattr(args, name)
    assert stored == value and type(stored) is type(value), (stored, type(stored))


def test_string_mixing_lambda_trains(tiny, tmp_path):
    """mixing_lambda="0.5" is kept as the float 0.5: the trainer builds and a WD-JT step runs (a bare TypeError from
    comparing a string before)."""
    from wmss_trl import WMSSGRPOTrainer

    wmss = make(WMSSGRPOTrainer, tiny, tmp_path, weak_model=tiny["weak"], mixing_lambda="0.5", max_steps=1)
    assert wmss.mixing_lambda == 0.5
    wmss.train()
    assert math.isfinite(wmss.state.log_history[0]["loss"])


def test_config_divisibility_accepts_valid_layout(tmp_path):
    args = grpo_args(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=8,
        num_weak_generations=2,
    )
    assert args.max_weak_negatives == 2 and args.needs_weak_model


# ------------------------------------------------------------------------------------------------------------------
# trainer helpers
# ------------------------------------------------------------------------------------------------------------------


def make(cls, tiny, tmp_path, reward=has_digit, **kw):
    from wmss_trl.toy import load_tokenizer

    weak = kw.pop("weak_model", None)
    peft_config = kw.pop("peft_config", None)
    config_class = kw.pop("config_class", None)
    dataset = kw.pop("train_dataset", None) or prompt_dataset(16)
    # a generation batch of 8 rows (2 prompts x 4 generations): what `generate(trainer, 2)` passes, as TRL would
    kw.setdefault("per_device_train_batch_size", 8)
    args = grpo_args(tmp_path / cls.__name__, **({"config_class": config_class} if config_class else {}), **kw)
    extra = {"weak_model": weak} if weak is not None else {}
    trainer = cls(
        tiny["strong"],
        reward,
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer(tiny["strong"]),
        peft_config=peft_config,
        **extra,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def generation_inputs(trainer, n_prompts):
    ds = trainer.train_dataset
    return [dict(ds[i]) for i in range(n_prompts) for _ in range(trainer.num_generations)]


def generate(trainer, n_prompts, seed=0):
    """TRL's generation step on ``n_prompts`` prompts: one generation batch, as TRL's dataloader hands it over."""
    assert n_prompts * trainer.num_generations == trainer.args.generation_batch_size, "not one generation batch"
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions(generation_inputs(trainer, n_prompts))


def loss_and_grads(trainer, batch, compute=None):
    """Loss and per-parameter gradients of ``compute(model, batch)`` (default: the trainer's ``compute_loss``)."""
    trainer.model.zero_grad()
    loss = (compute or trainer.compute_loss)(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


# ------------------------------------------------------------------------------------------------------------------
# reduction to vanilla GRPO
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["no_weak", "weak_unused", "weak_ref_same_weights", "weak_ref_same_weights_grpo_loss", "mixing_lambda_1"],
)
def test_options_off_is_vanilla_grpo(tiny, tmp_path, case):
    """Same generated batch, same loss, same gradients as TRL's GRPOTrainer."""
    from trl import GRPOConfig, GRPOTrainer

    from wmss_trl import WMSSGRPOTrainer

    kw = {}
    wmss_kw = {}
    if case == "weak_unused":
        wmss_kw["weak_model"] = tiny["weak"]
    if case.startswith("weak_ref_same_weights"):
        # the KL reference is the weak model; a weak checkpoint with the policy's weights must reproduce TRL's
        # own reference (a copy of the policy) bit for bit
        kw["beta"] = 0.04
        wmss_kw["weak_model"] = tiny["strong"]
    if case.endswith("grpo_loss"):
        kw["loss_type"] = "grpo"
    if case == "mixing_lambda_1":
        wmss_kw["mixing_lambda"] = 1.0
        kw["beta"] = 0.04
    vanilla = make(GRPOTrainer, tiny, tmp_path, config_class=GRPOConfig, **kw)
    wmss = make(WMSSGRPOTrainer, tiny, tmp_path, **kw, **wmss_kw)
    if case.startswith("weak_ref_same_weights"):
        assert wmss.ref_model is wmss.weak_model is not None
    batch_v, batch_w = generate(vanilla, 2), generate(wmss, 2)
    batch_w.pop("wmss_source", None)
    assert batch_v.keys() == batch_w.keys()
    for key in batch_v:
        assert torch.equal(batch_v[key], batch_w[key]), key
    loss_v, grads_v = loss_and_grads(vanilla, batch_v)
    loss_w, grads_w = loss_and_grads(wmss, batch_w)
    assert torch.equal(loss_v, loss_w)
    assert grads_v.keys() == grads_w.keys() and len(grads_v) > 0
    for name in grads_v:
        assert torch.equal(grads_v[name], grads_w[name]), name


# ------------------------------------------------------------------------------------------------------------------
# weak negatives inside the trainer
# ------------------------------------------------------------------------------------------------------------------


def test_weak_negatives_batch_layout_and_advantages(tiny, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.grpo import SOURCE_POLICY, SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED

    common = dict(per_device_train_batch_size=16, gradient_accumulation_steps=2, num_generations=4)
    wmss = make(
        WMSSGRPOTrainer, tiny, tmp_path, weak_model=tiny["weak"], num_weak_generations=2, weak_is_clip=1.5, **common
    )
    vanilla = make(GRPOTrainer, tiny, tmp_path, config_class=GRPOConfig, **common)
    n_prompts, g, k = 8, 4, 2  # B = 4 * 2 * 4 = 32 policy rows... of 8 groups; n_w = 32 * 2 / 4 = 16
    out = generate(wmss, n_prompts)
    ref = generate(vanilla, n_prompts)  # same seed: the same policy samples (weak sampling comes after)
    n_pol, n_weak = n_prompts * g, n_prompts * k
    assert out["prompt_ids"].size(0) == n_pol + n_weak
    assert (n_pol + n_weak) % wmss.args.steps_per_generation == 0
    source = out["wmss_source"]
    assert (source[:n_pol] == SOURCE_POLICY).all() and (source[n_pol:] != SOURCE_POLICY).all()
    assert torch.equal(out["completion_ids"][:n_pol, : ref["completion_ids"].size(1)], ref["completion_ids"])

    stats = wmss.wmss_stats.negatives
    touched, selected = stats["touched"], stats["selected"]
    assert touched.any() and not touched.all(), "the seed should give groups with and without wrong weak answers"
    assert (selected.sum(1) <= wmss.max_weak_negatives).all()

    adv = out["advantages"]
    assert adv.shape == out["completion_ids"].shape  # token-level: the IS weights of the weak rows
    mask = out["completion_mask"].bool()
    # policy rows: unchanged in groups without a wrong weak answer, recomputed with the negatives otherwise
    groups = torch.arange(n_pol) // g
    for i in range(n_pol):
        if not touched[groups[i]]:
            assert torch.equal(adv[i], torch.full_like(adv[i], ref["advantages"][i].item())), i
        else:
            pooled = torch.cat(
                [stats["policy_rewards"][groups[i]], stats["weak_rewards"][groups[i]][selected[groups[i]]]]
            )
            expected = (stats["policy_rewards"][groups[i]][i % g] - pooled.mean()) / (pooled.std() + 1e-4)
            torch.testing.assert_close(adv[i], expected.expand_as(adv[i]))
    # weak rows: never a positive advantage; unused rows carry nothing
    weak_rows = slice(n_pol, None)
    assert (adv[weak_rows] <= 0).all()
    unused = source == SOURCE_WEAK_UNUSED
    assert not mask[unused].any() and (adv[unused] == 0).all()
    negatives = source == SOURCE_WEAK_NEGATIVE
    assert negatives.sum() == selected.sum()
    # importance weights in [0, c], exactly min(pi_old / pi_weak, c) on the negatives' tokens
    rho = wmss.wmss_stats.is_weight
    assert (rho >= 0).all() and (rho <= 1.5).all() and (rho[:n_pol] == 1).all()
    dbg = wmss.wmss_stats
    behaviour = torch.cat([torch.zeros(n_pol, dbg.behaviour_logps.size(1)), dbg.behaviour_logps])
    expected = torch.minimum(torch.exp(dbg.policy_logps - behaviour), torch.tensor(1.5))
    torch.testing.assert_close(rho[negatives][mask[negatives]], expected[negatives][mask[negatives]])
    # the behaviour log-probs recorded while the weak model sampled are its log softmax(z / T) of a full forward
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)[n_pol:]
    am = torch.cat([out["prompt_mask"][n_pol:], wmss.wmss_stats.weak_mask], 1)
    with torch.no_grad():
        forward_lp, _ = wmss._plain_logps(wmss.weak_model, ids, am, out["completion_ids"].size(1), False)
    sampled = am[:, -out["completion_ids"].size(1) :].bool()
    torch.testing.assert_close(dbg.behaviour_logps[sampled], forward_lp[sampled], rtol=1e-4, atol=1e-4)
    # token advantage of a negative = its sequence advantage x rho
    torch.testing.assert_close(
        adv[negatives] * mask[negatives], stats["weak_adv"][selected].unsqueeze(1) * rho[negatives] * mask[negatives]
    )
    # the loss normaliser counts the negatives' tokens
    assert out["num_items_in_batch"].item() == mask.sum().item()
    # a full step through TRL's shuffle/split and loss
    wmss.args.max_steps = 1
    wmss.train()
    assert math.isfinite(wmss.state.log_history[0]["loss"])
    assert "wmss/weak_negatives_per_group" in wmss.state.log_history[0]


def test_groups_without_wrong_weak_answers_are_untouched(tiny, tmp_path):
    """With no weak completion below the threshold, the policy rows are exactly TRL's and no weak row carries loss."""
    from trl import GRPOConfig, GRPOTrainer

    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.grpo import SOURCE_WEAK_UNUSED

    wmss = make(
        WMSSGRPOTrainer, tiny, tmp_path, weak_model=tiny["weak"], num_weak_generations=2, weak_negative_threshold=-1.0
    )
    vanilla = make(GRPOTrainer, tiny, tmp_path, config_class=GRPOConfig)
    out, ref = generate(wmss, 2), generate(vanilla, 2)
    n = ref["advantages"].size(0)
    assert (out["wmss_source"][n:] == SOURCE_WEAK_UNUSED).all()
    adv = out["advantages"][:n]  # (n,) when the importance weights are applied in the loss, else (n, T)
    adv = adv if adv.dim() == 2 else adv.unsqueeze(1)
    assert torch.equal(adv, ref["advantages"].unsqueeze(1).expand_as(adv))
    assert out["completion_mask"][n:].sum() == 0
    assert out["num_items_in_batch"] == ref["num_items_in_batch"]


def test_policy_sample_logp_is_the_naive_mean_over_the_policy_rows(tiny, tmp_path):
    """``wmss/policy_sample_logp`` (next to ``wmss/weak_negative_logp``) = mean over the policy's own rows of their mean
    token log-prob under the policy, from a plain loop over the batch."""
    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.grpo import SOURCE_POLICY

    wmss = make(WMSSGRPOTrainer, tiny, tmp_path / "plain", weak_model=tiny["weak"], num_weak_generations=2)
    wmss.stats_from_loss = False  # eager without entropy weights: no policy forward over its own rows, no metric
    generate(wmss, 2)
    assert "wmss/weak_negative_logp" in wmss._metrics["train"]
    assert "wmss/policy_sample_logp" not in wmss._metrics["train"]  # never a placeholder value
    wmss = make(
        WMSSGRPOTrainer,
        tiny,
        tmp_path,
        weak_model=tiny["weak"],
        num_weak_generations=2,
        entropy_weighted_advantages=True,
    )
    wmss.stats_from_loss = False  # eager with entropy weights: the policy log-probs of every row are in wmss_stats
    out = generate(wmss, 2)
    logps, mask, source = wmss.wmss_stats.policy_logps, out["completion_mask"], out["wmss_source"]
    per_row = []
    for i in range(logps.size(0)):
        if source[i] == SOURCE_POLICY and mask[i].sum() > 0:
            tokens = [logps[i, t].item() for t in range(logps.size(1)) if mask[i, t] > 0]
            per_row.append(sum(tokens) / len(tokens))
    assert len(per_row) == (source == SOURCE_POLICY).sum().item() > 0
    expected = sum(per_row) / len(per_row)
    assert wmss._metrics["train"]["wmss/policy_sample_logp"][-1] == pytest.approx(expected, rel=1e-5)
    assert wmss._metrics["train"]["wmss/weak_negative_logp"][-1] != pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_importance_weights_from_the_loss_forward_match_eager(tiny, tmp_path, beta):
    """One micro-batch per generation and every wrong answer kept (M = K): the negatives' importance weights (and
    their KL reference) come from the loss's own forward, without the policy forward over the weak rows at
    generation time. Same weights, loss, gradients and metrics as the eager path on the same batch."""
    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.grpo import SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED

    wmss = make(
        WMSSGRPOTrainer, tiny, tmp_path, weak_model=tiny["weak"], num_weak_generations=2, weak_is_clip=1.5, beta=beta
    )
    assert wmss.stats_from_loss and wmss.max_weak_negatives == 2
    names = ("wmss/is_weight_mean", "wmss/is_weight_max", "wmss/weak_negative_logp")

    wmss.stats_from_loss = False  # 1. eager: a policy forward over the weak rows at generation time
    out = generate(wmss, 2)
    assert out["advantages"].dim() == 2 and "wmss_behaviour_logps" not in out
    rho_eager = wmss.wmss_stats.is_weight
    eager_metrics = {k: wmss._metrics["train"][k][-1] for k in names}
    loss_eager, grads_eager = loss_and_grads(wmss, out)

    wmss.stats_from_loss = True  # 2. deferred
    wmss._metrics["train"].clear()
    out_d = generate(wmss, 2)
    assert torch.equal(out_d["completion_ids"], out["completion_ids"])
    assert torch.equal(out_d["wmss_source"], out["wmss_source"])
    assert out_d["advantages"].dim() == 1 and "wmss_behaviour_logps" in out_d
    assert not any(k in wmss._metrics["train"] for k in names)  # logged by the loss, not yet
    loss_d, grads_d = loss_and_grads(wmss, out_d)

    keep = out["wmss_source"] != SOURCE_WEAK_UNUSED  # the rows the loss sees, in order
    neg = (out["wmss_source"] == SOURCE_WEAK_NEGATIVE)[keep]
    mask = out["completion_mask"][keep].bool()
    assert neg.any() and (mask & neg.unsqueeze(1)).any()
    rho_d = wmss.wmss_stats.is_weight
    torch.testing.assert_close(rho_d[mask], rho_eager[keep][mask], rtol=1e-5, atol=1e-6)
    assert (rho_d[~neg] == 1).all() and (rho_d <= 1.5).all()
    assert (rho_d[mask & neg.unsqueeze(1)] - 1).abs().max() > 0.05  # the weights do something to the loss
    torch.testing.assert_close(loss_d, loss_eager, rtol=1e-5, atol=1e-7)
    assert grads_d.keys() == grads_eager.keys()
    for name in grads_eager:
        torch.testing.assert_close(grads_d[name], grads_eager[name], rtol=1e-4, atol=1e-7)
    for k in names:
        assert wmss._metrics["train"][k][-1] == pytest.approx(eager_metrics[k], rel=1e-5, abs=1e-6), k


def test_weak_rows_old_logps_from_the_loss_forward_match_eager(tiny, tmp_path, monkeypatch):
    """With old log-probs in TRL's batch (as TRL keeps under vLLM for its importance correction), the deferred path
    still runs no policy forward over the weak rows at generation time: the weak rows' old log-probs come from the
    loss's forward (one iteration: the same parameters). Same old log-probs, loss and gradients as the eager path,
    whose generation-time forward over the weak rows supplies them."""
    from trl import GRPOTrainer

    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.grpo import SOURCE_POLICY, SOURCE_WEAK_UNUSED

    trl_generate = GRPOTrainer._generate_and_score_completions

    def with_old_logps(self, inputs):  # TRL's vLLM path: a no-grad policy forward over its own rows
        out = trl_generate(self, inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad():
            out["old_per_token_logps"] = GRPOTrainer._get_per_token_logps_and_entropies(
                self, self.model, ids, mask, out["completion_ids"].size(1)
            )[0]
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", with_old_logps)
    wmss = make(WMSSGRPOTrainer, tiny, tmp_path, weak_model=tiny["weak"], num_weak_generations=2, weak_is_clip_max=1.5)
    assert wmss.stats_from_loss and wmss.max_weak_negatives == 2
    rows = []
    forward = WMSSGRPOTrainer._get_per_token_logps_and_entropies
    monkeypatch.setattr(
        WMSSGRPOTrainer,
        "_get_per_token_logps_and_entropies",
        lambda self, model, ids, *a, **k: rows.append(ids.size(0)) or forward(self, model, ids, *a, **k),
    )

    wmss.stats_from_loss = False  # 1. eager: the weak rows' old log-probs from a forward at generation time
    out = generate(wmss, 2)
    n_pol, n_rows = 8, out["completion_ids"].size(0)
    assert rows == [n_rows - n_pol]  # (TRL's old log-probs above call the base method directly)
    old_eager = out["old_per_token_logps"].clone()
    weak = (out["wmss_source"] != SOURCE_POLICY).unsqueeze(1) & out["completion_mask"].bool()
    assert weak.any() and (old_eager[weak] != 0).all()
    loss_eager, grads_eager = loss_and_grads(wmss, out)

    rows.clear()
    wmss.stats_from_loss = True  # 2. deferred: no forward at generation time
    out_d = generate(wmss, 2)
    assert rows == [] and torch.equal(out_d["completion_ids"], out["completion_ids"])
    assert (out_d["old_per_token_logps"][n_pol:] == 0).all()  # not known yet
    seen = {}
    trl_loss = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        loss = trl_loss(self, model, inputs)
        seen["old"] = inputs["old_per_token_logps"].clone()
        return loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    loss_d, grads_d = loss_and_grads(wmss, out_d)
    keep = out["wmss_source"] != SOURCE_WEAK_UNUSED  # the rows the loss sees, in order
    mask = out["completion_mask"][keep].bool()
    torch.testing.assert_close(seen["old"][mask], old_eager[keep][mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_d, loss_eager, rtol=1e-5, atol=1e-7)
    assert grads_d.keys() == grads_eager.keys()
    for name in grads_eager:
        torch.testing.assert_close(grads_d[name], grads_eager[name], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# when the weak model samples: one call per window of P + 1 generation batches (weak_rollout_prefetch = P), keyed by
# (seed, epoch, generation batch, global row)
# ------------------------------------------------------------------------------------------------------------------


def run_with_fake_weak_sampler(tiny, tmp_path, name, resume=None, **kw):
    """Train with a weak sampler that answers each prompt with a completion unique to that prompt and draws no random
    numbers; record its calls and, at every generation, the batch's prompts and weak rows."""
    from wmss_trl import WMSSGRPOTrainer

    trainer = make(
        WMSSGRPOTrainer,
        tiny,
        tmp_path / name,
        weak_model=tiny["weak"],
        num_weak_generations=2,
        logging_steps=100,
        per_device_train_batch_size=4,
        **kw,
    )
    answers, calls, seen = {}, [], []
    eos = trainer.eos_token_ids[0]
    trainer.row_keys = []  # the noise key of every weak row sampled, in call order

    def fake_weak_generate(prompt_ids_list, row_keys):
        calls.append(len(prompt_ids_list))
        trainer.row_keys += row_keys
        ids = [
            answers.setdefault(tuple(p), [10 + len(answers) % 20, 11 + len(answers) % 20, eos])
            for p in prompt_ids_list
        ]
        return [list(x) for x in ids], [[-1.0] * len(x) for x in ids]

    add_wmss = trainer._add_wmss

    def spy(inputs, out):
        out = add_wmss(inputs, out)
        weak = out["wmss_source"] != 0
        rows = [
            (tuple(p[m.bool()].tolist()), tuple(c[cm.bool()].tolist()) if cm.any() else None)
            for p, m, c, cm in zip(
                out["prompt_ids"][weak],
                out["prompt_mask"][weak],
                out["completion_ids"][weak],
                trainer.wmss_stats.weak_mask,
            )
        ]
        seen.append(([x["prompt"][0]["content"] for x in inputs], rows))
        return out

    trainer.weak_sampler.generate, trainer._add_wmss = fake_weak_generate, spy
    torch.manual_seed(0)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, answers, calls, seen


def own_answers(seen, answers) -> bool:
    """Each weak row holds the answer to its own prompt (or is an unused padding row), and some are used."""
    rows = [(p, c) for _, batch in seen for p, c in batch]
    return all(c is None or list(c) == answers[p][: len(c)] for p, c in rows) and any(c is not None for _, c in rows)


def final_weights(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("ga, spg", [(1, 1), (2, 2), (1, 4), (2, 4)])
def test_weak_calls_per_window_of_generation_batches(tiny, tmp_path, ga, spg):
    """Without read-ahead (P = 0) the weak model samples every weak row of the generation batch TRL hands over in one
    call: with ``steps_per_generation = spg`` one call every spg micro-steps with spg times the rows of one micro-batch,
    keyed (seed, epoch, generation batch, global row). With P = 3 the rows of 4 consecutive generation batches come
    from one call, with the same keys in the same order, each weak row answering its own prompt; with a sampler that
    draws no random numbers the two runs are the same run, weight for weight."""
    steps = 8
    kw = dict(max_steps=steps, gradient_accumulation_steps=ga, steps_per_generation=spg)
    per_batch, answers, calls, seen = run_with_fake_weak_sampler(tiny, tmp_path, "p0", weak_rollout_prefetch=0, **kw)
    n_w = spg * 4 * 2 // 4  # weak rows per generation batch: per_device_train_batch_size * spg * K / G
    batches = steps * ga // spg
    assert calls == [n_w] * batches and len(seen) == batches
    assert per_batch.row_keys == [(0, 0, b, j) for b in range(batches) for j in range(n_w)]
    assert own_answers(seen, answers)
    ahead, answers, calls, seen_ahead = run_with_fake_weak_sampler(tiny, tmp_path, "p3", weak_rollout_prefetch=3, **kw)
    assert calls == [n_w * min(4, batches - first) for first in range(0, batches, 4)]
    assert ahead.row_keys == per_batch.row_keys
    assert [s[0] for s in seen_ahead] == [s[0] for s in seen] and own_answers(seen_ahead, answers)
    w0, w3 = final_weights(per_batch), final_weights(ahead)
    assert all(torch.equal(w0[name], w3[name]) for name in w0)


@pytest.mark.parametrize("prefetch, calls", [(0, [2] * 8), (3, [8, 4, 4])])
def test_weak_keys_number_the_generation_batches_per_epoch(tiny, tmp_path, prefetch, calls):
    """Over an epoch boundary the generation batches are numbered per epoch (6 prompts: 6 batches in epoch 0); the
    read-ahead's windows are the epoch's (batches 0-3, 4-5) and stop where training stops (epoch 1: batches 0-1)."""
    trainer, answers, made, seen = run_with_fake_weak_sampler(
        tiny, tmp_path, "run", max_steps=8, train_dataset=prompt_dataset(6), weak_rollout_prefetch=prefetch
    )
    assert made == calls
    assert trainer.row_keys == [(0, e, b, j) for e, n in ((0, 6), (1, 2)) for b in range(n) for j in range(2)]
    assert trainer.generation_clock.epoch is None  # training ended: a direct call is keyed (-1, micro-step // spg)
    assert own_answers(seen, answers)


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize(
    "ga, spg, save_steps, max_steps",
    [(2, 2, 3, 6), (2, 4, 2, 6), (1, 2, 6, 10)],  # the last: 6 prompts, 3 generation batches x 2 steps per epoch
)
def test_weak_keys_resume_from_a_checkpoint(tiny, tmp_path, ga, spg, save_steps, max_steps, prefetch):
    """A run resumed from a checkpoint (at a generation boundary) keys its weak rows like the uninterrupted run: the
    clock counts the batches the resumed run skipped, from the restored ``global_step``, also with
    steps_per_generation > gradient_accumulation_steps and when it resumes at the start of a later epoch. With
    read-ahead a run resumed inside a window samples that whole window again, so its calls are exactly the
    uninterrupted run's calls from that window on (same rows, same keys)."""
    kw = dict(
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps,
        gradient_accumulation_steps=ga,
        steps_per_generation=spg,
        train_dataset=prompt_dataset(6 if ga == 1 else 16),
        weak_rollout_prefetch=prefetch,
    )
    uninterrupted, _, full_calls, full = run_with_fake_weak_sampler(tiny, tmp_path / "full", "run", **kw)
    checkpoint = tmp_path / "full" / "run" / "WMSSGRPOTrainer" / f"checkpoint-{save_steps}"
    assert checkpoint.is_dir()
    resumed, answers, calls, seen = run_with_fake_weak_sampler(
        tiny, tmp_path / "resumed", "run", resume=str(checkpoint), **kw
    )
    done = save_steps * ga // spg  # generation batches before the checkpoint
    assert resumed.state.global_step == max_steps
    assert [s[0] for s in seen] == [s[0] for s in full[done:]]
    n_w = spg * 2
    keys = uninterrupted.row_keys
    if prefetch == 0:
        assert calls == [n_w] * (len(full) - done) and resumed.row_keys == keys[done * n_w :]
    else:  # the uninterrupted run's calls from the one that sampled batch `done` (the window it is in)
        ends = [sum(full_calls[: i + 1]) for i in range(len(full_calls))]
        first_call = next(i for i, end in enumerate(ends) if keys[end - 1][1:3] >= keys[done * n_w][1:3])
        assert calls == full_calls[first_call:]
        assert resumed.row_keys == keys[ends[first_call] - full_calls[first_call] :]
    assert own_answers(seen, answers)


def test_read_ahead_falls_back_when_the_plan_is_wrong(tiny, tmp_path, monkeypatch, caplog):
    """A planned batch that is not the one TRL hands over (here: the plan's batches reversed, as a custom dataloader
    could make them) is never used: the batch is sampled on its own, with a warning, and so is every later one; each
    weak row still answers its own prompt."""
    from wmss_trl.grpo.clock import EpochPlan

    planned = EpochPlan.batches
    monkeypatch.setattr(EpochPlan, "batches", lambda self, first, end: planned(self, first, end)[::-1])
    with caplog.at_level("WARNING", logger="wmss_trl.grpo"):
        trainer, answers, calls, seen = run_with_fake_weak_sampler(
            tiny, tmp_path, "run", max_steps=6, weak_rollout_prefetch=3
        )
    assert calls == [2] * 6 and trainer.weak_sampler.prefetch == 0
    assert "weak read-ahead: the planned generation batch (0, 0) differs" in caplog.text
    assert trainer.row_keys == [(0, 0, b, j) for b in range(6) for j in range(2)]
    assert own_answers(seen, answers)


def test_read_ahead_with_the_real_weak_model_samples_what_per_batch_sampling_samples(tiny, tmp_path):
    """The real weak model, P = 3 vs P = 0: the weak completions of every row are the same tokens (a row's draw depends
    on its key; the other rows of the call change only the padding), their behaviour log-probs equal up to float
    rounding."""
    from wmss_trl import WMSSGRPOTrainer

    out = {}
    for p in (0, 3):
        trainer = make(
            WMSSGRPOTrainer,
            tiny,
            tmp_path / f"p{p}",
            weak_model=tiny["weak"],
            num_weak_generations=2,
            max_steps=8,
            per_device_train_batch_size=4,
            weak_rollout_prefetch=p,
        )
        rows, generate = {}, trainer.weak_sampler.generate

        def recording(prompt_ids_list, row_keys, rows=rows, generate=generate):
            ids, logps = generate(prompt_ids_list, row_keys)
            rows.update({key: (i, lp) for key, i, lp in zip(row_keys, ids, logps, strict=True)})
            return ids, logps

        trainer.weak_sampler.generate = recording
        torch.manual_seed(0)
        trainer.train()
        out[p] = rows
    assert out[0].keys() == out[3].keys() and len(out[0]) == 16
    for key, (ids, logps) in out[0].items():
        assert out[3][key][0] == ids, key
        assert out[3][key][1] == pytest.approx(logps, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("peft", [False, True])
def test_weak_sampling_draws_nothing_from_the_training_rng(tiny, tmp_path, peft):
    """The weak model samples without touching torch's global RNG (the policy's sampling and TRL's shuffle draw from
    it), and a row's completion is a function of its key: the same keys give the same completions, other keys others,
    whatever the other rows of the call."""
    from wmss_trl import WMSSGRPOTrainer

    kw = dict(peft_config=lora(), peft_base_as_weak=True) if peft else dict(weak_model=tiny["weak"])
    wmss = make(WMSSGRPOTrainer, tiny, tmp_path, num_weak_generations=2, temperature=1.3, **kw)
    prompts = wmss._tokenize_prompts([x["prompt"] for x in prompt_dataset(6)])[0]
    keys = [(0, 0, 4, j) for j in range(6)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    ids, logps = wmss.weak_sampler.generate(prompts, keys)
    assert torch.equal(torch.get_rng_state(), state)
    assert len({tuple(x) for x in ids}) > 1 and all(len(a) == len(b) for a, b in zip(ids, logps))
    again, _ = wmss.weak_sampler.generate(prompts[3:], keys[3:])  # rows 3-5 alone: their completions
    assert again == ids[3:]
    other, _ = wmss.weak_sampler.generate(prompts, [(0, 0, 5, j) for j in range(6)])  # the next batch's keys
    assert other != ids


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_padding_rows_do_not_change_the_loss(tiny, tmp_path, loss_type):
    """The loss (and its gradients) over [policy rows + zero-weight weak rows] equals TRL's loss over the policy rows
    alone; also when another process kept more rows and this one tops up with zero-weight rows."""
    from trl import GRPOTrainer

    from wmss_trl import WMSSGRPOTrainer

    wmss = make(
        WMSSGRPOTrainer,
        tiny,
        tmp_path,
        weak_model=tiny["weak"],
        num_weak_generations=2,
        weak_negative_threshold=-1.0,
        loss_type=loss_type,
    )
    out = generate(wmss, 2)
    n = (out["wmss_source"] == 0).sum().item()
    policy_only = {k: (v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in out.items()}
    policy_only.pop("wmss_source")
    loss_policy, grad_policy = loss_and_grads(wmss, policy_only, lambda m, b: GRPOTrainer._compute_loss(wmss, m, b))
    assert max(g.abs().max() for g in grad_policy.values()) > 0  # (the loss is ~0 at step 1: ratio 1, centred A)
    loss_all, grad_all = loss_and_grads(wmss, out)
    torch.testing.assert_close(loss_all, loss_policy, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_all, grad_policy, rtol=1e-5, atol=1e-7)
    # several processes: another process kept every row, so this one tops up with zero-weight rows to the same count
    # (TRL gathers per-row metrics); row-averaged losses are rescaled to the mean over the real rows
    wmss._max_over_processes = lambda count: out["wmss_source"].size(0)
    loss_top, grad_top = loss_and_grads(wmss, out)
    torch.testing.assert_close(loss_top, loss_policy, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_top, grad_policy, rtol=1e-5, atol=1e-7)
    # a micro-batch of padding rows only contributes 0 (one row is kept so every process runs the forward)
    del wmss._max_over_processes
    only_padding = {k: (v[n:] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in out.items()}
    loss_padding = wmss.compute_loss(wmss.model, only_padding)
    assert loss_padding.item() == 0.0
    loss_padding.backward()


def test_negatives_need_a_reward_that_can_mark_wrong(tiny, tmp_path):
    from wmss_trl import WMSSGRPOTrainer

    with pytest.raises(ValueError, match="every reward weight"):
        make(WMSSGRPOTrainer, tiny, tmp_path, weak_model=tiny["weak"], num_weak_generations=1, reward_weights=[0.0])
    with pytest.raises(ValueError, match="weak_correctness_reward"):
        make(
            WMSSGRPOTrainer,
            tiny,
            tmp_path,
            weak_model=tiny["weak"],
            num_weak_generations=1,
            weak_correctness_reward="nope",
        )
    # a named verifier works even when its weight is 0 (it decides wrongness, the other reward drives learning)
    from wmss_trl.toy import load_tokenizer

    args = grpo_args(
        tmp_path / "named", num_weak_generations=1, weak_correctness_reward="has_digit", reward_weights=[0.0, 1.0]
    )
    WMSSGRPOTrainer(
        tiny["strong"],
        [has_digit, digit_fraction],
        args=args,
        train_dataset=prompt_dataset(8),
        processing_class=load_tokenizer(tiny["strong"]),
        weak_model=tiny["weak"],
    )


def test_clear_errors_at_construction(tiny, tmp_path):
    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.toy import build_char_tokenizer, build_tiny_model, save_model_and_tokenizer

    # weak model with another vocabulary
    other_tok = build_char_tokenizer("abc")
    other = save_model_and_tokenizer(build_tiny_model(other_tok, seed=3), other_tok, str(tmp_path / "other"))
    with pytest.raises(ValueError, match="different vocabularies"):
        make(WMSSGRPOTrainer, tiny, tmp_path, weak_model=other, beta=0.04)
    with pytest.raises(ValueError, match="sync_ref_model"):
        make(WMSSGRPOTrainer, tiny, tmp_path, weak_model=tiny["weak"], beta=0.04, sync_ref_model=True)
    with pytest.raises(TypeError, match="args must be a WMSSGRPOConfig"):  # TRL's GRPOConfig is accepted (converted)
        WMSSGRPOTrainer(tiny["strong"], has_digit, args={"beta": 0.0}, train_dataset=prompt_dataset(4))
    with pytest.raises(FileNotFoundError):
        make(WMSSGRPOTrainer, tiny, tmp_path, weak_model=str(tmp_path / "missing"), beta=0.04)


# ------------------------------------------------------------------------------------------------------------------
# drop-in: no weak model = TRL's GRPOTrainer; refusals before any model loads
# ------------------------------------------------------------------------------------------------------------------


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(entropy_weighted_advantages=True), "entropy_weighted_advantages=True needs a weak model"),
        (dict(num_weak_generations=2), "num_weak_generations > 0 needs a weak model"),
        (dict(mixing_lambda=0.5), "mixing_lambda < 1 needs a weak model"),
        (dict(num_weak_generations=2, peft=True), "or, with a PEFT policy, set peft_base_as_weak=True"),
        (dict(peft_base_as_weak=True, beta=0.04), "peft_base_as_weak=True needs a PEFT policy"),
        (dict(peft_base_as_weak=True, weak=True, peft=True), "were both given"),
        (dict(rows=0), r"the training dataset is empty \(0 prompts\)"),
        (dict(rows=3, per_device_train_batch_size=16), "has 3 prompt\\(s\\), fewer than the 4 distinct prompts"),
        (dict(weak=True, beta=0.04, pickle_weak=True), "pickle weights only"),
    ],
)
def test_refused_before_any_model_loads(tiny, tmp_path, kw, message):
    """What cannot run is refused at construction with the fix in the message, before the policy loads (the policy
    path here does not exist, so any later check would fail on loading it instead)."""
    from datasets import Dataset

    from wmss_trl import WMSSGRPOTrainer

    rows, peft, weak = kw.pop("rows", 16), kw.pop("peft", False), kw.pop("weak", False)
    if kw.pop("pickle_weak", False):
        weak = tmp_path / "pickle_weak"
        weak.mkdir()
        (weak / "config.json").write_text("{}")
        (weak / "pytorch_model.bin").write_bytes(b"")
    dataset = prompt_dataset(rows) if rows else Dataset.from_dict({"prompt": []})
    args = grpo_args(tmp_path / "out", **kw)
    with pytest.raises(ValueError, match=message):
        WMSSGRPOTrainer(
            str(tmp_path / "no_such_policy"),
            has_digit,
            args=args,
            train_dataset=dataset,
            peft_config=lora() if peft else None,
            weak_model=str(weak or tiny["weak"]) if weak else None,
        )


def test_pickle_only_policy_refused(tmp_path):
    from wmss_trl import WMSSGRPOTrainer

    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="the policy checkpoint .* has pickle weights only"):
        WMSSGRPOTrainer(str(policy), has_digit, args=grpo_args(tmp_path / "out"), train_dataset=prompt_dataset(8))


@pytest.mark.parametrize("peft", [False, True])
def test_no_weak_model_is_trl_grpo_and_says_so(tiny, tmp_path, caplog, peft):
    """No weak model, no WMSS option: TRL's GRPOTrainer (with a peft_config alone too: TRL's own LoRA run, its
    adapter-disabled reference), the same batch, loss and gradients, and one info line saying WMSS is inactive."""
    import logging

    from trl import GRPOConfig, GRPOTrainer

    from wmss_trl import WMSSGRPOTrainer

    kw = dict(beta=0.04, peft_config=lora()) if peft else {}
    vanilla = make(GRPOTrainer, tiny, tmp_path, config_class=GRPOConfig, **kw)
    with caplog.at_level(logging.INFO, logger="wmss_trl.grpo"):
        wmss = make(WMSSGRPOTrainer, tiny, tmp_path, **kw)
    lines = [r.getMessage() for r in caplog.records if r.name == "wmss_trl.grpo"]
    assert lines == [
        "WMSS inactive: no weak model given, so this is TRL's GRPOTrainer. Pass weak_model= or "
        "weak_model_name_or_path (or peft_base_as_weak=True with PEFT) to enable it."
    ]
    assert wmss.weak_source is None and wmss.weak_model is None and not wmss._wmss_hook
    batch_v, batch_w = generate(vanilla, 2), generate(wmss, 2)
    assert batch_v.keys() == batch_w.keys()
    for key in batch_v:
        assert torch.equal(batch_v[key], batch_w[key]), key
    loss_v, grads_v = loss_and_grads(vanilla, batch_v)
    loss_w, grads_w = loss_and_grads(wmss, batch_w)
    assert torch.equal(loss_v, loss_w) and grads_v.keys() == grads_w.keys() and len(grads_v) > 0
    for name in grads_v:
        assert torch.equal(grads_v[name], grads_w[name]), name


# ------------------------------------------------------------------------------------------------------------------
# entropy weights and WD-JT inside the trainer
# ------------------------------------------------------------------------------------------------------------------


def test_entropy_weighted_advantages_in_trainer(tiny, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from wmss_trl import WMSSGRPOTrainer

    wmss = make(
        WMSSGRPOTrainer,
        tiny,
        tmp_path,
        weak_model=tiny["weak"],
        entropy_weighted_advantages=True,
        entropy_weight_max=3.0,
    )
    vanilla = make(GRPOTrainer, tiny, tmp_path, config_class=GRPOConfig)
    ref = generate(vanilla, 2)
    # 1. weights computed at generation time (the path for steps_per_generation > 1 or num_iterations > 1)
    assert wmss.stats_from_loss  # one micro-batch per generation: the default takes them from the loss
    wmss.stats_from_loss = False
    out = generate(wmss, 2)
    dbg = wmss.wmss_stats
    mask = out["completion_mask"]
    weights = entropy_advantage_weights(dbg.weak_entropy, dbg.policy_entropy, mask, max_weight=3.0)
    torch.testing.assert_close(dbg.entropy_weight, weights)
    torch.testing.assert_close(out["advantages"], ref["advantages"].unsqueeze(1) * weights)
    assert weights.max() <= 3.0
    # the entropies are the models' real token entropies: compare with full-logit computations
    from transformers import AutoModelForCausalLM

    from wmss_trl.entropy import token_entropy

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], mask], 1)
    width = out["completion_ids"].size(1)
    with torch.no_grad():
        for name, path in (("weak_entropy", tiny["weak"]), ("policy_entropy", tiny["strong"])):
            logits = AutoModelForCausalLM.from_pretrained(path)(
                input_ids=ids, attention_mask=am, logits_to_keep=width + 1
            ).logits
            h = token_entropy(logits[:, :-1] / wmss.temperature)
            torch.testing.assert_close(getattr(dbg, name) * mask, h * mask, rtol=1e-4, atol=1e-4)
    loss_eager = wmss.compute_loss(wmss.model, out)

    # 2. deferred: the same weights and loss, from the loss's own forward (no extra policy forward)
    wmss.stats_from_loss = True
    out_deferred = generate(wmss, 2)
    assert torch.equal(out_deferred["completion_ids"], out["completion_ids"])
    assert torch.equal(out_deferred["advantages"], ref["advantages"])  # weights not applied yet
    loss_deferred = wmss.compute_loss(wmss.model, out_deferred)
    torch.testing.assert_close(wmss.wmss_stats.entropy_weight, weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_deferred, loss_eager, rtol=1e-5, atol=1e-7)
    loss_deferred.backward()  # the cached forward keeps its graph
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wmss.model.parameters())


def test_mixed_logprobs_match_naive_and_train(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from wmss_trl import WMSSGRPOTrainer

    lam = 0.3
    wmss = make(WMSSGRPOTrainer, tiny, tmp_path, weak_model=tiny["weak"], mixing_lambda=lam, temperature=0.7)
    batch = generate(wmss, 2)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width = batch["completion_ids"].size(1)
    logps, _, _ = wmss._get_per_token_logps_and_entropies(wmss.model, ids, am, width)
    strong = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    weak = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    with torch.no_grad():
        zs = strong(input_ids=ids, attention_mask=am, logits_to_keep=width + 1).logits[:, :-1] / 0.7
        zw = weak(input_ids=ids, attention_mask=am, logits_to_keep=width + 1).logits[:, :-1] / 0.7
    naive = torch.log_softmax(lam * zs + (1 - lam) * zw, -1).gather(-1, ids[:, -width:, None]).squeeze(-1)
    m = batch["completion_mask"].bool()
    torch.testing.assert_close(logps[m], naive[m], rtol=1e-5, atol=1e-5)
    # gradients reach the policy only; the weak model stays frozen
    loss, grads = loss_and_grads(wmss, batch)
    assert math.isfinite(loss.item()) and len(grads) > 0
    assert all(p.grad is None for p in wmss.weak_model.parameters())
    wmss.args.max_steps = 1
    wmss.train()
    assert math.isfinite(wmss.state.log_history[0]["loss"])


# ------------------------------------------------------------------------------------------------------------------
# LoRA: the adapter-disabled base is the weak model
# ------------------------------------------------------------------------------------------------------------------


def test_lora_with_adapter_disabled_weak_model(tiny, tmp_path):
    from peft import LoraConfig

    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.weak import is_peft_model

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wmss = make(
        WMSSGRPOTrainer,
        tiny,
        tmp_path,
        peft_config=peft_config,
        beta=0.04,
        num_weak_generations=2,
        entropy_weighted_advantages=True,
        per_device_train_batch_size=8,
        log_completions=True,
        peft_base_as_weak=True,
    )
    assert is_peft_model(wmss.model) and wmss.weak_model is None and wmss.weak_source == "peft_base"
    out = generate(wmss, 2)
    # the weak log-probs are the base model's (adapters off), which differ from the policy's (adapters on)
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    base = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    add_fused_lm_head(base, temperature=wmss.temperature)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    width = out["completion_ids"].size(1)
    from trl import GRPOTrainer

    with torch.no_grad():
        base_lp, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(wmss, base, ids, am, width)
    m = out["completion_mask"].bool()
    policy_rows = (out["wmss_source"] == 0)[:, None] & m
    weak_rows = (out["wmss_source"] != 0)[:, None] & m
    assert policy_rows.any() and weak_rows.any()
    # KL reference: the weak model (base) on the policy's samples; on the weak negatives' rows the generating
    # policy itself, so the k3 term never pulls the policy towards the weak model's answers
    torch.testing.assert_close(out["ref_per_token_logps"][policy_rows], base_lp[policy_rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["ref_per_token_logps"][weak_rows], wmss.wmss_stats.policy_logps[weak_rows])
    assert not torch.allclose(wmss.wmss_stats.policy_logps[m], base_lp[m], atol=1e-4)
    before = {n: p.detach().clone() for n, p in wmss.model.named_parameters()}
    wmss.train()
    logs = wmss.state.log_history
    assert all(math.isfinite(h["loss"]) for h in logs if "loss" in h)
    assert logs[0]["wmss/kl_weak_ref"] > 0 and "kl" not in logs[0] and "wmss/weak_accuracy" in logs[0]
    changed = [n for n, p in wmss.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)  # only the adapters train; the weak base is frozen
    # the completions table marks the weak samples
    import glob

    import pandas as pd

    table = pd.read_parquet(sorted(glob.glob(str(tmp_path / "WMSSGRPOTrainer" / "completions" / "*.parquet")))[-1])
    assert set(table["wmss_source"]) <= {"policy", "weak_negative", "weak_unused"}
    assert (table["wmss_source"] == "policy").sum() == 8 and (table["wmss_source"] != "policy").sum() == 4


def test_evaluate_with_wmss_options(tiny, tmp_path):
    """Evaluation runs TRL's eval loop: KL against the weak model, no weak rollouts, no training-only metrics."""
    from wmss_trl import WMSSGRPOTrainer

    wmss = make(
        WMSSGRPOTrainer,
        tiny,
        tmp_path,
        weak_model=tiny["weak"],
        beta=0.04,
        num_weak_generations=2,
        entropy_weighted_advantages=True,
        per_device_eval_batch_size=4,
        eval_strategy="no",
    )
    wmss.model.eval()
    metrics = wmss.evaluate(eval_dataset=prompt_dataset(4))
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_wmss/kl_weak_ref"] > 0 and "eval_kl" not in metrics
    assert not any(k.startswith("eval_wmss/") for k in metrics if k != "eval_wmss/kl_weak_ref")


def test_seed_epoch_order_is_trls_order_in_any_epoch():
    from trl.trainer.utils import RepeatSampler

    from wmss_trl.grpo import seed_epoch_order

    def trl(seed=3):
        return RepeatSampler(list(range(10)), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=seed)

    reference = trl()
    epochs = [list(reference) for _ in range(4)]  # TRL's sampler, uninterrupted: one permutation per epoch
    assert len({tuple(e) for e in epochs}) == 4
    ours, uninterrupted = trl(), []
    for epoch in range(4):
        seed_epoch_order(ours, epoch)
        uninterrupted.append(list(ours))
    assert uninterrupted == epochs
    fresh = trl()  # a resumed process: TRL's sampler replays epoch 0's order in epoch 2
    assert list(fresh) == epochs[0] != epochs[2]
    resumed = trl()
    seed_epoch_order(resumed, 2)
    assert list(resumed) == epochs[2]
    unshuffled = RepeatSampler(list(range(4)), mini_repeat_count=1, shuffle=False)
    seed_epoch_order(unshuffled, 5)
    assert list(unshuffled) == [0, 1, 2, 3]


def test_generation_clock_finds_trls_sampler_through_the_dataloader(tiny, tmp_path):
    """The callback reaches TRL's sampler through the (accelerate-prepared) train dataloader transformers hands the
    callbacks, re-seeds it at on_epoch_begin to the epoch a resumed run starts in (global_step // update steps per
    epoch), and numbers the generation batches from the batches that run skips."""
    from accelerate.data_loader import get_sampler
    from transformers import TrainerControl, TrainerState
    from trl.trainer.utils import RepeatSampler

    from wmss_trl import WMSSGRPOTrainer

    trainer = make(WMSSGRPOTrainer, tiny, tmp_path, per_device_train_batch_size=4, seed=5)
    clock, dataloader = trainer.generation_clock, trainer.get_train_dataloader()
    sampler = get_sampler(dataloader)
    assert isinstance(sampler, RepeatSampler) and clock in trainer.callback_handler.callbacks
    reference = RepeatSampler(trainer.train_dataset, mini_repeat_count=4, batch_size=1, seed=5)
    epochs = [list(reference) for _ in range(3)]
    assert epochs[2][0] != epochs[0][0]  # a fresh sampler's first prompt is not epoch 2's
    per_epoch = len(dataloader)  # 16 prompts, 1 per generation batch, gradient_accumulation_steps = 1
    state, control = TrainerState(global_step=2 * per_epoch + 5), TrainerControl()
    clock.on_train_begin(trainer.args, state, control)
    clock.on_epoch_begin(trainer.args, state, control, train_dataloader=dataloader)
    first = next(iter(dataloader))
    assert [x["prompt"] for x in first] == [trainer.train_dataset[i]["prompt"] for i in epochs[2][:4]]
    assert clock.epoch == 2 and clock.generation_key() == (2, 5)  # 5 skipped batches: this is batch 5 of epoch 2
    trainer._step += 3
    assert clock.generation_key() == (2, 8)
    clock.on_train_end(trainer.args, state, control)
    assert clock.generation_key() == (-1, 3)  # outside training: TRL's micro-step // steps_per_generation


def test_trl_grpo_config_is_accepted(tiny, tmp_path):
    """args=GRPOConfig(...) works as with TRL's trainer (converted, WMSS fields at their defaults)."""
    from trl import GRPOConfig

    from wmss_trl import WMSSGRPOConfig, WMSSGRPOTrainer

    trainer = make(WMSSGRPOTrainer, tiny, tmp_path, config_class=GRPOConfig)
    assert isinstance(trainer.args, WMSSGRPOConfig) and not trainer.wmss_enabled
