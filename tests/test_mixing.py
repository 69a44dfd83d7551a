"""WD-JT math against a naive autograd computation of the plain formula."""

import math

import pytest
import torch

from wmss_trl.mixing import check_lambda, mixed_cross_entropy, mixed_token_logprobs


def naive_mixed_ce(zs, zw, y, lam, ignore_index=-100):
    """The formula written plainly: CE(lam*z_s + (1-lam)*z_w, y), summed over non-ignored positions."""
    z = lam * zs + (1 - lam) * zw.detach()
    return torch.nn.functional.cross_entropy(
        z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


@pytest.mark.parametrize("lam", [0.5, 0.3, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_loss_and_grad_match_naive_autograd(lam, chunk_size):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3
    zw = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 11, (3, 5), generator=g)
    y[0, :2] = -100
    y[2, 4] = -100

    a = zs.clone().requires_grad_(True)
    loss, n = mixed_cross_entropy(a, zw, y, lam, chunk_size=chunk_size)
    loss.backward()

    b = zs.clone().requires_grad_(True)
    ref = naive_mixed_ce(b, zw, y, lam)
    ref.backward()

    assert n.item() == (y != -100).sum().item()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_strong_gradient_is_lambda_times_pmix_minus_onehot():
    lam = 0.4
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(4, 9, generator=g, dtype=torch.float64).requires_grad_(True)
    zw = torch.randn(4, 9, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 8, 5])
    loss, _ = mixed_cross_entropy(zs, zw, y, lam, chunk_size=3)
    loss.backward()
    p_mix = torch.softmax(lam * zs.detach() + (1 - lam) * zw, -1)
    expected = lam * (p_mix - torch.nn.functional.one_hot(y, 9).double())
    torch.testing.assert_close(zs.grad, expected)


def test_mixed_distribution_is_a_product_of_experts():
    lam = 0.3
    zs, zw = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    y = torch.arange(6).repeat(2, 1)
    logp = mixed_token_logprobs(zs[:, None, :].expand(2, 6, 6), zw[:, None, :].expand(2, 6, 6), y, lam)
    ps, pw = torch.softmax(zs, -1), torch.softmax(zw, -1)
    poe = ps**lam * pw ** (1 - lam)
    poe = poe / poe.sum(-1, keepdim=True)
    torch.testing.assert_close(logp.exp().double(), poe, rtol=1e-5, atol=1e-6)


def test_amplification_on_tokens_the_weak_model_finds_plausible():
    """Saturated strong model, uncertain weak one: the WD-JT gradient on the non-target strong logits is larger
    than plain SFT's (which is just p_strong and vanishes as the model saturates)."""
    vocab, target, lam = 8, 2, 0.5
    zs = torch.full((1, vocab), -4.0, dtype=torch.float64)
    zs[0, target] = 8.0  # p_strong(target) ~ 1
    zw = torch.zeros(1, vocab, dtype=torch.float64)  # uniform weak model
    y = torch.tensor([target])

    a = zs.clone().requires_grad_(True)
    mixed_cross_entropy(a, zw, y, lam)[0].backward()
    b = zs.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(b, y, reduction="sum").backward()

    non_target = torch.arange(vocab) != target
    assert (a.grad[0, non_target] > b.grad[0, non_target]).all()
    assert a.grad[0, non_target].sum() > 10 * b.grad[0, non_target].sum()
    # the target's own gradient does not vanish either
    assert a.grad[0, target].abs() > 10 * b.grad[0, target].abs()


def test_low_precision_inputs_are_mixed_in_fp32():
    g = torch.Generator().manual_seed(3)
    zs = (torch.randn(2, 3, 50, generator=g) * 4).bfloat16()
    zw = (torch.randn(2, 3, 50, generator=g) * 4).bfloat16()
    y = torch.randint(0, 50, (2, 3), generator=g)
    loss, _ = mixed_cross_entropy(zs, zw, y, 0.5, chunk_size=2)
    ref = naive_mixed_ce(zs.double(), zw.double(), y, 0.5)
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)


def test_shape_mismatch_names_the_fix():
    with pytest.raises(ValueError, match="same tokenizer|vocabulary"):
        mixed_cross_entropy(torch.randn(2, 5), torch.randn(2, 6), torch.tensor([0, 1]), 0.5)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_lambda_out_of_range(bad):
    with pytest.raises(ValueError, match="0 < mixing_lambda <= 1"):
        check_lambda(bad)


@pytest.mark.parametrize("lam,chunk_size,bias", [(0.5, 4, False), (0.3, 1024, True), (1.0, 3, False)])
def test_fused_head_loss_matches_naive_autograd(lam, chunk_size, bias):
    """mixed_head_loss (gradient computed in the forward) vs autograd on the plain formula, with a non-unit
    upstream gradient as gradient accumulation / token normalisation would give."""
    from wmss_trl.mixing import mixed_head_loss

    torch.manual_seed(1)
    n, hidden, vocab = 9, 5, 17
    head_s = torch.nn.Linear(hidden, vocab, bias=bias).double()
    head_w = torch.nn.Linear(hidden, vocab, bias=bias).double().requires_grad_(False)
    h_s = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
    h_w = torch.randn(n, hidden, dtype=torch.float64)
    y = torch.randint(0, vocab, (n,))

    loss, stats = mixed_head_loss(h_s, head_s, h_w, head_w, y, lam, chunk_size)
    (0.37 * loss).backward()
    got = (
        loss.detach().double(),
        h_s.grad.clone(),
        head_s.weight.grad.clone(),
        None if not bias else head_s.bias.grad.clone(),
    )
    h_s.grad = None
    head_s.zero_grad()
    ref = torch.nn.functional.cross_entropy(lam * head_s(h_s) + (1 - lam) * head_w(h_w), y, reduction="sum")
    (0.37 * ref).backward()
    torch.testing.assert_close(got[0], ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], h_s.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], head_s.weight.grad, rtol=1e-5, atol=1e-7)
    if bias:
        torch.testing.assert_close(got[3], head_s.bias.grad, rtol=1e-5, atol=1e-7)
    assert head_w.weight.grad is None
    with torch.no_grad():  # logging stats: NLL and entropy of each model on its own, the strong model's top-1 hit
        assert stats.shape == (n, 5)
        zs, zw = head_s(h_s), head_w(h_w)
        for col, z in ((0, zs), (1, zw)):
            lp = torch.log_softmax(z, -1)
            nll = -lp.gather(-1, y[:, None]).squeeze(-1)
            torch.testing.assert_close(stats[:, col].double(), nll, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats[:, col + 2].double(), -(lp.exp() * lp).sum(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[:, 4], (zs.argmax(-1) == y).float())  # TRL's `is_top1`
