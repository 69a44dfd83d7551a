"""The saturation benchmark (issue #11 §3): does WD-JT break an SFT plateau, and does the paper's mechanism show?

    python scripts/saturation.py --seeds 0,1,2,3,4                   # ~1 h per seed on one thread (docs/saturation.md)
    python scripts/saturation.py --seeds 0 --arms sft,wdjt            # some arms only; the others can be added later
    python scripts/saturation.py --report                              # table + plots + doc table from the JSON only
    python scripts/saturation.py --smoke --output_dir /tmp/sat_smoke   # tiny settings, end to end, a few minutes

Task: ``load_embedded("arith_hard")`` (wmss_trl.tasks): word problems with numbers 1-20 and 1-2 operations; train
1,000 problems, held-out 2,000 (disjoint), OOD 1,000 (3 operations). Model: a Qwen2 built from config (hidden 128,
3 layers, ~0.5M parameters) with the toy character tokenizer; one thread.

Phase A (per seed = initialisation and data order): TRL SFT from scratch, AdamW, 50 warmup steps then a CONSTANT
learning rate (no decay, so a plateau is not a schedule effect), up to ``max_epochs`` epochs. After every epoch, on a
fixed probe of 256 training rows: token NLL, logit margins (z_y - mean_{k!=y} z_k and z_y - max_{k!=y} z_k) and the
SFT non-target gradient norm; on the first 500 held-out problems: answer NLL and greedy accuracy. The weights of
every epoch are kept until the strong point is known.

Saturation rule (:func:`saturation_check`): the strong checkpoint is the first epoch e >= ``window`` such that, over
the last ``window`` epochs,
  (1) probe token NLL at e < ``nll_floor`` nats,
  (2) the probe mean margin moved by less than ``margin_tol`` relative: (m_e - m_{e-window+1}) / |m_e| < margin_tol,
  (3) held-out (500 problems) shows no detectable improvement: neither the OLS slope of the held-out NLL against
      epoch is significantly negative, nor that of the held-out greedy accuracy significantly positive (95% t
      confidence intervals over those ``window`` epochs; a held-out NLL rising from overfitting counts as a plateau).
If no epoch meets it by ``max_epochs``, the last epoch is taken and the row says ``rule_met: false``.
Weak = the checkpoint at round(e/3) epochs (lag ablation: round(2e/3)).

Arms (all from strong, fresh AdamW, the same 30-step warmup to the same constant LR, the same data order, the same
number of steps ``arm_steps``, unless named otherwise): see :data:`ARMS`. Equal compute: ``sft_eqc`` and
``neftune_eqc`` get round(arm_steps * r) steps, r = WD-JT's / SFT's measured training time in this seed (CPU time of
the one-thread process, evaluations excluded, so other jobs on the machine do not distort it).

Measured per arm: every ``eval_every`` steps (and at step 0) on the probe: token NLL, margins, the SFT non-target
gradient norm ||p_s,k!=y||, WD-JT's ||lam * p_mix,k!=y|| (with the arm's weak model; arms without one use the frozen
weak), their ratio (amplification = mean over tokens of the mixed norm / mean of the SFT norm) and the share of the
non-target gradient on the weak model's top-5 tokens; on all 2,000 held-out problems: the teacher-forced per-token NLL
of the reference completion (worked steps + answer + end token), the PRIMARY metric (at the last step). At the last
3 evaluation steps: greedy accuracy on the 2,000 held-out (also split into the problems the weak model gets wrong vs
right) and 1,000 OOD problems; the SECONDARY metric is their mean over those 3 evaluations. After training: the
held-out margins of y against the weak model's top-5 non-target tokens vs against the rest.

Statistics (``--report``): per arm, the difference to continued SFT paired by seed, its mean and 95% t CI, and the
minimal detectable effect of the design (80% power, two-sided 0.05, from the observed paired SD).

Resumable per (seed, arm): each finished phase A / arm is a row of the results JSON, written atomically under a
writer lock; a re-run skips finished rows. Every row records what made it (``made_by``: the sha256 of this script's
measurement code, above the REPORT marker, the settings, library versions and numerics pins); a row made by anything
else is refused. Phase A keeps a transformers checkpoint per epoch (the last one), so a killed run continues; an arm
killed mid-way restarts from strong (an arm is ~2-3 minutes).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace


REPORT_MARKER = "# ==== REPORT (not part of the fingerprint) ===="


@dataclass(frozen=True)
class Settings:
    dataset: str = "arith_hard"
    train_size: int = 1000
    test_size: int = 2000
    ood_size: int = 1000
    phase_a_test: int = 500  # held-out problems evaluated every epoch of phase A
    probe_size: int = 256  # fixed probe: the first training rows
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    max_epochs: int = 120
    min_epochs: int = 10
    window: int = 10
    nll_floor: float = 0.05
    margin_tol: float = 0.03
    arm_steps: int = 300
    arm_warmup: int = 30
    eval_every: int = 50
    greedy_evals: int = 3  # the last N evaluation steps also decode greedily
    mixing_lambda: float = 0.5
    lr_multiplier: float = 3.0
    neftune_noise_alpha: float = 5.0
    top_k: int = 5
    max_new_tokens: int = 48


SMOKE = dict(
    train_size=64,
    test_size=64,
    ood_size=32,
    phase_a_test=32,
    probe_size=16,
    hidden_size=32,
    num_layers=1,
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=4,
    max_epochs=6,
    min_epochs=3,
    window=3,
    arm_steps=8,
    arm_warmup=2,
    eval_every=2,
    greedy_evals=2,
    max_new_tokens=24,
)

ARMS = {
    "sft": "continued SFT (TRL's SFTTrainer)",
    "wdjt": "WD-JT only: frozen weak (1/3 of the steps to strong), lambda 0.5, the full training set",
    "sft_3x": "continued SFT at 3x the learning rate (Adam cancels gradient scale: the honest 'push harder')",
    "neftune": "SFT with NEFTune (TRL's neftune_noise_alpha=5)",
    "wdjt_cotrained": "WD-JT with the weak model co-trained (train_weak_model=True, weak_learning_rate = LR)",
    "wdjt_lag": "WD-JT with the weak checkpoint at 2/3 of the steps to strong (lag ablation)",
    "wdds": "WD-DS only: SFT on the WD-DS resample (H0 = weak, H1 = strong entropies)",
    "wmss": "WD-DS + WD-JT (WMSS)",
    "ctrl_uniform": "control: WD-JT with a uniform weak model (LM head zeroed)",
    "ctrl_shuffled": "control: WD-JT with the weak model's vocabulary permuted",
    "ctrl_temperature": "control: WD-JT with weak = strong's logits / T, T matched to the weak model's probe entropy",
    "label_smoothing": "SFT with label smoothing, epsilon matched to WD-JT's mean target-probability gap at strong",
    "sft_eqc": "equal compute: continued SFT for WD-JT's measured training time (in extra steps)",
    "neftune_eqc": "equal compute: NEFTune for WD-JT's measured training time (in extra steps)",
}
WEAK_ARMS = {"wdjt", "wdjt_cotrained", "wdjt_lag", "wmss", "ctrl_uniform", "ctrl_shuffled", "ctrl_temperature"}


# ---------------------------------------------------------------------------------------------------------------
# Pure logic: statistics, the saturation rule, bookkeeping (tested in tests/test_saturation.py)
# ---------------------------------------------------------------------------------------------------------------
def t_cdf(x: float, df: int) -> float:
    """Student-t CDF by Simpson integration of the density (no scipy in the environment)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 400
    h = x / n
    total = 0.0
    for i in range(n + 1):
        w = 1 if i in (0, n) else (4 if i % 2 else 2)
        total += w * math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df))
    return 0.5 + total * h / 3


@functools.cache
def t_ppf(q: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`), 0.5 < q < 1."""
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float]) -> dict:
    """Mean, sample SD and half-width of the 95% t confidence interval (NaN half-width for fewer than 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": float("nan"), "half": float("nan")}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "sd": sd, "half": t_ppf(0.975, n - 1) * sd / math.sqrt(n)}


def minimal_detectable_effect(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true mean paired difference a two-sided one-sample t test on ``n`` paired differences with SD ``sd``
    detects with probability ``power`` at level ``alpha``:  MDE = (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)
    (the usual approximation of the noncentral t; slightly optimistic for very small n)."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    return (t_ppf(1 - alpha / 2, n - 1) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


def ols_slope_ci(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """OLS slope of ys on xs and the half-width of its 95% t confidence interval (n - 2 degrees of freedom)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(resid / (n - 2) / sxx)
    return slope, t_ppf(0.975, n - 2) * se


def saturation_check(history: list[dict], s: Settings) -> dict:
    """The saturation rule (module docstring) at the last epoch of ``history`` (one dict per epoch, in order, with
    ``epoch``, ``probe_nll``, ``probe_margin``, ``heldout_nll`` and ``heldout_acc``). Returns the three tests and whether all hold."""
    if len(history) < max(s.window, s.min_epochs):
        return {"met": False, "reason": "too few epochs"}
    last = history[-s.window :]
    nll_ok = last[-1]["probe_nll"] < s.nll_floor
    change = (last[-1]["probe_margin"] - last[0]["probe_margin"]) / max(abs(last[-1]["probe_margin"]), 1e-12)
    margin_ok = change < s.margin_tol
    epochs = [h["epoch"] for h in last]
    acc_slope, acc_half = ols_slope_ci(epochs, [h["heldout_acc"] for h in last])
    nll_slope, nll_half = ols_slope_ci(epochs, [h["heldout_nll"] for h in last])
    slope_ok = acc_slope - acc_half <= 0 and nll_slope + nll_half >= 0
    return {
        "met": nll_ok and margin_ok and slope_ok,
        "nll_ok": nll_ok,
        "margin_change": change,
        "margin_ok": margin_ok,
        "acc_slope": acc_slope,
        "acc_slope_half": acc_half,
        "heldout_nll_slope": nll_slope,
        "heldout_nll_slope_half": nll_half,
        "slope_ok": slope_ok,
    }


def weak_epochs(strong_epoch: int) -> tuple[int, int]:
    """The weak checkpoint (about 1/3 of the steps to strong) and the lag ablation's (about 2/3), at least epoch 1."""
    return max(1, round(strong_epoch / 3)), max(1, round(2 * strong_epoch / 3))


def equal_compute_steps(arm_steps: int, wdjt_seconds: float, sft_seconds: float) -> int:
    """Steps that give SFT (or NEFTune) the training time WD-JT took: round(arm_steps * wdjt / sft), >= arm_steps."""
    return max(arm_steps, round(arm_steps * wdjt_seconds / sft_seconds))


def measurement_sha256(script_path: str) -> str:
    """sha256 of this script's text above :data:`REPORT_MARKER` (what makes a row; the report code may change)."""
    text = open(script_path).read()
    cut = text.find("\n" + REPORT_MARKER)
    return hashlib.sha256(text[: cut if cut >= 0 else len(text)].encode()).hexdigest()


def made_by(settings: Settings, script_path: str, versions: dict, numerics: dict) -> dict:
    """What makes a row: the measurement code, the settings, library versions and the numerics pins (no paths)."""
    return {
        "script_sha256": measurement_sha256(script_path),
        "settings": asdict(settings),
        "versions": versions,
        "numerics": numerics,
    }


class Results:
    """The results JSON: ``{"rows": {"seed<N>/<name>": row}}``, each row with its ``made_by``.

    Loading refuses (``ProvenanceError``) a file holding any row made by something else; :meth:`add` re-reads the
    file, adds one row and writes it atomically (``write_json_atomic``), so a killed run loses at most the row it was
    computing. Hold the writer lock (:meth:`lock`) while adding.
    """

    def __init__(self, path: str, current: dict):
        from wmss_trl.io import check_provenance, jsonable

        self.path, self.current = path, jsonable(current)
        self.rows = self._read()
        for key, row in self.rows.items():
            check_provenance(
                f"row {key!r} of {path}",
                row.get("made_by", {}),
                self.current,
                "Use another --results file (and --output_dir), or delete the rows made by other settings.",
            )

    def _read(self) -> dict:
        if not os.path.isfile(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f)["rows"]

    def lock(self):
        from wmss_trl.io import WriterLock

        return WriterLock(self.path + ".lock", f"the saturation results {self.path}")

    def has(self, seed: int, name: str) -> bool:
        return f"seed{seed}/{name}" in self.rows

    def get(self, seed: int, name: str) -> dict | None:
        return self.rows.get(f"seed{seed}/{name}")

    def add(self, seed: int, name: str, row: dict, info: dict | None = None) -> None:
        from wmss_trl.io import write_json_atomic

        self.rows = self._read()
        self.rows[f"seed{seed}/{name}"] = {**row, "made_by": self.current, "info": info or {}}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        write_json_atomic(self.path, {"rows": self.rows})


# ---------------------------------------------------------------------------------------------------------------
# Measurements on fixed rows (teacher-forced)
# ---------------------------------------------------------------------------------------------------------------
def encode(tokenizer, dataset, batch_size: int = 128) -> list[dict]:
    """Teacher-forcing batches of conversational rows: chat-template ids, right-padded, labels -100 outside the
    completion (the reference answer and the end token: what TRL's completion-only SFT trains on)."""
    import torch

    pairs = []
    for row in dataset:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        assert full.startswith(prompt), (prompt, full)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        f = tokenizer(full, add_special_tokens=False)["input_ids"]
        pairs.append((f, [-100] * len(p) + f[len(p) :]))
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(f) for f, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (f, lab) in enumerate(chunk):
            ids[i, : len(f)], labels[i, : len(f)], mask[i, : len(f)] = torch.tensor(f), torch.tensor(lab), 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _logits(model, batch):
    """(N, V) fp32 logits at the trained positions (position t predicts label t+1) and the (N,) targets."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    target = batch["labels"][:, 1:]
    keep = target != -100
    return out[:, :-1][keep].float(), target[keep]


def _eval_mode(*models):
    """Put models in eval mode; returns a function restoring their modes."""
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    return lambda: [m.train(t) for m, t in modes]


def probe_metrics(model, batches, weak=None, lam: float = 0.5, top_k: int = 5) -> dict:
    """Means over the probe's trained tokens: token NLL, the margins, the entropy and the SFT non-target gradient norm;
    with ``weak`` also WD-JT's non-target gradient norm on the strong logits (g = lam * (p_mix - onehot)), the
    amplification ratio (mean mixed norm / mean SFT norm), the weak top-k share of the non-target gradient (mixed and
    SFT), the target-probability gap p_s(y) - p_mix(y) and the weak model's entropy."""
    import torch

    from wmss_trl.diagnostics import logit_margins, nontarget_grad_norm, weak_topk_share
    from wmss_trl.entropy import token_entropy

    restore = _eval_mode(model, weak)
    sums, n = {}, 0
    try:
        with torch.no_grad():
            for batch in batches:
                z, y = _logits(model, batch)
                p = torch.softmax(z, -1)
                mean_m, min_m = logit_margins(z, y)
                vals = {
                    "nll": torch.nn.functional.cross_entropy(z, y, reduction="none"),
                    "margin": mean_m,
                    "min_margin": min_m,
                    "entropy": token_entropy(z),
                    "sft_grad_norm": nontarget_grad_norm(p, y),
                }
                if weak is not None:
                    zw, _ = _logits(weak, batch)
                    pm = torch.softmax(lam * z + (1 - lam) * zw, -1)
                    vals.update(
                        mixed_grad_norm=nontarget_grad_norm(pm, y, scale=lam),
                        weak_topk_share=weak_topk_share(pm, zw, y, top_k),
                        sft_weak_topk_share=weak_topk_share(p, zw, y, top_k),
                        target_gap=p.gather(-1, y[:, None]).squeeze(-1) - pm.gather(-1, y[:, None]).squeeze(-1),
                        weak_entropy=token_entropy(zw),
                    )
                for k, v in vals.items():
                    sums[k] = sums.get(k, 0.0) + float(v.double().sum())
                n += len(y)
    finally:
        restore()
    out = {k: v / n for k, v in sums.items()}
    if weak is not None:
        out["amplification"] = out["mixed_grad_norm"] / out["sft_grad_norm"]
    return out


def heldout_nll(model, batches) -> float:
    """Teacher-forced per-token NLL of the reference completions (mean over all their tokens)."""
    import torch

    restore = _eval_mode(model)
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                z, y = _logits(model, batch)
                total += float(torch.nn.functional.cross_entropy(z, y, reduction="sum"))
                n += len(y)
    finally:
        restore()
    return total / n


def weak_topk_margins(model, weak, batches, top_k: int = 5) -> dict:
    """Mean over held-out tokens of z_y - mean z over the weak model's top-k non-target tokens, and z_y - mean z over
    the other non-target tokens (strong logits z): does training push down the weak model's likely mistakes more?"""
    import torch

    restore = _eval_mode(model, weak)
    top_sum, rest_sum, n = 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                z, y = _logits(model, batch)
                zw, _ = _logits(weak, batch)
                top = zw.scatter(-1, y[:, None], float("-inf")).topk(top_k, -1).indices
                z_y = z.gather(-1, y[:, None]).squeeze(-1)
                z_top = z.gather(-1, top).sum(-1)
                z_rest = z.sum(-1) - z_y - z_top
                top_sum += float((z_y - z_top / top_k).double().sum())
                rest_sum += float((z_y - z_rest / (z.shape[-1] - 1 - top_k)).double().sum())
                n += len(y)
    finally:
        restore()
    return {"margin_weak_topk": top_sum / n, "margin_rest": rest_sum / n}


def temperature_for_entropy(model, batches, target: float, lo: float = 0.05, hi: float = 200.0) -> float:
    """T with mean probe token entropy of softmax(z / T) equal to ``target`` (bisection on log T; the entropy of a
    tempered softmax increases with T)."""
    import torch

    from wmss_trl.entropy import token_entropy

    restore = _eval_mode(model)
    with torch.no_grad():
        logits = [_logits(model, b)[0] for b in batches]
    restore()

    def entropy(t):
        return float(torch.cat([token_entropy(z / t) for z in logits]).mean())

    for _ in range(50):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if entropy(mid) < target else (lo, mid)
    return math.sqrt(lo * hi)


def tempered_copy(path: str, temperature: float):
    """strong / T: a copy of the model whose LM head weight (and bias) is divided by T, so its logits are z / T."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.div_(temperature)
        if getattr(head, "bias", None) is not None:
            head.bias.div_(temperature)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------
class Context:
    """Everything shared by the phases of one invocation: settings, data, tokenizer, encoded batches, results."""

    def __init__(self, settings: Settings, output_dir: str, results: Results):
        from wmss_trl.tasks import CHARSET, load_embedded
        from wmss_trl.toy import build_char_tokenizer

        s = self.s = settings
        self.output_dir, self.results = output_dir, results
        self.data = load_embedded(s.dataset, sizes={"train": s.train_size, "test": s.test_size, "ood": s.ood_size})
        self.tokenizer = build_char_tokenizer(CHARSET)
        self.probe = encode(self.tokenizer, self.data["train"].select(range(s.probe_size)))
        self.test_a = self.data["test"].select(range(s.phase_a_test))
        self.test_a_batches = encode(self.tokenizer, self.test_a)
        self.test_batches = encode(self.tokenizer, self.data["test"])

    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.output_dir, f"seed{seed}")

    def greedy(self, model, split: str, rows=None) -> list[bool]:
        from wmss_trl.tasks import greedy_correct

        ds = self.data[split] if rows is None else rows
        return greedy_correct(model, self.tokenizer, ds, max_new_tokens=self.s.max_new_tokens, desc=split)


def _log_in_eval(trainer, model, metrics: dict):
    """``trainer.log`` while the model is in eval mode: TRL files it under its (empty) eval metrics, the training
    metrics it accumulates stay untouched (as the demo's callback does)."""
    restore = _eval_mode(model)
    trainer.log(metrics)
    restore()


def phase_a(ctx: Context, seed: int, made: dict) -> dict:
    """Train from scratch with a constant LR until the saturation rule holds; keep weak, lag-weak and strong."""
    from transformers import AutoModelForCausalLM, TrainerCallback, set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    from wmss_trl.io import check_provenance, write_json_atomic
    from wmss_trl.recipes.demo import common_args
    from wmss_trl.toy import build_tiny_model

    s = ctx.s
    root = os.path.join(ctx.seed_dir(seed), "phase_a")
    os.makedirs(root, exist_ok=True)
    record = os.path.join(ctx.seed_dir(seed), "made_by.json")
    if os.path.isfile(record):
        with open(record) as f:
            check_provenance(record, json.load(f), made, f"Delete {ctx.seed_dir(seed)} or use another --output_dir.")
    else:
        write_json_atomic(record, made)
    epochs_dir = os.path.join(root, "epochs")
    steps_per_epoch = math.ceil(s.train_size / s.batch_size)

    class EpochProbe(TrainerCallback):
        """After each epoch: probe + held-out (500) metrics, logged (so they live in the checkpointed
        ``log_history``), this epoch's weights saved, and training stopped once the saturation rule holds."""

        def __init__(self):
            self.trainer, self.history, self.t0 = None, [], time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self.history = [h["_sat"] for h in state.log_history if "_sat" in h]  # restored on resume

        def on_epoch_end(self, args, state, control, model=None, **kw):
            epoch = round(state.global_step / steps_per_epoch)
            m = probe_metrics(model, ctx.probe)
            correct = ctx.greedy(model, "test", ctx.test_a)
            h = {
                "epoch": epoch,
                "step": state.global_step,
                "probe_nll": m["nll"],
                "probe_margin": m["margin"],
                "probe_min_margin": m["min_margin"],
                "probe_entropy": m["entropy"],
                "probe_sft_grad_norm": m["sft_grad_norm"],
                "heldout_nll": heldout_nll(model, ctx.test_a_batches),
                "heldout_acc": sum(correct) / len(correct),
            }
            self.history.append(h)
            check = saturation_check(self.history, s)
            h["rule"] = check
            model.save_pretrained(os.path.join(epochs_dir, f"epoch{epoch:03d}"), safe_serialization=True)
            _log_in_eval(self.trainer, model, {"_sat": h})
            print(
                f"  seed {seed} epoch {epoch:3d} step {state.global_step:5d}: probe nll {h['probe_nll']:.4f} "
                f"margin {h['probe_margin']:.2f} grad {h['probe_sft_grad_norm']:.4f} | held-out nll "
                f"{h['heldout_nll']:.3f} acc {100 * h['heldout_acc']:.1f}% | rule {check.get('met')} "
                f"({time.perf_counter() - self.t0:.0f} s wall, {time.process_time():.0f} s CPU in this process)",
                flush=True,
            )
            if check["met"]:
                control.should_training_stop = True
                control.should_save = True

    set_seed(seed)
    args = common_args(
        os.path.join(root, "trainer"),
        seed,
        s.max_epochs * steps_per_epoch,
        s.learning_rate,
        s.batch_size,
        scheduler="constant_with_warmup",
    )
    args.update(
        save_strategy="epoch",
        save_total_limit=1,
        warmup_steps=s.warmup_steps,
        logging_steps=steps_per_epoch,
        disable_tqdm=True,
    )
    model = build_tiny_model(ctx.tokenizer, s.hidden_size, s.num_layers, s.num_heads, seed=seed)
    trainer = SFTTrainer(
        model, args=SFTConfig(**args), train_dataset=ctx.data["train"], processing_class=ctx.tokenizer
    )
    probe_cb = EpochProbe()
    probe_cb.trainer = trainer
    trainer.add_callback(probe_cb)
    trainer.remove_callback(PrinterCallback)  # the epoch line above says what matters
    last = get_last_checkpoint(args["output_dir"]) if os.path.isdir(args["output_dir"]) else None
    if last:
        print(f"  seed {seed}: phase A resumes from {last}", flush=True)
    t = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    history = probe_cb.history
    met = [h for h in history if h["rule"].get("met")]
    strong_h = met[0] if met else history[-1]
    e_strong = strong_h["epoch"]
    e_weak, e_lag = weak_epochs(e_strong)
    for name, e in (("strong", e_strong), ("weak", e_weak), ("weak_lag", e_lag)):
        dst = os.path.join(root, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(os.path.join(epochs_dir, f"epoch{e:03d}"), dst)
        ctx.tokenizer.save_pretrained(dst)
    train_seconds = time.perf_counter() - t

    # the starting point, measured like the arms: mechanism on the probe, held-out NLL / greedy / margins
    strong = AutoModelForCausalLM.from_pretrained(os.path.join(root, "strong"))
    weak = AutoModelForCausalLM.from_pretrained(os.path.join(root, "weak"))
    weak_correct = ctx.greedy(weak, "test")
    row = {
        "steps_per_epoch": steps_per_epoch,
        "rule_met": bool(met),
        "strong_epoch": e_strong,
        "strong_step": strong_h["step"],
        "weak_epoch": e_weak,
        "weak_lag_epoch": e_lag,
        "history": history,
        "train_seconds_this_sitting": train_seconds,
        "strong": evaluate_point(ctx, strong, weak, weak_correct),
        "weak": {
            "heldout_nll": heldout_nll(weak, ctx.test_batches),
            "heldout_acc": sum(weak_correct) / len(weak_correct),
            "ood_acc": _acc(ctx.greedy(weak, "ood")),
            "probe": probe_metrics(weak, ctx.probe),
        },
        "weak_correct": "".join("1" if c else "0" for c in weak_correct),
    }
    row["strong"]["probe"] = probe_metrics(strong, ctx.probe, weak, s.mixing_lambda, s.top_k)
    lag = AutoModelForCausalLM.from_pretrained(os.path.join(root, "weak_lag"))
    row["strong"]["probe_lag_weak"] = probe_metrics(strong, ctx.probe, lag, s.mixing_lambda, s.top_k)
    return row


def phase_a_cleanup(ctx: Context, seed: int) -> None:
    """Once phase A's row is stored: drop the per-epoch weights and the trainer checkpoint (weak / strong stay)."""
    root = os.path.join(ctx.seed_dir(seed), "phase_a")
    for name in ("epochs", "trainer"):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _acc(correct: list[bool]) -> float:
    return sum(correct) / max(len(correct), 1)


def evaluate_point(ctx: Context, model, weak, weak_correct: list[bool]) -> dict:
    """Greedy accuracy on all held-out (and on the weak model's wrong / right problems) and OOD problems, held-out
    NLL and the weak top-k margins."""
    correct = ctx.greedy(model, "test")
    wrong = [c for c, w in zip(correct, weak_correct) if not w]
    right = [c for c, w in zip(correct, weak_correct) if w]
    return {
        "heldout_nll": heldout_nll(model, ctx.test_batches),
        "heldout_acc": _acc(correct),
        "acc_weak_wrong": _acc(wrong),
        "acc_weak_right": _acc(right),
        "ood_acc": _acc(ctx.greedy(model, "ood")),
        **weak_topk_margins(model, weak, ctx.test_batches, ctx.s.top_k),
    }


def arm_trainer(ctx: Context, seed: int, arm: str, steps: int, phase: dict):
    """The trainer of one arm, from strong (see :data:`ARMS`); returns (trainer, the frozen weak used by the probe,
    the arm's own weak model or None, extra facts for the row)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from wmss_trl.recipes.demo import common_args, control_weak_model
    from wmss_trl.sft import WMSSSFTConfig, WMSSSFTTrainer

    s = ctx.s
    root = os.path.join(ctx.seed_dir(seed), "phase_a")
    strong_path, weak_path = os.path.join(root, "strong"), os.path.join(root, "weak")
    lr = s.learning_rate * (s.lr_multiplier if arm == "sft_3x" else 1.0)
    args = common_args(
        os.path.join(ctx.seed_dir(seed), "arms", arm),
        seed,
        steps,
        lr,
        s.batch_size,
        scheduler="constant_with_warmup",
    )
    args.update(warmup_steps=s.arm_warmup, logging_steps=s.eval_every, disable_tqdm=True)
    strong = AutoModelForCausalLM.from_pretrained(strong_path)
    reference_weak = AutoModelForCausalLM.from_pretrained(weak_path)
    extra, weak = {}, None
    common = dict(train_dataset=ctx.data["train"], processing_class=ctx.tokenizer)
    if arm in ("sft", "sft_3x", "sft_eqc"):
        return SFTTrainer(strong, args=SFTConfig(**args), **common), reference_weak, None, extra
    if arm in ("neftune", "neftune_eqc"):
        config = SFTConfig(**args, neftune_noise_alpha=s.neftune_noise_alpha)
        return SFTTrainer(strong, args=config, **common), reference_weak, None, extra
    if arm == "label_smoothing":
        vocab = len(ctx.tokenizer)
        gap = phase["strong"]["probe"]["target_gap"]
        eps = min(0.5, max(1e-4, gap / (1 - 1 / vocab)))
        extra = {"label_smoothing_factor": eps, "target_gap": gap}
        config = SFTConfig(**args, label_smoothing_factor=eps)
        return SFTTrainer(strong, args=config, **common), reference_weak, None, extra
    if arm == "wdds":
        config = WMSSSFTConfig(
            **args, selection_mode="resample", entropy_files=entropy_files(ctx, seed), selection_seed=seed
        )
        return WMSSSFTTrainer(strong, args=config, **common), reference_weak, None, extra
    wmss = dict(mixing_lambda=s.mixing_lambda)
    if arm == "wmss":
        wmss.update(selection_mode="resample", entropy_files=entropy_files(ctx, seed), selection_seed=seed)
    if arm in ("wdjt", "wmss", "wdjt_cotrained"):
        weak = AutoModelForCausalLM.from_pretrained(weak_path)
    elif arm == "wdjt_lag":
        weak = AutoModelForCausalLM.from_pretrained(os.path.join(root, "weak_lag"))
    elif arm in ("ctrl_uniform", "ctrl_shuffled"):
        weak = control_weak_model(weak_path, arm.split("_")[1])
    elif arm == "ctrl_temperature":
        target = phase["weak"]["probe"]["entropy"]
        temperature = temperature_for_entropy(strong, ctx.probe, target)
        weak = tempered_copy(strong_path, temperature)
        extra = {"temperature": temperature, "weak_probe_entropy": target}
    if arm == "wdjt_cotrained":
        wmss.update(train_weak_model=True, weak_learning_rate=lr)
    config = WMSSSFTConfig(**args, **wmss)
    trainer = WMSSSFTTrainer(strong, args=config, weak_model=weak, **common)
    own = getattr(trainer, "weak_model", None) or weak
    return trainer, reference_weak, own, extra


def cotraining_available() -> bool:
    from dataclasses import fields

    from wmss_trl.sft import WMSSSFTConfig

    return "train_weak_model" in {f.name for f in fields(WMSSSFTConfig)}


def entropy_files(ctx: Context, seed: int) -> list[str]:
    """WD-DS's H0 (weak) and H1 (strong) per training problem, written once per seed (as ``wmss demo`` does)."""
    from transformers import AutoModelForCausalLM

    from wmss_trl.entropy import score_entropies

    root = os.path.join(ctx.seed_dir(seed), "phase_a")
    files = []
    for name, column in (("weak", "entropy_0"), ("strong", "entropy_1")):
        file = os.path.join(ctx.seed_dir(seed), f"{column}.jsonl")
        if not os.path.isfile(file):
            model = AutoModelForCausalLM.from_pretrained(os.path.join(root, name))
            scores = score_entropies(model, ctx.data["train"], ctx.tokenizer)
            with open(file + ".tmp", "w") as f:
                for i, h in zip(scores["idx"], scores["entropy"]):
                    f.write(json.dumps({"idx": int(i), column: float(h)}) + "\n")
            os.replace(file + ".tmp", file)
        files.append(file)
    return files


def run_arm(ctx: Context, seed: int, arm: str, steps: int, phase: dict) -> dict:
    """Train one arm; curve every ``eval_every`` steps (probe mechanism + held-out NLL), greedy accuracy at the last
    ``greedy_evals`` evaluation steps, final margins vs the weak model's top-k."""
    from transformers import TrainerCallback, set_seed
    from transformers.trainer_callback import PrinterCallback

    s = ctx.s
    set_seed(seed)
    trainer, reference_weak, own_weak, extra = arm_trainer(ctx, seed, arm, steps, phase)
    probe_weak = own_weak if own_weak is not None else reference_weak
    eval_steps = sorted(set(range(s.eval_every, steps + 1, s.eval_every)) | {steps})
    greedy_steps = set(eval_steps[-s.greedy_evals :])
    weak_correct = [c == "1" for c in phase["weak_correct"]]

    class Curve(TrainerCallback):
        def __init__(self):
            self.points, self.eval_time, self.start = [], 0.0, None

        def measure(self, model, step):
            t = time.process_time()
            p = probe_metrics(model, ctx.probe, probe_weak, s.mixing_lambda, s.top_k)
            point = {"step": step, "probe": p, "heldout_nll": heldout_nll(model, ctx.test_batches)}
            if step in greedy_steps:
                correct = ctx.greedy(model, "test")
                point.update(
                    heldout_acc=_acc(correct),
                    acc_weak_wrong=_acc([c for c, w in zip(correct, weak_correct) if not w]),
                    acc_weak_right=_acc([c for c, w in zip(correct, weak_correct) if w]),
                    ood_acc=_acc(ctx.greedy(model, "ood")),
                )
            self.points.append(point)
            self.eval_time += time.process_time() - t

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.measure(model, 0)
            self.start = time.process_time()

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step in eval_steps:
                self.measure(model, state.global_step)

        def train_time(self):
            """CPU seconds of training (evaluations excluded): one thread, so robust to other jobs' load."""
            return time.process_time() - self.start - self.eval_time

    curve = Curve()
    trainer.add_callback(curve)
    trainer.remove_callback(PrinterCallback)
    t = time.perf_counter()
    trainer.train()
    train_seconds, train_wall = curve.train_time(), time.perf_counter() - t
    model = trainer.model
    last = [p for p in curve.points if "heldout_acc" in p]
    final = {
        "heldout_nll": curve.points[-1]["heldout_nll"],
        **{
            k: sum(p[k] for p in last) / len(last)
            for k in ("heldout_acc", "acc_weak_wrong", "acc_weak_right", "ood_acc")
        },
        "heldout_acc_last": last[-1]["heldout_acc"],
        **weak_topk_margins(model, reference_weak, ctx.test_batches, s.top_k),
    }
    shutil.rmtree(os.path.join(ctx.seed_dir(seed), "arms", arm), ignore_errors=True)
    return {
        "steps": trainer.state.global_step,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t,
        "train_and_eval_wall_seconds": train_wall,
        "final": final,
        "curve": curve.points,
        "probe_weak": "own" if own_weak is not None else "frozen weak (1/3)",
        **extra,
    }


def run_seed(ctx: Context, seed: int, arms: list[str], made: dict, info: dict) -> None:
    res = ctx.results
    t0 = time.perf_counter()
    if not res.has(seed, "phase_a"):
        print(f"seed {seed}: phase A (SFT from scratch, constant LR, until saturated)", flush=True)
        row = phase_a(ctx, seed, made)
        with res.lock():
            res.add(seed, "phase_a", row, info)
        phase_a_cleanup(ctx, seed)
        print(
            f"seed {seed}: strong = epoch {row['strong_epoch']} (step {row['strong_step']}, rule met: "
            f"{row['rule_met']}), weak = epoch {row['weak_epoch']}; strong held-out "
            f"{100 * row['strong']['heldout_acc']:.1f}% nll {row['strong']['heldout_nll']:.3f}, weak "
            f"{100 * row['weak']['heldout_acc']:.1f}%  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    phase = res.get(seed, "phase_a")
    for arm in arms:
        if res.has(seed, arm):
            continue
        steps = ctx.s.arm_steps
        if arm.endswith("_eqc"):
            sft, wdjt = res.get(seed, "sft"), res.get(seed, "wdjt")
            if sft is None or wdjt is None:
                print(f"seed {seed} {arm}: skipped (needs the sft and wdjt arms of this seed first)", flush=True)
                continue
            steps = equal_compute_steps(ctx.s.arm_steps, wdjt["train_seconds"], sft["train_seconds"])
        if arm == "wdjt_cotrained" and not cotraining_available():
            print(f"seed {seed} {arm}: skipped (WMSSSFTConfig has no train_weak_model yet; re-run later)", flush=True)
            continue
        t = time.perf_counter()
        row = run_arm(ctx, seed, arm, steps, phase)
        with res.lock():
            res.add(seed, arm, row, info)
        f = row["final"]
        print(
            f"seed {seed} {arm:<17} {row['steps']:4d} steps: held-out nll {f['heldout_nll']:.4f} acc "
            f"{100 * f['heldout_acc']:.1f}% ood {100 * f['ood_acc']:.1f}% amplification "
            f"{row['curve'][-1]['probe'].get('amplification', float('nan')):.2f} ({row['train_seconds']:.0f} s "
            f"CPU training, {time.perf_counter() - t:.0f} s wall in all; seed {time.perf_counter() - t0:.0f} s wall)",
            flush=True,
        )


# ==== REPORT (not part of the fingerprint) ====
def _fmt(c: dict, scale: float = 1.0, digits: int = 3) -> str:
    if math.isnan(c["half"]):
        return f"{scale * c['mean']:.{digits}f}"
    return f"{scale * c['mean']:.{digits}f} ± {scale * c['half']:.{digits}f}"


def paired_cell(diffs: list[float], scale: float, digits: int) -> str:
    """Mean ± 95% CI of paired differences and, in brackets, the design's minimal detectable effect."""
    if not diffs:
        return "—"
    c = mean_ci(diffs)
    mde = minimal_detectable_effect(c["sd"], c["n"])
    return _fmt(c, scale, digits) + (f" ({scale * mde:.{digits}f})" if math.isfinite(mde) else "")


def report(rows: dict, plots_dir: str, doc: str | None, results_path: str) -> str:
    """Markdown tables from the rows (and the PNGs); returns the markdown, and replaces the doc's generated block."""
    seeds = sorted({int(k.split("/")[0][4:]) for k in rows if k.endswith("/phase_a")})
    arms = [a for a in ARMS if any(f"seed{s}/{a}" in rows for s in seeds)]
    phase = {s: rows[f"seed{s}/phase_a"] for s in seeds}
    lines = [
        f"Results file: `{results_path}`; seeds with phase A: {seeds}. Mean ± 95% t CI over seeds; Δ = arm − "
        "continued SFT, paired by seed; MDE = smallest paired difference detectable with 80% power (two-sided "
        "0.05) given the observed paired SD.",
        "",
        "**Starting points** (2,000 held-out / 1,000 OOD problems)",
        "",
        "| | epoch | held-out NLL | held-out acc % | OOD acc % | rule met |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("weak", "strong"):
        epochs = [phase[s][f"{name}_epoch"] for s in seeds]
        lines.append(
            f"| {name} | {sum(epochs) / len(epochs):.1f} | {_fmt(mean_ci([phase[s][name]['heldout_nll'] for s in seeds]))} | "
            f"{_fmt(mean_ci([phase[s][name]['heldout_acc'] for s in seeds]), 100, 1)} | "
            f"{_fmt(mean_ci([phase[s][name]['ood_acc'] for s in seeds]), 100, 1)} | "
            + (f"{sum(phase[s]['rule_met'] for s in seeds)}/{len(seeds)}" if name == "strong" else "")
            + " |"
        )
    lines += [
        "",
        "**Arms** (from strong; held-out NLL = per-token NLL of the reference completion at the last step; accuracy "
        "= mean of the last 3 greedy evaluations)",
        "",
        "| arm | n | steps | held-out NLL | Δ NLL (MDE) | held-out acc % | Δ acc (MDE) | OOD acc % | Δ OOD |"
        " acc weak-wrong / right % | amplification (end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        have = [s for s in seeds if f"seed{s}/{arm}" in rows]
        final = {s: rows[f"seed{s}/{arm}"]["final"] for s in have}
        paired = [s for s in have if f"seed{s}/sft" in rows] if arm != "sft" else []
        base = {s: rows[f"seed{s}/sft"]["final"] for s in paired}
        cells = []
        for key, scale, digits in (("heldout_nll", 1, 3), ("heldout_acc", 100, 1), ("ood_acc", 100, 1)):
            cells.append(_fmt(mean_ci([final[s][key] for s in have]), scale, digits))
            cells.append(paired_cell([final[s][key] - base[s][key] for s in paired], scale, digits))
        split = [_fmt(mean_ci([final[s][k] for s in have]), 100, 1) for k in ("acc_weak_wrong", "acc_weak_right")]
        amp = mean_ci([rows[f"seed{s}/{arm}"]["curve"][-1]["probe"].get("amplification", math.nan) for s in have])
        steps = sum(rows[f"seed{s}/{arm}"]["steps"] for s in have) / len(have)
        lines.append(
            f"| {arm} | {len(have)} | {steps:.0f} | " + " | ".join(cells) + f" | {' / '.join(split)} | "
            f"{_fmt(amp, 1, 2)} |"
        )
    lines += [
        "",
        "**Mechanism** (probe of 256 training rows at strong, and held-out margins after training)",
        "",
        "| | amplification ‖λ p_mix‖/‖p_s‖ (off-target) | weak top-5 share of the off-target gradient: WD-JT / SFT | "
        "held-out margin vs weak top-5 | vs the rest |",
        "|---|---|---|---|---|",
    ]
    probe = [phase[s]["strong"]["probe"] for s in seeds]
    lines.append(
        f"| strong (weak 1/3) | {_fmt(mean_ci([p['amplification'] for p in probe]), 1, 2)} | "
        f"{_fmt(mean_ci([p['weak_topk_share'] for p in probe]), 1, 2)} / "
        f"{_fmt(mean_ci([p['sft_weak_topk_share'] for p in probe]), 1, 2)} | "
        f"{_fmt(mean_ci([phase[s]['strong']['margin_weak_topk'] for s in seeds]), 1, 2)} | "
        f"{_fmt(mean_ci([phase[s]['strong']['margin_rest'] for s in seeds]), 1, 2)} |"
    )
    for arm in arms:
        have = [s for s in seeds if f"seed{s}/{arm}" in rows]
        end = [rows[f"seed{s}/{arm}"]["curve"][-1]["probe"] for s in have]
        fin = [rows[f"seed{s}/{arm}"]["final"] for s in have]
        lines.append(
            f"| {arm} (end) | {_fmt(mean_ci([p['amplification'] for p in end]), 1, 2)} | "
            f"{_fmt(mean_ci([p['weak_topk_share'] for p in end]), 1, 2)} / "
            f"{_fmt(mean_ci([p['sft_weak_topk_share'] for p in end]), 1, 2)} | "
            f"{_fmt(mean_ci([f['margin_weak_topk'] for f in fin]), 1, 2)} | "
            f"{_fmt(mean_ci([f['margin_rest'] for f in fin]), 1, 2)} |"
        )
    text = "\n".join(lines)
    plot_phase_a(phase, os.path.join(plots_dir, "saturation_phase_a.png"))
    plot_arms(rows, seeds, arms, os.path.join(plots_dir, "saturation_arms.png"))
    if doc:
        start, end = "<!-- saturation-table:start -->", "<!-- saturation-table:end -->"
        body = open(doc).read()
        if start in body and end in body:
            head, rest = body.split(start, 1)
            body = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
            with open(doc, "w") as f:
                f.write(body)
    return text


def plot_phase_a(phase: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("probe_nll", "probe token NLL (nats)", True),
        ("probe_margin", "probe mean margin z_y - mean z_k", False),
        ("probe_sft_grad_norm", "probe SFT non-target grad norm", True),
        ("heldout_nll", "held-out NLL (500 problems)", False),
        ("heldout_acc", "held-out greedy accuracy (500)", False),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes.flat[-1].axis("off")
    for ax, (key, label, log) in zip(axes.flat, panels):
        for seed, row in sorted(phase.items()):
            xs = [h["epoch"] for h in row["history"]]
            line = ax.plot(xs, [h[key] for h in row["history"]], lw=1, label=f"seed {seed}")[0]
            ax.axvline(row["strong_epoch"], color=line.get_color(), ls="--", lw=0.8)
            ax.axvline(row["weak_epoch"], color=line.get_color(), ls=":", lw=0.8)
        if log:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch of phase A")
        ax.set_ylabel(label.split(" (")[0], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="-- strong (saturated), : weak", title_fontsize=7)
    fig.suptitle("Phase A: SFT from scratch at a constant LR; dashed = saturation point (strong), dotted = weak")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_arms(rows: dict, seeds: list[int], arms: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (lambda p: p["probe"]["margin"], "probe mean margin"),
        (lambda p: p["probe"]["sft_grad_norm"], "probe SFT non-target grad norm"),
        (lambda p: p["probe"].get("amplification"), "amplification (mixed / SFT grad norm)"),
        (lambda p: p["probe"].get("weak_topk_share"), "weak top-5 share of the WD-JT non-target gradient"),
        (lambda p: p["heldout_nll"], "held-out NLL (2,000)"),
        (lambda p: 100 * p["heldout_acc"] if "heldout_acc" in p else None, "held-out greedy acc % (2,000)"),
    ]
    import numpy as np

    # one colour per arm; the line style says the family: WMSS arms solid, SFT-type baselines dashed, controls dotted
    colours = plt.get_cmap("tab20").colors
    family = {
        "sft": "--",
        "sft_3x": "--",
        "neftune": "--",
        "label_smoothing": "--",
        "sft_eqc": "--",
        "neftune_eqc": "--",
    }
    family.update({arm: ":" for arm in arms if arm.startswith("ctrl_")})
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    for ax, (get, label) in zip(axes.flat, panels):
        for k, arm in enumerate(arms):
            curves = [rows[f"seed{s}/{arm}"]["curve"] for s in seeds if f"seed{s}/{arm}" in rows]
            # each seed's curve on a common grid of steps, averaged where every seed has a value (the equal-compute
            # arms end at a different step per seed: a plain mean per step would jump where seeds drop out)
            points = [[(p["step"], get(p)) for p in c if get(p) is not None] for c in curves]
            points = [pts for pts in points if pts]
            if not points:
                continue
            start, end = max(pts[0][0] for pts in points), min(pts[-1][0] for pts in points)
            grid = np.unique(np.concatenate([[x for x, _ in pts if start <= x <= end] for pts in points]))
            ys = np.mean([np.interp(grid, [x for x, _ in pts], [y for _, y in pts]) for pts in points], axis=0)
            style = family.get(arm, "-")
            ax.plot(
                grid,
                ys,
                ls=style,
                marker="o",
                ms=2.5,
                lw=1.6 if style == "-" else 1.2,
                color=colours[k % 20],
                label=arm,
            )
        ax.axvline(0, color="black", ls="--", lw=0.8, label="strong (saturated)")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("steps from strong")
        ax.set_ylabel(label.split(" (")[0], fontsize=9)
        if label.startswith("amplification"):  # ratios from ~0.1 to ~16: a log axis keeps them all readable
            ax.set_yscale("log")
            ax.axhline(1.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=9, frameon=False)
    fig.suptitle(
        f"Arms from the saturated strong checkpoint, mean over {len(seeds)} seed(s) (solid: WMSS arms, dashed: SFT-type "
        "baselines, dotted: weak-model controls)"
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="Comma-separated seeds (init and data order).")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"Comma-separated arms among {list(ARMS)}.")
    parser.add_argument("--output_dir", default="runs/saturation", help="Work files (checkpoints, entropies).")
    parser.add_argument("--results", default=None, help="Results JSON (default docs/results/saturation.json).")
    parser.add_argument("--report", action="store_true", help="Only regenerate table, plots and the doc table.")
    parser.add_argument("--plots_dir", default="docs/results", help="Where the report's PNGs go.")
    parser.add_argument("--doc", default="docs/saturation.md", help="Doc whose generated table block is replaced.")
    parser.add_argument("--smoke", action="store_true", help="Tiny settings, for a quick end-to-end check.")
    a = parser.parse_args()
    try:
        seeds = [int(x) for x in a.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {a.seeds!r}") from None
    arms = a.arms.split(",")
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; choose among {list(ARMS)}.")
    arms = [x for x in ARMS if x in arms]  # dependency order: sft and wdjt before the equal-compute arms
    settings = replace(Settings(), **SMOKE) if a.smoke else Settings()
    results_path = a.results or (
        os.path.join(a.output_dir, "saturation.json") if a.smoke else "docs/results/saturation.json"
    )
    if a.report:
        with open(results_path) as f:
            rows = json.load(f)["rows"]
        os.makedirs(a.plots_dir, exist_ok=True)
        print(report(rows, a.plots_dir, a.doc if os.path.isfile(a.doc) else None, results_path))
        return 0

    from wmss_trl.recipes.demo import NUMERICS_PINS, pin_numerics

    pin_numerics()
    os.environ.setdefault("TQDM_DISABLE", "1")  # one line per epoch / arm instead of progress bars
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    numerics = {k: os.environ.get(k) for k in NUMERICS_PINS}
    made = made_by(settings, os.path.abspath(__file__), versions, numerics)
    results = Results(results_path, made)  # refuses rows made by anything else, before any work
    from wmss_trl.machine import describe_machine

    info = {"argv": sys.argv, "machine": describe_machine(), "wmss_trl_commit": _git_head()}
    ctx = Context(settings, a.output_dir, results)
    print(f"saturation benchmark: seeds {seeds}, arms {arms}; results {results_path}; {info['machine']}", flush=True)
    t0 = time.perf_counter()
    for seed in seeds:
        run_seed(ctx, seed, arms, made, info)
        print(f"seed {seed} finished ({time.perf_counter() - t0:.0f} s since start)", flush=True)
    return 0


def _git_head() -> str | None:
    import subprocess

    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
