"""Saturation diagnostics against naive per-token loops and autograd."""

import pytest
import torch

from wmss_trl.diagnostics import logit_margins, nontarget_grad_norm, weak_topk_share


def data(n=13, v=17, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * spread
    zw = torch.randn(n, v, generator=g, dtype=torch.float64) * spread
    y = torch.randint(0, v, (n,), generator=g)
    return zs, zw, y


def test_logit_margins_match_a_loop():
    zs, _, y = data()
    mean_m, min_m = logit_margins(zs, y)
    for i in range(zs.shape[0]):
        others = [zs[i, k].item() for k in range(zs.shape[1]) if k != y[i]]
        assert mean_m[i].item() == pytest.approx(zs[i, y[i]].item() - sum(others) / len(others), abs=1e-5)
        assert min_m[i].item() == pytest.approx(zs[i, y[i]].item() - max(others), abs=1e-5)
    assert mean_m.dtype == min_m.dtype == torch.float32


def test_logit_margins_of_bf16_logits_are_fp32():
    zs, _, y = data()
    mean_m, min_m = logit_margins(zs.bfloat16(), y)
    ref_mean, ref_min = logit_margins(zs.bfloat16().double(), y)
    torch.testing.assert_close(mean_m, ref_mean)
    torch.testing.assert_close(min_m, ref_min)


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.3])
def test_nontarget_grad_norm_is_the_autograd_gradient_off_the_target(lam):
    zs, zw, y = data(seed=1)
    # the gradient of CE(lam z_s + (1 - lam) z_w) w.r.t. z_s, by autograd
    a = zs.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(lam * a + (1 - lam) * zw, y, reduction="sum").backward()
    p_mix = torch.softmax(lam * zs + (1 - lam) * zw, -1)
    got = nontarget_grad_norm(p_mix, y, scale=lam)
    for i in range(zs.shape[0]):
        ref = sum(a.grad[i, k].item() ** 2 for k in range(zs.shape[1]) if k != y[i]) ** 0.5
        assert got[i].item() == pytest.approx(ref, rel=1e-5)
    # plain SFT: scale 1 on p_strong
    b = zs.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(b, y, reduction="sum").backward()
    off = b.grad.clone()
    off[torch.arange(len(y)), y] = 0
    torch.testing.assert_close(nontarget_grad_norm(torch.softmax(zs, -1), y), off.norm(dim=-1).float())


def test_nontarget_grad_norm_vanishes_when_saturated():
    v = 9
    z = torch.zeros(2, v)
    z[0, 3] = 50.0  # confident and right
    y = torch.tensor([3, 3])
    norm = nontarget_grad_norm(torch.softmax(z, -1), y)
    assert norm[0].item() < 1e-20
    assert norm[1].item() == pytest.approx(((v - 1) / v**2) ** 0.5, rel=1e-6)  # uniform: sqrt((V-1)/V^2)


@pytest.mark.parametrize("k", [1, 5, 16, 40])
def test_weak_topk_share_matches_a_loop(k):
    zs, zw, y = data(seed=2)
    lam = 0.5
    # the gradient on the strong logits (by autograd), the quantity whose mass is shared out
    a = zs.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(lam * a + (1 - lam) * zw, y, reduction="sum").backward()
    p_mix = torch.softmax(lam * zs + (1 - lam) * zw, -1)
    got = weak_topk_share(p_mix, zw, y, k=k)
    for i in range(zs.shape[0]):
        others = [j for j in range(zs.shape[1]) if j != y[i]]
        top = sorted(others, key=lambda j: -zw[i, j].item())[: min(k, len(others))]
        ref = sum(a.grad[i, j].item() for j in top) / sum(a.grad[i, j].item() for j in others)
        assert got[i].item() == pytest.approx(ref, rel=1e-5)
    if k >= zs.shape[1] - 1:
        torch.testing.assert_close(got, torch.ones_like(got))


def test_weak_topk_share_ignores_the_weak_models_target_logit_and_survives_underflow():
    v = 8
    p = torch.full((2, v), 1.0 / v)
    zw = torch.arange(v, dtype=torch.float32).repeat(2, 1)  # weak top tokens: 7, 6, 5, ...
    y = torch.tensor([7, 0])
    share = weak_topk_share(p, zw, y, k=2)
    # row 0: the target 7 is excluded, so T_2 = {6, 5}: 2 of the 7 non-target tokens
    assert share[0].item() == pytest.approx(2 / 7)
    assert share[1].item() == pytest.approx(2 / 7)
    # p_y == 1 exactly: no non-target mass, share 0 (not NaN)
    p1 = torch.zeros(1, v)
    p1[0, 3] = 1.0
    assert weak_topk_share(p1, zw[:1], torch.tensor([3])).item() == 0.0


# ---- the fused loss's diagnostics columns ---------------------------------------------------------------------


def naive_diagnostics(zs, zw, y, lam):
    """Independent: per token, by autograd (the CE gradients on the strong logits) and python loops."""
    rows = []
    a = zs.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(a if zw is None else lam * a + (1 - lam) * zw, y, reduction="sum").backward()
    b = zs.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(b, y, reduction="sum").backward()
    for i in range(len(y)):
        t = y[i].item()
        others = [k for k in range(zs.shape[1]) if k != t]
        margin = zs[i, t].item() - sum(zs[i, k].item() for k in others) / len(others)
        min_margin = zs[i, t].item() - max(zs[i, k].item() for k in others)
        sft = sum(b.grad[i, k].item() ** 2 for k in others) ** 0.5
        mixed = sum(a.grad[i, k].item() ** 2 for k in others) ** 0.5
        share = 0.0
        if zw is not None:
            top = sorted(others, key=lambda k: -zw[i, k].item())[:5]
            share = sum(a.grad[i, k].item() for k in top) / sum(a.grad[i, k].item() for k in others)
        rows.append([margin, min_margin, sft, mixed, share])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("lam,weak", [(0.5, True), (0.3, True), (1.0, False)])
def test_fused_loss_diagnostics_match_naive(lam, weak):
    from wmss_trl.mixing import DIAGNOSTIC_NAMES, STAT_NAMES, logits_stats, mixed_head_loss

    torch.manual_seed(3)
    n, hidden, vocab = 11, 6, 23
    head_s = torch.nn.Linear(hidden, vocab, bias=True).double()
    head_w = torch.nn.Linear(hidden, vocab, bias=False).double().requires_grad_(False)
    h_s = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True) * 2
    h_w = torch.randn(n, hidden, dtype=torch.float64) * 2
    y = torch.randint(0, vocab, (n,))
    with torch.no_grad():
        zs, zw = head_s(h_s), head_w(h_w) if weak else None
    ref = naive_diagnostics(zs, zw, y, lam)

    loss, stats = mixed_head_loss(
        h_s, head_s, h_w if weak else None, head_w if weak else None, y, lam, chunk_size=4, diagnostics=True
    )
    assert stats.shape == (n, len(STAT_NAMES) + len(DIAGNOSTIC_NAMES))
    got = stats[:, len(STAT_NAMES) :].double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # without diagnostics: the same loss and statistics, fewer columns
    loss2, stats2 = mixed_head_loss(h_s, head_s, h_w if weak else None, head_w if weak else None, y, lam, 4)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(stats2, stats[:, : len(STAT_NAMES)])
    # the logits path gives the same columns, skipping ignored positions
    targets = torch.cat([y, torch.full((2,), -100)])
    pad = torch.zeros(2, vocab, dtype=torch.float64)
    got_logits = logits_stats(
        torch.cat([zs, pad]), None if zw is None else torch.cat([zw, pad]), targets, lam, 3, diagnostics=True
    )
    torch.testing.assert_close(got_logits, stats, rtol=1e-5, atol=1e-6)


def test_fused_loss_without_weak_model_is_sft_cross_entropy():
    from wmss_trl.mixing import mixed_head_loss

    torch.manual_seed(4)
    head = torch.nn.Linear(5, 13, bias=True).double()
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (7,))
    loss, _ = mixed_head_loss(h, head, None, None, y, 1.0, 3, diagnostics=True)
    (0.7 * loss).backward()
    got = h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    h.grad = None
    head.zero_grad()
    ref = torch.nn.functional.cross_entropy(head(h), y, reduction="sum")
    (0.7 * ref).backward()
    torch.testing.assert_close(loss.double(), ref.detach())
    for a, b in zip(got, (h.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="needs lam=1.0"):
        mixed_head_loss(h, head, None, None, y, 0.5)


# ---- as WMSSSFTTrainer metrics --------------------------------------------------------------------------------


def trained_logits(model, batch):
    """Full fp64 logits of ``model`` at the trained positions of ``batch`` and their targets (flattened)."""
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return z[mask], labels[mask]


def make_trainer(tiny, tmp_path, **config):
    from conftest import arithmetic_prompt_completion, cpu_args

    from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer

    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=cpu_args(WMSSSFTConfig, tmp_path, **config),
        train_dataset=arithmetic_prompt_completion(8),
        processing_class=tiny["tokenizer"],
    )
    trainer.state.logging_steps = trainer.args.logging_steps  # as train() sets it (1: every step is logged)
    return trainer


SATURATION = ("logit_margin", "min_margin", "sft_nontarget_grad_norm", "nontarget_grad_norm", "weak_topk_grad_share")


@pytest.mark.parametrize("fused", [True, False])
def test_wdjt_logs_the_saturation_metrics_of_its_tokens(tiny, tmp_path, fused):
    from transformers import AutoModelForCausalLM

    lam = 0.4
    trainer = make_trainer(tiny, tmp_path, weak_model_name_or_path=tiny["weak"], mixing_lambda=lam)
    trainer._fused_head = fused
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    zs, y = trained_logits(trainer.model, batch)
    zw, _ = trained_logits(AutoModelForCausalLM.from_pretrained(tiny["weak"]), batch)
    ref = naive_diagnostics(zs, zw, y, lam).mean(0)
    metrics = trainer._metrics["train"]
    for i, name in enumerate(("logit_margin", "min_margin", "sft_nontarget_grad_norm", "nontarget_grad_norm")):
        assert metrics[f"wmss/{name}"] == [pytest.approx(ref[i].item(), rel=1e-4, abs=1e-6)], name
    assert metrics["wmss/weak_topk_grad_share"] == [pytest.approx(ref[4].item(), rel=1e-4, abs=1e-6)]
    assert 0 < ref[4] < 1  # a real share, not a degenerate 0 or 1


def test_plain_sft_with_saturation_metrics_is_trl_sft_plus_three_metrics(tiny, tmp_path):
    from conftest import arithmetic_prompt_completion, cpu_args
    from trl import SFTConfig, SFTTrainer

    sft = SFTTrainer(
        tiny["strong"],
        args=cpu_args(SFTConfig, tmp_path / "sft"),
        train_dataset=arithmetic_prompt_completion(8),
        processing_class=tiny["tokenizer"],
    )
    trainer = make_trainer(tiny, tmp_path / "wmss", saturation_metrics=True)
    assert trainer.weak_model is None
    batch = next(iter(sft.get_train_dataloader()))
    losses, grads = [], []
    for t in (sft, trainer):
        t.model.train()
        loss = t.compute_loss(t.model, dict(batch))
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in t.model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    ours, trl = trainer._metrics["train"], sft._metrics["train"]
    assert set(ours) == set(trl) | {"wmss/logit_margin", "wmss/min_margin", "wmss/sft_nontarget_grad_norm"}
    for key in trl:  # TRL's entropy, mean_token_accuracy and num_tokens, by TRL's own formula on the same model
        assert ours[key] == pytest.approx(trl[key], rel=1e-5), key
    zs, y = trained_logits(trainer.model, batch)
    ref = naive_diagnostics(zs, None, y, 1.0).mean(0)
    for i, name in enumerate(("logit_margin", "min_margin", "sft_nontarget_grad_norm")):
        assert ours[f"wmss/{name}"] == [pytest.approx(ref[i].item(), rel=1e-4, abs=1e-6)], name


def test_default_plain_sft_logs_no_saturation_metrics_and_off_switch(tiny, tmp_path):
    for config, expect in (
        ({}, set()),  # drop-in: TRL's SFTTrainer
        ({"weak_model_name_or_path": tiny["weak"], "mixing_lambda": 1.0}, set()),  # TRL's loss, weak not loaded
        ({"weak_model_name_or_path": tiny["weak"], "saturation_metrics": False}, {"wmss/mixed_loss"}),
        ({"weak_model_name_or_path": tiny["weak"]}, {"wmss/mixed_loss", *(f"wmss/{n}" for n in SATURATION)}),
    ):
        trainer = make_trainer(tiny, tmp_path, **config)
        trainer.model.train()
        trainer.compute_loss(trainer.model, dict(next(iter(trainer.get_train_dataloader()))))
        got = {k for k in trainer._metrics["train"] if k.startswith("wmss/")}
        assert expect <= got and not (got - expect) & {f"wmss/{n}" for n in SATURATION}, (config, got)


@pytest.mark.parametrize("first", [False, True])
def test_saturation_metrics_computed_on_logged_steps_only(tiny, tmp_path, monkeypatch, first):
    import wmss_trl.sft.loss as sft_module

    calls = []
    original = sft_module.mixed_head_loss

    def spy(*args, **kwargs):
        calls.append(kwargs["diagnostics"])
        return original(*args, **kwargs)

    monkeypatch.setattr(sft_module, "mixed_head_loss", spy)
    trainer = make_trainer(
        tiny,
        tmp_path,
        weak_model_name_or_path=tiny["weak"],
        max_steps=4,
        logging_steps=2,
        logging_first_step=first,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    trainer.train()
    expected_steps = [first, True, False, True]
    assert calls == [s for s in expected_steps for _ in range(2)]  # both micro-batches of a logged step
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == ([1, 2, 4] if first else [2, 4])
    assert all(f"wmss/{n}" in h for h in logs for n in SATURATION)


def test_saturation_metrics_in_plain_sft_refuse_what_its_loss_does_not_do(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"loss_type='dft' is not supported with saturation_metrics=True.*False"):
        make_trainer(tiny, tmp_path, saturation_metrics=True, loss_type="dft")


def test_saturation_metrics_and_train_weak_model_strings_are_booleans(tmp_path):
    from conftest import cpu_args

    from wmss_trl import WMSSSFTConfig

    args = cpu_args(WMSSSFTConfig, tmp_path, saturation_metrics="false", train_weak_model="False")
    assert args.saturation_metrics is False and args.train_weak_model is False
    assert cpu_args(WMSSSFTConfig, tmp_path, saturation_metrics="true").saturation_metrics is True
    with pytest.raises(ValueError, match=r"saturation_metrics must be true or false, got 'maybe'"):
        cpu_args(WMSSSFTConfig, tmp_path, saturation_metrics="maybe")
