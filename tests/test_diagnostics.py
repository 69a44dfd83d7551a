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
