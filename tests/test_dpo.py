"""WMSSDPOTrainer: reduction to DPOTrainer with the weak model as ref_model, WD-JT and pair weights vs naive autograd,
precomputed reference log-probs, the PEFT base as weak model, bad input, and the `wmss dpo` command."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_args
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer


sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dpo_run import make_sharp, preference_pairs  # noqa: E402

from wmss_trl import WMSSDPOConfig, WMSSDPOTrainer  # noqa: E402
from wmss_trl.core import three_signal_weights  # noqa: E402
from wmss_trl.dpo import scale_grad, sequence_logps  # noqa: E402
from wmss_trl.toy import build_char_tokenizer, build_tiny_model, load_tokenizer, save_model_and_tokenizer  # noqa: E402


PAIRS = preference_pairs(8)


@pytest.fixture(scope="module")
def sharp(tiny, tmp_path_factory):
    """The tiny models with scaled-up LM heads, so that weak and strong entropies really differ (see make_sharp)."""
    return make_sharp(tiny["strong"], tiny["weak"], str(tmp_path_factory.mktemp("sharp")))


def wmss(tiny, tmp_path, dataset=PAIRS, weak="config", **kw):
    args = cpu_args(WMSSDPOConfig, tmp_path, weak_model_name_or_path=tiny["weak"] if weak == "config" else None, **kw)
    extra = {} if weak == "config" else {"weak_model": weak}
    return WMSSDPOTrainer(
        tiny["strong"], args=args, train_dataset=dataset, processing_class=load_tokenizer(tiny["strong"]), **extra
    )


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}


def ordered_batch(trainer, n=4):
    """The first n rows of the prepared dataset, in order, through the trainer's collator."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def naive_token_logps(logits, batch):
    """log softmax(logits)[next token] * completion mask, fp64: (2B, T-1)."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logp * batch["completion_mask"][:, 1:]


def naive_entropy_rejected(logits, batch):
    """Mean token entropy over the completion tokens of the rejected half: (B,)."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    h = -(logp.exp() * logp).sum(-1)
    mask = batch["completion_mask"][:, 1:].double()
    per_row = (h * mask).sum(-1) / mask.sum(-1)
    return per_row.chunk(2)[1]


def naive_weights(h_weak, h_strong, a=0.1, b=0.8, c=0.1):
    gap = h_strong - h_weak
    neg, pos = (-gap).clamp(min=0), gap.clamp(min=0)
    terms, shares = [], []
    for share, signal in ((a, h_weak), (b, neg), (c, pos)):
        if share > 0 and signal.mean() > 0:
            terms.append(share * signal / signal.mean())
            shares.append(share)
    return sum(terms) / sum(shares)


def naive_dpo(tiny, batch, beta, lam=1.0, weighted=False):
    """Independent DPO: full logits of fresh copies of both models, (optionally) mixed, plain autograd."""
    strong = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    weak = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    zs = strong(**inputs).logits
    with torch.no_grad():
        zw = weak(**inputs).logits
    z = lam * zs.double() + (1 - lam) * zw.double()
    pi = naive_token_logps(z, batch).sum(1)
    ref = naive_token_logps(zw, batch).sum(1)
    (pc, pr), (rc, rr) = pi.chunk(2), ref.chunk(2)
    losses = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    w = torch.ones_like(losses)
    if weighted:
        w = naive_weights(naive_entropy_rejected(zw, batch), naive_entropy_rejected(zs.detach(), batch))
    (w * losses).mean().backward()
    return losses.mean().item(), {n: p.grad for n, p in strong.named_parameters()}, w


def grads_of(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in trainer.model.named_parameters()}


# -- reduction to TRL ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"loss_type": ["ipo"]},
        {"loss_type": ["hinge", "sft"], "loss_weights": [1.0, 0.5]},
        {"ld_alpha": 0.5},
        {"f_divergence_type": "js_divergence"},
    ],
    ids=["sigmoid", "ipo", "hinge+sft", "ld_alpha", "js"],
)
def test_options_off_equals_dpo_trainer_with_weak_ref(tiny, tmp_path, options):
    ours = wmss(tiny, tmp_path / "a", **options)
    ref = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    theirs = DPOTrainer(
        tiny["strong"],
        ref_model=ref,
        args=cpu_args(DPOConfig, tmp_path / "b", **options),
        train_dataset=PAIRS,
        processing_class=load_tokenizer(tiny["strong"]),
    )
    batch = first_batch(ours)
    loss_ours, loss_theirs = ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch)
    assert loss_ours.item() == loss_theirs.item()
    if not options:
        # and the weak model is really the reference: TRL's default (a copy of the policy) gives another loss
        default = DPOTrainer(
            tiny["strong"],
            args=cpu_args(DPOConfig, tmp_path / "c"),
            train_dataset=PAIRS,
            processing_class=load_tokenizer(tiny["strong"]),
        )
        assert abs(default.compute_loss(default.model, batch).item() - loss_ours.item()) > 1e-4
        ours.train(), theirs.train()
        for (n, p), q in zip(ours.model.named_parameters(), theirs.model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
        assert [h["loss"] for h in ours.state.log_history[:2]] == [h["loss"] for h in theirs.state.log_history[:2]]


def test_weak_model_sources_agree(tiny, tmp_path):
    batch = None
    losses = []
    weak_obj = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    for i, weak in enumerate(["config", tiny["weak"], weak_obj]):
        trainer = wmss(tiny, tmp_path / str(i), weak=weak)
        batch = batch or first_batch(trainer)
        losses.append(trainer.compute_loss(trainer.model, batch).item())
    alias = WMSSDPOTrainer(
        tiny["strong"],
        AutoModelForCausalLM.from_pretrained(tiny["weak"]),
        args=cpu_args(WMSSDPOConfig, tmp_path / "r"),
        train_dataset=PAIRS,
        processing_class=load_tokenizer(tiny["strong"]),
    )
    losses.append(alias.compute_loss(alias.model, batch).item())
    assert len(set(losses)) == 1
    assert alias._tag_names == ["trl", "dpo", "wmss"]


# -- WD-JT and pair weights vs naive autograd --------------------------------------------------------------------------


@pytest.mark.parametrize("lam,weighted", [(0.3, False), (1.0, True), (0.3, True)], ids=["wdjt", "weights", "both"])
def test_matches_naive_autograd(sharp, tmp_path, lam, weighted):
    beta, tiny = 0.5, sharp
    trainer = wmss(tiny, tmp_path, beta=beta, mixing_lambda=lam, entropy_pair_weights=weighted)
    batch = first_batch(trainer)
    loss, grads = grads_of(trainer, batch)
    naive_loss, naive_grads, w = naive_dpo(tiny, batch, beta, lam=lam, weighted=weighted)
    # the loss value is TRL's (unweighted) mean; the weights act on the gradient
    assert loss == pytest.approx(naive_loss, rel=1e-5, abs=1e-6)
    for name, g in naive_grads.items():
        torch.testing.assert_close(
            grads[name].double(), g.double(), rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name
        )
    if weighted:
        assert w.std() > 0.1  # the weights are far from uniform, so the check above has teeth
        assert w.mean().item() == pytest.approx(1.0)
        assert trainer._metrics["eval"]["wmss/pair_weight/max"][-1] == pytest.approx(w.max().item(), rel=1e-4)
    if lam < 1:  # WD-JT really changes the gradient
        _, plain = naive_dpo(tiny, batch, beta)[:2]
        assert any(not torch.allclose(plain[n], naive_grads[n], atol=1e-6) for n in plain)


@pytest.mark.parametrize(
    "loss_type",
    [
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    ],
)
def test_every_loss_type_runs_with_wdjt(tiny, tmp_path, loss_type):
    kw = {"label_smoothing": 1e-3} if loss_type in ("exo_pair", "robust") else {}
    trainer = wmss(
        tiny,
        tmp_path,
        loss_type=[loss_type],
        mixing_lambda=0.5,
        use_weighting=loss_type == "sigmoid",
        entropy_pair_weights=not loss_type.startswith("aot"),
        **kw,
    )
    loss, grads = grads_of(trainer, first_batch(trainer))
    assert torch.isfinite(torch.tensor(loss))
    assert sum(g.abs().sum().item() for g in grads.values() if g is not None) > 0


def test_entropy_pair_weights_formula():
    h_weak = torch.tensor([1.0, 2.0, 3.0, 2.0])
    h_strong = torch.tensor([0.5, 2.5, 3.0, 1.0])  # gap = -0.5, 0.5, 0, -1
    w = three_signal_weights(h_weak, h_strong, (0.1, 0.8, 0.1))
    expected = (
        0.1 * h_weak / 2.0 + 0.8 * torch.tensor([0.5, 0, 0, 1]) / 0.375 + 0.1 * torch.tensor([0, 0.5, 0, 0]) / 0.125
    )
    torch.testing.assert_close(w, expected.double())
    assert w.mean().item() == pytest.approx(1.0)
    # no entropy rise anywhere: the gamma term is left out and the weights still average 1
    w2 = three_signal_weights(h_weak, torch.minimum(h_strong, h_weak), (0.1, 0.8, 0.1))
    assert w2.mean().item() == pytest.approx(1.0) and w2[1] == pytest.approx(0.1 * 1.0 / 0.9)
    # nothing to weigh by: all ones
    assert torch.equal(three_signal_weights(h_weak, h_weak, (0.0, 0.8, 0.1)), torch.ones(4, dtype=torch.float64))
    # global statistics: two "ranks" that exchange their totals get the weights of the whole batch
    halves = [(h_weak[:2], h_strong[:2]), (h_weak[2:], h_strong[2:])]
    totals = [torch.stack([hw.sum(), (hw - hs).clamp(min=0).sum(), (hs - hw).clamp(min=0).sum()]) for hw, hs in halves]
    both = torch.cat([totals[0] + totals[1], torch.tensor([4.0])]).double()
    split = torch.cat([three_signal_weights(hw, hs, (0.1, 0.8, 0.1), reduce_sum=lambda t: both) for hw, hs in halves])
    torch.testing.assert_close(split, w)


def test_scale_grad_and_sequence_logps():
    x = torch.ones(4, 3, requires_grad=True)
    (scale_grad(x, torch.tensor([1.0, 2.0, 0.0, 3.0])) * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 1, 2], [0, 2, 4], [0, 0, 0], [0, 3, 6]]))
    per_token = torch.tensor([[1.0, 2, 3, 0], [1.0, 1, 0, 0]])  # chosen has 3 tokens, rejected 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert sequence_logps(per_token, mask).tolist() == [6.0, 2.0]
    assert sequence_logps(per_token, mask, ld_alpha=0.5).tolist() == [1 + 2 + 0.5 * 3, 2.0]


# -- precompute_ref_log_probs, PEFT ------------------------------------------------------------------------------


def test_precompute_ref_log_probs(tiny, tmp_path):
    plain = wmss(tiny, tmp_path / "a")
    pre = wmss(tiny, tmp_path / "b", precompute_ref_log_probs=True)
    weak = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    batch, pre_batch = ordered_batch(plain), ordered_batch(pre)
    assert "ref_chosen_logps" in pre_batch and "ref_chosen_logps" not in batch
    with torch.no_grad():
        ref = naive_token_logps(
            weak(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch
        ).sum(1)
    cached = torch.cat([pre_batch["ref_chosen_logps"], pre_batch["ref_rejected_logps"]])
    torch.testing.assert_close(cached.double(), ref, rtol=1e-5, atol=1e-5)
    assert pre.compute_loss(pre.model, pre_batch).item() == pytest.approx(
        plain.compute_loss(plain.model, batch).item(), abs=1e-6
    )
    # with WD-JT the cached weak log-probs are used and the mixing still runs
    mixed, mixed_pre = (
        wmss(tiny, tmp_path / "c", mixing_lambda=0.4),
        wmss(tiny, tmp_path / "d", mixing_lambda=0.4, precompute_ref_log_probs=True),
    )
    assert mixed_pre.compute_loss(mixed_pre.model, ordered_batch(mixed_pre)).item() == pytest.approx(
        mixed.compute_loss(mixed.model, batch).item(), abs=1e-6
    )


def test_peft_base_is_the_weak_model(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    def peft_strong():  # base = the weak checkpoint, a random (non-zero) adapter = what SFT added
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny["weak"])
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    tok = load_tokenizer(tiny["strong"])
    trainer = WMSSDPOTrainer(
        peft_strong(),
        args=cpu_args(WMSSDPOConfig, tmp_path / "a", peft_base_as_weak=True),
        train_dataset=PAIRS,
        processing_class=tok,
    )
    assert trainer.weak_model is None and "ref" not in trainer.model.peft_config  # no frozen adapter copy
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch).item()

    weak = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    policy = peft_strong()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        pi = naive_token_logps(policy(**inputs).logits, batch).sum(1)
        ref = naive_token_logps(weak(**inputs).logits, batch).sum(1)
    (pc, pr), (rc, rr) = pi.chunk(2), ref.chunk(2)
    assert abs((pc - pr).mean() - (rc - rr).mean()) > 1e-3  # the adapter matters, so the check has teeth
    assert loss == pytest.approx((-F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))).mean().item(), rel=1e-5)

    pre = WMSSDPOTrainer(
        peft_strong(),
        args=cpu_args(WMSSDPOConfig, tmp_path / "b", precompute_ref_log_probs=True, peft_base_as_weak=True),
        train_dataset=PAIRS,
        processing_class=tok,
    )
    pre_batch = ordered_batch(pre)
    with torch.no_grad():
        ref = naive_token_logps(
            weak(input_ids=pre_batch["input_ids"], attention_mask=pre_batch["attention_mask"]).logits, pre_batch
        ).sum(1)
    cached = torch.cat([pre_batch["ref_chosen_logps"], pre_batch["ref_rejected_logps"]])
    torch.testing.assert_close(cached.double(), ref, rtol=1e-5, atol=1e-5)
    mixed = WMSSDPOTrainer(
        peft_strong(),
        args=cpu_args(
            WMSSDPOConfig, tmp_path / "c", mixing_lambda=0.5, entropy_pair_weights=True, peft_base_as_weak=True
        ),
        train_dataset=PAIRS,
        processing_class=tok,
    )
    mixed_loss, grads = grads_of(mixed, batch)
    assert torch.isfinite(torch.tensor(mixed_loss)) and any("lora" in n for n, g in grads.items() if g is not None)

    # a new adapter with peft_base_as_weak: the weak model is the base, i.e. the policy before training, and the
    # adapter is zero-initialised, so WD-JT mixes two equal logit sets and the loss is log 2
    new = WMSSDPOTrainer(
        tiny["strong"],
        args=cpu_args(WMSSDPOConfig, tmp_path / "d", mixing_lambda=0.5, peft_base_as_weak=True),
        train_dataset=PAIRS,
        processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
    )
    assert new.weak_model is None and new.compute_loss(new.model, batch).item() == pytest.approx(0.6931472, abs=1e-6)
    assert any("wmss/weak_logps/chosen" in m for m in new._metrics.values())  # WMSS ran: the weak forward logged


# -- bad input ---------------------------------------------------------------------------------------------------------


def test_identical_pairs_error_or_counted_drop(tiny, tmp_path):
    rows = PAIRS.to_list()
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[5]["rejected"] = rows[5]["chosen"]
    bad = Dataset.from_list(rows)
    with pytest.raises(
        ValueError,
        match="2 of 8 pairs have the same chosen and rejected tokens \\(rows \\[1, 5\\].*2 have chosen == rejected",
    ):
        wmss(tiny, tmp_path / "a", dataset=bad)
    trainer = wmss(tiny, tmp_path / "b", dataset=bad, drop_identical_pairs=True)
    assert trainer.identical_pairs_dropped == {"train": 2} and len(trainer.train_dataset) == 6
    with pytest.raises(ValueError, match="every pair"):
        wmss(
            tiny,
            tmp_path / "c",
            dataset=Dataset.from_list([{**r, "rejected": r["chosen"]} for r in rows]),
            drop_identical_pairs=True,
        )


def test_bad_configuration_is_a_clear_error(tiny, tmp_path):
    tok = load_tokenizer(tiny["strong"])
    other_tok = build_char_tokenizer("0123456789+=")
    other = save_model_and_tokenizer(build_tiny_model(other_tok, seed=3), other_tok, str(tmp_path / "other"))
    with pytest.raises(ValueError, match="different vocabularies"):
        WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path, weak_model_name_or_path=other),
            train_dataset=PAIRS,
            processing_class=tok,
        )
    with pytest.raises(ValueError, match="mixing_lambda < 1 need\\(s\\) a weak model"):
        WMSSDPOTrainer(
            tiny["strong"],
            args=cpu_args(WMSSDPOConfig, tmp_path, mixing_lambda=0.5),
            train_dataset=PAIRS,
            processing_class=tok,
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wmss(tiny, tmp_path, weak=str(tmp_path / "missing"))
    # TRL's DPOConfig is accepted, as TRL's trainer accepts it (converted, the WMSS fields at their defaults)
    converted = WMSSDPOTrainer(
        tiny["strong"],
        args=cpu_args(DPOConfig, tmp_path),
        train_dataset=PAIRS,
        processing_class=tok,
        weak_model=tiny["weak"],
    )
    assert isinstance(converted.args, WMSSDPOConfig) and converted.wmss_enabled
    with pytest.raises(TypeError, match="WMSSDPOConfig"):
        WMSSDPOTrainer(tiny["strong"], args={"beta": 0.1}, train_dataset=PAIRS, processing_class=tok)
    with pytest.raises(ValueError, match="pass the weak model once"):
        WMSSDPOTrainer(
            tiny["strong"],
            AutoModelForCausalLM.from_pretrained(tiny["weak"]),
            args=cpu_args(WMSSDPOConfig, tmp_path),
            train_dataset=PAIRS,
            processing_class=tok,
            weak_model=tiny["weak"],
        )
    with pytest.raises(ValueError, match="sort the pairs"):
        cpu_args(WMSSDPOConfig, tmp_path, loss_type=["aot"], entropy_pair_weights=True)
    with pytest.raises(ValueError, match="mixing_lambda"):
        cpu_args(WMSSDPOConfig, tmp_path, mixing_lambda=0.0)
    with pytest.raises(ValueError, match="pair_weight"):
        cpu_args(WMSSDPOConfig, tmp_path, pair_weight_alpha=0.0, pair_weight_beta=0.0, pair_weight_gamma=0.0)


# -- the command -------------------------------------------------------------------------------------------------------


def test_mine_then_dpo_commands(tiny, tmp_path):
    from wmss_trl.recipes.dpo import main as dpo_main
    from wmss_trl.recipes.mine_negatives import main as mine_main

    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"{i}+{i}="}], "solution": str(2 * i)}) + "\n")
    mine_main(
        [
            "--dataset_name",
            str(data),
            "--weak_model_name_or_path",
            tiny["weak"],
            "--strong_model_name_or_path",
            tiny["strong"],
            "--num_samples",
            "3",
            "--max_new_tokens",
            "5",
            "--keep_truncated",
            "true",
            "--output_dir",
            str(tmp_path / "mined"),
            "--progress",
            "false",
        ]
    )
    mined = load_from_disk(str(tmp_path / "mined" / "dataset"))
    assert len(mined) > 0 and {"prompt", "chosen", "rejected", "rejected_score"} <= set(mined.column_names)

    out = tmp_path / "dpo"
    assert (
        dpo_main(
            [
                "--model_name_or_path",
                tiny["strong"],
                "--weak_model_name_or_path",
                tiny["weak"],
                "--dataset_name",
                str(tmp_path / "mined" / "dataset"),
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "2",
                "--learning_rate",
                "1e-2",
                "--mixing_lambda",
                "0.5",
                "--entropy_pair_weights",
                "true",
                "--report_to",
                "none",
                "--bf16",
                "false",
                "--activation_checkpointing",
                "false",
                "--save_strategy",
                "no",
            ]
        )
        == 0
    )
    trained, initial = (
        load_file(str(out / "model.safetensors")),
        load_file(str(Path(tiny["strong"]) / "model.safetensors")),
    )
    assert sum(not torch.allclose(trained[n], initial[n]) for n in initial) > len(initial) // 2
    AutoModelForCausalLM.from_pretrained(str(out))
