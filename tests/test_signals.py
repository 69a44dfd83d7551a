"""wmss_trl.core.three_signal_weights, the one three-signal weighting of WD-DS selection, GRPO entropy advantages and
DPO pair weights, against a naive implementation with plain Python floats."""

import numpy as np
import pytest
import torch

from wmss_trl.advantages import entropy_advantage_weights
from wmss_trl.core import three_signal_weights
from wmss_trl.selection import wd_ds_weights


def naive(h_weak, h_strong, coefs, mask=None):
    """w_i = sum_k c_k s_k(i) / mean(s_k) / sum_k c_k over the signals with c_k != 0 and mean(s_k) > 0."""
    items = [i for i in range(len(h_weak)) if mask is None or mask[i]]
    signals = [
        [max(0.0, h_weak[i]) for i in range(len(h_weak))],
        [max(0.0, h_weak[i] - h_strong[i]) for i in range(len(h_weak))],
        [max(0.0, h_strong[i] - h_weak[i]) for i in range(len(h_weak))],
    ]
    means = [sum(s[i] for i in items) / len(items) for s in signals]
    active = [k for k in range(3) if coefs[k] != 0 and means[k] > 0]
    out = []
    for i in range(len(h_weak)):
        if i not in items:
            out.append(0.0)
        elif not active:
            out.append(1.0)
        else:
            out.append(sum(coefs[k] * signals[k][i] / means[k] for k in active) / sum(coefs[k] for k in active))
    return out


@pytest.mark.parametrize("coefs", [(0.1, 0.8, 0.1), (1.0, 0.0, 0.0), (0.0, 0.5, 0.5), (0.2, 0.3, 0.5)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_naive(coefs, masked):
    g = torch.Generator().manual_seed(3)
    hw, hs = torch.rand(40, generator=g) * 3, torch.rand(40, generator=g) * 3
    hs[:5] = hw[:5]  # unchanged items
    mask = (torch.rand(40, generator=g) > 0.3) if masked else None
    w = three_signal_weights(hw, hs, coefs, mask)
    expected = naive(hw.tolist(), hs.tolist(), coefs, None if mask is None else mask.tolist())
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    kept = w if mask is None else w[mask]
    assert kept.mean().item() == pytest.approx(1.0, abs=1e-12)


def test_shapes_and_degenerate_signals():
    h = torch.full((2, 3), 2.0)
    assert torch.equal(three_signal_weights(h, h, (0.1, 0.8, 0.1)), torch.ones(2, 3, dtype=torch.float64))
    z = torch.zeros(2, 3)
    assert torch.equal(three_signal_weights(z, z, (0.1, 0.8, 0.1)), torch.ones(2, 3, dtype=torch.float64))
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    assert torch.equal(three_signal_weights(z, z, (0.1, 0.8, 0.1), mask), mask.double())
    # only the rise signal is present but its coefficient is 0: nothing active, all ones
    assert torch.equal(three_signal_weights(z, z + 1, (0.0, 0.5, 0.0)), torch.ones(2, 3, dtype=torch.float64))


def test_global_statistics_over_processes():
    """Two processes that sum their local statistics get the weights of the whole batch on one process."""
    g = torch.Generator().manual_seed(4)
    hw, hs, m = torch.rand(6, 4, generator=g), torch.rand(6, 4, generator=g), torch.rand(6, 4, generator=g) > 0.2
    full = three_signal_weights(hw, hs, (0.2, 0.5, 0.3), m)
    local = {}
    for half, rows in ((0, slice(0, 3)), (1, slice(3, 6))):
        three_signal_weights(hw[rows], hs[rows], (0.2, 0.5, 0.3), m[rows], lambda t, h=half: local.setdefault(h, t))
    parts = [
        three_signal_weights(hw[:3], hs[:3], (0.2, 0.5, 0.3), m[:3], lambda t: t + local[1]),
        three_signal_weights(hw[3:], hs[3:], (0.2, 0.5, 0.3), m[3:], lambda t: t + local[0]),
    ]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-12, atol=1e-12)


def test_one_weighting_for_selection_advantages_and_pairs():
    """WD-DS's sampling distribution is w / N; GRPO's token weights are w (fp32, masked); DPO's pair weights are w."""
    rng = np.random.default_rng(5)
    h0 = rng.gamma(2.0, 1.0, size=50)
    h1 = np.clip(h0 + rng.normal(0, 0.7, size=50), 0, None)
    coefs = (0.3, 0.5, 0.2)
    w = three_signal_weights(torch.from_numpy(h0), torch.from_numpy(h1), coefs).numpy()
    np.testing.assert_allclose(wd_ds_weights(h0, h1, *coefs), w / len(w), rtol=1e-12, atol=1e-15)
    mask = torch.ones(5, 10, dtype=torch.bool)
    token = entropy_advantage_weights(torch.from_numpy(h0).view(5, 10), torch.from_numpy(h1).view(5, 10), mask, coefs)
    torch.testing.assert_close(token.flatten(), torch.from_numpy(w).float())
