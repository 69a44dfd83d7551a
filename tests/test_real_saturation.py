"""The statistics and the plateau rule of scripts/real_saturation.py, against naive computations (no model)."""

import importlib.util
import math
import pathlib

import pytest


SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "real_saturation.py"


@pytest.fixture(scope="module")
def rs():
    spec = importlib.util.spec_from_file_location("real_saturation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (68, 200), (1, 8)])
def test_wilson_is_the_score_test_inversion(rs, k, n):
    """Wilson's interval = {p0 : |k/n - p0| <= 1.96 sqrt(p0 (1 - p0) / n)}, found here by a grid scan."""
    lo, hi = rs.wilson(k, n)
    p_hat = k / n
    inside = [
        i / 100000
        for i in range(100001)
        if abs(p_hat - i / 100000) <= 1.96 * math.sqrt(i / 100000 * (1 - i / 100000) / n)
    ]
    assert lo == pytest.approx(min(inside), abs=2e-5)
    assert hi == pytest.approx(max(inside), abs=2e-5)


@pytest.mark.parametrize("b,c", [(0, 0), (5, 0), (3, 7), (12, 12), (1, 20)])
def test_mcnemar_exact_p_sums_the_outcomes_as_extreme(rs, b, c):
    """Two-sided exact test of Binomial(b + c, 1/2): the probability of every split at least as far from n/2."""
    n = b + c
    naive = sum(math.comb(n, i) / 2**n for i in range(n + 1) if abs(i - n / 2) >= abs(b - n / 2) - 1e-12)
    assert rs.mcnemar_exact_p(b, c) == pytest.approx(min(1.0, naive))


def test_paired_counts_and_interval(rs):
    after, before = [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]
    d = rs.paired(after, before)
    diffs = [1, 0, -1, 0, 1, 0]
    mean = sum(diffs) / 6
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 5)
    assert (d["gained"], d["lost"]) == (2, 1)
    assert d["diff"] == pytest.approx(1 / 6)
    assert d["ci95"] == pytest.approx([mean - 1.96 * sd / math.sqrt(6), mean + 1.96 * sd / math.sqrt(6)])
    assert d["p_mcnemar"] == pytest.approx(1.0)


def test_plateau_rule(rs):
    # W = 2, tol 5 %: the window means (2, 1) vs (4, 3), ... first stall when both windows are (1, 1), at step 7
    losses = [4, 3, 2, 1, 1, 1, 1, 1]
    assert rs.plateau_step(losses, window=2, tol=0.05, start=0) == 7
    assert rs.plateau_step(losses[:6], window=2, tol=0.05, start=0) is None
    # the rule waits for warmup + 2W steps
    flat = [1.0] * 10
    assert rs.plateau_step(flat, window=2, tol=0.05, start=0) == 4
    assert rs.plateau_step(flat, window=2, tol=0.05, start=5) == 9
    # a loss that halves every step never plateaus
    assert rs.plateau_step([2.0**-i for i in range(30)], window=3, tol=0.05, start=0) is None


def test_step_logger_writes_one_line_per_logged_step(rs, capsys):
    """The shared StepLogger (scripts/run_log.py) as real_saturation.py configures it: a line only when the trainer
    logs the loss, the numeric METRICS among the logs (4 significant digits, `wmss/` dropped), the step's time."""
    from types import SimpleNamespace

    logger = rs.StepLogger("wdjt", rs.METRICS, trigger="loss", digits=4, time_digits=1, strip="wmss/")
    state = SimpleNamespace(global_step=3, max_steps=40)
    logger.on_step_begin(None, state, None)
    logger.on_step_end(None, state, None)
    logger.on_log(None, state, None, logs={"eval_loss": 1.0})  # no training loss: no line
    logs = {"loss": 0.123456, "wmss/logit_margin": 12.3456, "grad_norm": 2.0, "learning_rate": 1e-5}
    logger.on_log(None, state, None, logs=logs)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and len(logger.step_times) == 1
    expected = f"wdjt step 3/40 ({logger.step_times[0]:.1f}s): loss=0.1235 logit_margin=12.35 grad_norm=2"
    assert lines[0].endswith(expected), lines[0]
