"""The saturation benchmark's pure logic (scripts/saturation.py): statistics, the saturation rule, bookkeeping.

Fast and untimed: no model is trained here (the benchmark itself is a script).
"""

import importlib.util
import json
import math
import os
import random
import shutil
import sys
from dataclasses import replace

import pytest

from wmss_trl.io import ProvenanceError


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "saturation.py")


@pytest.fixture(scope="module")
def sat():
    spec = importlib.util.spec_from_file_location("saturation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "df, q, table",
    [(1, 0.975, 12.706), (4, 0.975, 2.776), (9, 0.975, 2.262), (4, 0.8, 0.941), (9, 0.8, 0.883), (30, 0.975, 2.042)],
)
def test_t_quantiles_match_the_printed_table(sat, df, q, table):
    assert sat.t_ppf(q, df) == pytest.approx(table, abs=2e-3)


def test_mean_ci_against_naive(sat):
    values = [0.3, -0.1, 0.25, 0.05, 0.12]
    c = sat.mean_ci(values)
    mean = sum(values) / 5
    sd = (sum((v - mean) ** 2 for v in values) / 4) ** 0.5
    assert c["mean"] == pytest.approx(mean)
    assert c["sd"] == pytest.approx(sd)
    assert c["half"] == pytest.approx(2.776 * sd / 5**0.5, rel=1e-3)
    assert math.isnan(sat.mean_ci([1.0])["half"])


def test_minimal_detectable_effect_has_the_stated_power(sat):
    """Simulate paired designs whose true effect is the MDE: a two-sided t test at 0.05 rejects about 80% of them."""
    n, sd = 8, 1.0
    mde = sat.minimal_detectable_effect(sd, n)
    crit = sat.t_ppf(0.975, n - 1)
    rng = random.Random(0)
    trials, rejected = 4000, 0
    for _ in range(trials):
        d = [rng.gauss(mde, sd) for _ in range(n)]
        c = sat.mean_ci(d)
        rejected += abs(c["mean"]) / (c["sd"] / n**0.5) > crit
    assert 0.75 < rejected / trials < 0.85
    # and a smaller effect has less power (the MDE is not just any number)
    assert sat.minimal_detectable_effect(sd, 2 * n) < mde


def test_ols_slope_ci_against_naive(sat):
    xs = [1, 2, 3, 4, 5, 6]
    ys = [0.1, 0.15, 0.22, 0.28, 0.36, 0.4]
    slope, half = sat.ols_slope_ci(xs, ys)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    s2 = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / (n - 2)
    assert slope == pytest.approx(b)
    assert half == pytest.approx(2.776 * (s2 / sum((x - mx) ** 2 for x in xs)) ** 0.5, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# the saturation rule
# ----------------------------------------------------------------------------------------------------------------
def _history(n, nll, margin, acc, heldout_nll=lambda e: 0.1):
    return [
        {
            "epoch": e,
            "probe_nll": nll(e),
            "probe_margin": margin(e),
            "heldout_acc": acc(e),
            "heldout_nll": heldout_nll(e),
        }
        for e in range(1, n + 1)
    ]


def test_saturation_rule_each_condition_can_fail(sat):
    s = replace(sat.Settings(), window=6, min_epochs=6, nll_floor=0.05, margin_tol=0.05)
    noise = [0.01, -0.012, 0.004, -0.003, 0.011, -0.009] * 10
    plateau = _history(30, lambda e: 0.01, lambda e: 20 + 0.001 * e, lambda e: 0.4 + noise[e])
    assert sat.saturation_check(plateau, s)["met"]

    high_nll = _history(30, lambda e: 0.2, lambda e: 20.0, lambda e: 0.4 + noise[e])
    check = sat.saturation_check(high_nll, s)
    assert not check["met"] and not check["nll_ok"] and check["margin_ok"] and check["slope_ok"]

    growing_margin = _history(30, lambda e: 0.01, lambda e: 2.0 * e, lambda e: 0.4 + noise[e])
    check = sat.saturation_check(growing_margin, s)
    assert not check["met"] and not check["margin_ok"] and check["nll_ok"]

    rising_acc = _history(30, lambda e: 0.01, lambda e: 20.0, lambda e: 0.01 * e + noise[e] / 10)
    check = sat.saturation_check(rising_acc, s)
    assert not check["met"] and not check["slope_ok"] and check["margin_ok"]

    # held-out NLL still falling (accuracy flat within noise): not saturated
    falling = _history(30, lambda e: 0.01, lambda e: 20.0, lambda e: 0.4 + noise[e], lambda e: 1 / e + noise[e] / 100)
    check = sat.saturation_check(falling, s)
    assert not check["met"] and not check["slope_ok"] and check["heldout_nll_slope"] < 0

    # held-out NLL rising (overfitting) is a plateau: continued SFT no longer helps
    overfit = _history(30, lambda e: 0.01, lambda e: 20.0, lambda e: 0.4 + noise[e], lambda e: 0.1 + 0.01 * e)
    assert sat.saturation_check(overfit, s)["met"]

    assert not sat.saturation_check(plateau[:5], s)["met"]  # fewer epochs than the window


def test_weak_epochs_and_equal_compute(sat):
    assert sat.weak_epochs(30) == (10, 20)
    assert sat.weak_epochs(2) == (1, 1)
    assert sat.equal_compute_steps(300, 36.0, 30.0) == 360
    assert sat.equal_compute_steps(300, 20.0, 30.0) == 300  # never fewer steps than the arms


# ----------------------------------------------------------------------------------------------------------------
# bookkeeping: fingerprint and the resumable results file
# ----------------------------------------------------------------------------------------------------------------
def test_fingerprint_depends_on_the_measurement_code_not_the_path_or_the_report(sat, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(SCRIPT, a / "saturation.py")
    shutil.copy(SCRIPT, b / "saturation.py")
    s = sat.Settings()
    fp = sat.made_by(s, str(a / "saturation.py"), {"torch": "x"}, {})
    assert fp == sat.made_by(s, str(b / "saturation.py"), {"torch": "x"}, {})  # another folder: same fingerprint
    with open(b / "saturation.py", "a") as f:
        f.write("\n# a change to the report code\n")
    assert fp == sat.made_by(s, str(b / "saturation.py"), {"torch": "x"}, {})
    text = (a / "saturation.py").read_text().replace("def phase_a(", "def phase_a_(", 1)
    (a / "saturation.py").write_text(text)
    assert fp["script_sha256"] != sat.made_by(s, str(a / "saturation.py"), {"torch": "x"}, {})["script_sha256"]
    assert fp != sat.made_by(replace(s, arm_steps=301), str(b / "saturation.py"), {"torch": "x"}, {})


def test_results_rows_resume_and_refuse_another_config(sat, tmp_path):
    path = str(tmp_path / "sat.json")
    made = {"settings": {"arm_steps": 300}, "script_sha256": "abc"}
    res = sat.Results(path, made)
    assert not res.has(0, "sft")
    with res.lock():
        res.add(0, "sft", {"final": {"heldout_nll": 0.5}}, {"argv": ["x"]})
        res.add(0, "wdjt", {"final": {"heldout_nll": 0.4}})
    assert not os.path.exists(path + ".tmp")
    again = sat.Results(path, made)  # a re-run sees the finished rows (and would skip them)
    assert again.has(0, "sft") and again.has(0, "wdjt") and not again.has(1, "sft")
    assert again.get(0, "wdjt")["final"]["heldout_nll"] == 0.4
    with open(path) as f:
        assert json.load(f)["rows"]["seed0/sft"]["made_by"] == made
    with pytest.raises(ProvenanceError, match="arm_steps"):
        sat.Results(path, {"settings": {"arm_steps": 200}, "script_sha256": "abc"})


def test_results_add_keeps_rows_written_by_another_sitting(sat, tmp_path):
    """add() re-reads the file: a row written meanwhile (e.g. by an earlier invocation's last arm) is kept."""
    path = str(tmp_path / "sat.json")
    made = {"settings": {}}
    first, second = sat.Results(path, made), sat.Results(path, made)
    first.add(0, "sft", {"v": 1})
    second.add(1, "sft", {"v": 2})
    assert set(sat.Results(path, made).rows) == {"seed0/sft", "seed1/sft"}


def test_report_of_the_committed_results(sat, tmp_path):
    """The report (tables + both PNGs) runs on the committed results: 5 seeds, every arm, one row per arm and seed."""
    path = os.path.join(os.path.dirname(SCRIPT), "..", "docs", "results", "saturation.json")
    with open(path) as f:
        rows = json.load(f)["rows"]
    text = sat.report(rows, str(tmp_path), None, "saturation.json")
    assert "seeds with phase A: [0, 1, 2, 3, 4]" in text
    for arm in sat.ARMS:
        assert f"| {arm} | 5 |" in text, arm
    for png in ("saturation_phase_a.png", "saturation_arms.png"):
        assert os.path.getsize(tmp_path / png) > 10_000
