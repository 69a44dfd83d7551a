"""WMSSSFTTrainer: reduction to SFT, frozen weak model, saving/resuming, PEFT, and bad input."""

import os

import pytest
import torch
from conftest import arithmetic_prompt_completion, cpu_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer
from wmss_trl.toy import DEFAULT_CHARS, build_char_tokenizer, build_tiny_model, save_model_and_tokenizer


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}


def manual_mixed_loss(strong, weak, batch, lam):
    """Independent check: full logits of both models, plain fp64 CE on the mixed logits over the trained tokens."""
    with torch.no_grad():
        zs = strong(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        zw = weak(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    z = lam * zs[:, :-1] + (1 - lam) * zw[:, :-1]
    y = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100).item()


def test_lambda_one_equals_sft_trainer_loss(tiny, sft_dataset, tmp_path):
    sft = SFTTrainer(
        tiny["strong"],
        args=cpu_args(SFTConfig, tmp_path / "a"),
        train_dataset=sft_dataset,
        processing_class=tiny["tokenizer"],
    )
    wmss = WMSSSFTTrainer(
        tiny["strong"],
        args=cpu_args(WMSSSFTConfig, tmp_path / "b", mixing_lambda=1.0, weak_model_name_or_path=tiny["weak"]),
        train_dataset=sft_dataset,
        processing_class=tiny["tokenizer"],
    )
    batch = first_batch(sft)
    torch.testing.assert_close(first_batch(wmss)["input_ids"], batch["input_ids"])
    sft_loss = sft.compute_loss(sft.model, dict(batch))
    wmss_loss = wmss.compute_loss(wmss.model, dict(batch))
    torch.testing.assert_close(wmss_loss, sft_loss, rtol=1e-5, atol=1e-6)
    # and the gradients agree too
    sft_loss.backward()
    wmss_loss.backward()
    for (name, p), q in zip(sft.model.named_parameters(), wmss.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_mixed_loss_matches_manual_computation(tiny, sft_dataset, tmp_path):
    lam = 0.3
    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=cpu_args(
            WMSSSFTConfig, tmp_path, mixing_lambda=lam, weak_model_name_or_path=tiny["weak"], mixing_chunk_size=3
        ),
        train_dataset=sft_dataset,
        processing_class=tiny["tokenizer"],
    )
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    weak = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    assert loss == pytest.approx(manual_mixed_loss(trainer.model, weak, batch, lam), rel=1e-5)
    # ...and differs from plain SFT, so the weak model is really in the loss
    plain = manual_mixed_loss(trainer.model, trainer.model, batch, 1.0)
    assert abs(loss - plain) > 1e-3


def test_weak_model_frozen_and_strong_trained(tiny, sft_dataset, tmp_path):
    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=cpu_args(WMSSSFTConfig, tmp_path, weak_model_name_or_path=tiny["weak"], max_steps=3, learning_rate=1e-2),
        train_dataset=sft_dataset,
        processing_class=tiny["tokenizer"],
    )
    weak_before = {k: v.clone() for k, v in trainer.weak_model.state_dict().items()}
    strong_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert not trainer.weak_model.training
    assert all(not p.requires_grad for p in trainer.weak_model.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trainer.weak_model.parameters()}
    for k, v in trainer.weak_model.state_dict().items():
        torch.testing.assert_close(v, weak_before[k], rtol=0, atol=0)
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, strong_before[k])]
    assert len(changed) > 0.9 * len(strong_before)
    logged = [h for h in trainer.state.log_history if "wmss/mixed_loss" in h]
    assert len(logged) == 3
    for key in ("wmss/strong_nll", "wmss/weak_nll", "wmss/strong_entropy", "wmss/weak_entropy"):
        assert all(key in h and h[key] > 0 for h in logged)


def test_save_reload_and_resume(tiny, sft_dataset, tmp_path):
    out = tmp_path / "run"
    args = cpu_args(
        WMSSSFTConfig,
        out,
        weak_model_name_or_path=tiny["weak"],
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        learning_rate=1e-2,
    )
    trainer = WMSSSFTTrainer(tiny["strong"], args=args, train_dataset=sft_dataset, processing_class=tiny["tokenizer"])
    trainer.train()
    trainer.save_model(str(out / "final"))

    # only the strong model, as safetensors, loadable without wmss_trl
    files = os.listdir(out / "final")
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) and "model" in f for f in files)
    state = load_file(str(out / "final" / "model.safetensors"))
    assert set(state) == set(trainer.model.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    ids = torch.tensor([[4, 8, 70, 9, 74, 6, 5]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model(ids).logits)
        weak_logits = trainer.weak_model(ids).logits
    assert not torch.allclose(reloaded(ids).logits, weak_logits)
    assert os.path.isfile(out / "checkpoint-1" / "model.safetensors")

    # resume from step 1 and finish at step 3
    args2 = cpu_args(
        WMSSSFTConfig,
        out,
        weak_model_name_or_path=tiny["weak"],
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
        learning_rate=1e-2,
    )
    resumed = WMSSSFTTrainer(tiny["strong"], args=args2, train_dataset=sft_dataset, processing_class=tiny["tokenizer"])
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert resumed.state.global_step == 3
    assert any(h.get("step") == 3 and "wmss/mixed_loss" in h for h in resumed.state.log_history)


def test_peft_weak_model_is_the_adapter_disabled_base(tiny, sft_dataset, tmp_path):
    from peft import LoraConfig

    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=cpu_args(WMSSSFTConfig, tmp_path, max_steps=2, learning_rate=5e-2, peft_base_as_weak=True),
        train_dataset=sft_dataset,
        processing_class=tiny["tokenizer"],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert trainer.weak_model is None  # no second copy of the weights
    batch = first_batch(trainer)
    # LoRA's B starts at zero: strong == weak, so the mixed loss equals plain SFT before training
    base = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    loss0 = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert loss0 == pytest.approx(manual_mixed_loss(base, base, batch, 1.0), rel=1e-5)
    trainer.train()
    # after training the adapters moved the strong model; the weak logits are still the base model's
    model = trainer.model
    ids = batch["input_ids"][:1]
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_bad_input_errors(tiny, sft_dataset, tmp_path):
    tok = tiny["tokenizer"]
    # a weak model with another vocabulary
    small_tok = build_char_tokenizer("0123456789+=")
    other = save_model_and_tokenizer(build_tiny_model(small_tok, seed=3), small_tok, str(tmp_path / "other_vocab"))
    with pytest.raises(ValueError, match=rf"strong vocab_size={len(tok)}, weak vocab_size={len(small_tok)}"):
        WMSSSFTTrainer(
            tiny["strong"],
            args=cpu_args(WMSSSFTConfig, tmp_path / "o", weak_model_name_or_path=other),
            train_dataset=sft_dataset,
            processing_class=tok,
        )

    # same size, different token -> id map
    shuffled = build_char_tokenizer(DEFAULT_CHARS[::-1])
    assert len(shuffled) == len(tok)
    path = save_model_and_tokenizer(build_tiny_model(shuffled, seed=4), shuffled, str(tmp_path / "shuffled"))
    with pytest.raises(ValueError, match="tokenizer"):
        WMSSSFTTrainer(
            tiny["strong"],
            args=cpu_args(WMSSSFTConfig, tmp_path / "s", weak_model_name_or_path=path),
            train_dataset=sft_dataset,
            processing_class=tok,
        )

    # a weak path that does not exist
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WMSSSFTTrainer(
            tiny["strong"],
            args=cpu_args(WMSSSFTConfig, tmp_path / "m", weak_model_name_or_path=str(tmp_path / "nope")),
            train_dataset=sft_dataset,
            processing_class=tok,
        )

    # lambda out of range, at config time
    with pytest.raises(ValueError, match=r"mixing_lambda must be in \(0.0, 1.0\], got 1.2"):
        cpu_args(WMSSSFTConfig, tmp_path / "l", mixing_lambda=1.2)

    # a dataset with no trainable tokens: every completion truncated away
    with pytest.raises(ValueError, match="truncation removed every trainable token"):
        WMSSSFTTrainer(
            tiny["strong"],
            args=cpu_args(WMSSSFTConfig, tmp_path / "t", weak_model_name_or_path=tiny["weak"], max_length=3),
            train_dataset=arithmetic_prompt_completion(8),
            processing_class=tok,
        )


def test_weak_model_init_kwargs_accepts_json(tiny, sft_dataset, tmp_path):
    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=cpu_args(
            WMSSSFTConfig,
            tmp_path,
            weak_model_name_or_path=tiny["weak"],
            weak_model_init_kwargs='{"dtype": "bfloat16"}',
        ),
        train_dataset=sft_dataset,
        processing_class=tiny["tokenizer"],
    )
    assert next(trainer.weak_model.parameters()).dtype == torch.bfloat16
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("peft", [False, True])
def test_fused_head_and_logits_paths_agree(tiny, sft_dataset, tmp_path, peft):
    """The default path (hidden states + LM heads, no logits) and the fallback (the models' own logits) give the
    same loss and gradients."""
    from peft import LoraConfig

    kwargs = {}
    if peft:
        kwargs["peft_config"] = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )
        args = cpu_args(WMSSSFTConfig, tmp_path, mixing_lambda=0.4, peft_base_as_weak=True)
    else:
        args = cpu_args(WMSSSFTConfig, tmp_path, mixing_lambda=0.4, weak_model_name_or_path=tiny["weak"])
    trainer = WMSSSFTTrainer(
        tiny["strong"], args=args, train_dataset=sft_dataset, processing_class=tiny["tokenizer"], **kwargs
    )
    assert trainer._fused_head
    batch = first_batch(trainer)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    results = []
    for fused in (True, False):
        trainer._fused_head = fused
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert metrics["wmss/weak_nll"][0] == pytest.approx(metrics["wmss/weak_nll"][1], rel=1e-5)
    assert metrics["wmss/strong_entropy"][0] == pytest.approx(metrics["wmss/strong_entropy"][1], rel=1e-5)


def test_modules_to_save_lm_head_mixes_the_heads_the_models_compute(tiny, sft_dataset, tmp_path):
    """`modules_to_save=["lm_head"]`: the head's `.weight` is the trained copy even with the adapters disabled, so
    the fused loss (which reads the weights) would use it for the weak side too; the trainer mixes the models' own
    logits instead. Checked against a naive mix of the PEFT model's logits and its adapter-disabled logits. (LoRA on
    lm_head itself is refused by TRL's SFTTrainer.)"""
    from peft import LoraConfig

    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    args = cpu_args(WMSSSFTConfig, tmp_path, mixing_lambda=0.4, peft_base_as_weak=True)
    trainer = WMSSSFTTrainer(
        tiny["strong"], args=args, train_dataset=sft_dataset, processing_class=tiny["tokenizer"], peft_config=peft
    )
    assert not trainer._fused_head
    model = trainer.model
    with torch.no_grad():  # the trained copy has moved away from the base head
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(3.0)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(model, dict(batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        strong = model(**inputs).logits.float()
        with model.disable_adapter():
            weak = model(**inputs).logits.float()
    labels = batch["labels"][:, 1:]
    mixed = torch.log_softmax(0.4 * strong[:, :-1] + 0.6 * weak[:, :-1], dim=-1)
    mask = labels != -100
    naive = -(mixed.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), naive, rtol=1e-5, atol=1e-6)


# ---- co-trained weak model (train_weak_model=True) ------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_co_trained_weak_gets_the_mixed_loss_gradient(tiny, sft_dataset, tmp_path, fused):
    """Both loss paths give the weak model the gradient of the mixed loss: the same as autograd through both
    models' plain logits (naive CE on the mixed logits), so d loss / d z_weak = (1 - lam) * (p_mix - onehot)."""
    lam = 0.3
    args = cpu_args(
        WMSSSFTConfig, tmp_path, weak_model_name_or_path=tiny["weak"], mixing_lambda=lam, train_weak_model=True
    )
    trainer = WMSSSFTTrainer(tiny["strong"], args=args, train_dataset=sft_dataset, processing_class=tiny["tokenizer"])
    trainer._fused_head = fused
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    got = {n: p.grad.clone() for n, p in trainer.weak_model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in got.values())

    strong = AutoModelForCausalLM.from_pretrained(tiny["strong"])
    weak = AutoModelForCausalLM.from_pretrained(tiny["weak"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    zs, zw = strong(**inputs).logits[:, :-1], weak(**inputs).logits[:, :-1]
    zw.retain_grad()
    labels = batch["labels"][:, 1:]
    z = lam * zs + (1 - lam) * zw
    loss = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    for name, param in weak.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    # ...and on the weak logits it is (1 - lam) * (softmax(z_mix) - onehot(y)) / N
    mask = labels != -100
    expected = torch.softmax(z.detach(), -1)
    expected[mask] -= torch.nn.functional.one_hot(labels[mask], z.shape[-1]).float()
    expected = (1 - lam) * expected * mask[..., None] / mask.sum()
    torch.testing.assert_close(zw.grad, expected, rtol=1e-4, atol=1e-7)


def test_co_trained_weak_changes_is_not_saved_and_has_its_learning_rate(tiny, sft_dataset, tmp_path):
    out = tmp_path / "run"
    args = cpu_args(
        WMSSSFTConfig,
        out,
        weak_model_name_or_path=tiny["weak"],
        train_weak_model=True,
        learning_rate=1e-2,
        weak_learning_rate=3e-2,
        max_steps=3,
        save_strategy="steps",
        save_steps=2,
    )
    from transformers import TrainerCallback

    weak_at_2 = {}

    class WeakAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                weak_at_2.update({k: v.clone() for k, v in trainer.weak_model.state_dict().items()})

    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=args,
        train_dataset=sft_dataset,
        processing_class=tiny["tokenizer"],
        callbacks=[WeakAt2()],
    )
    weak_before = {k: v.clone() for k, v in trainer.weak_model.state_dict().items()}
    trainer.train()
    assert trainer.weak_model.training and all(p.requires_grad for p in trainer.weak_model.parameters())
    changed = [k for k, v in trainer.weak_model.state_dict().items() if not torch.equal(v, weak_before[k])]
    assert len(changed) > 0.9 * len(weak_before)
    # one optimizer; the weak parameters in groups of their own, with their learning rate
    weak_ids = {id(p) for p in trainer.weak_model.parameters()}
    groups = trainer.optimizer.param_groups
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= weak_ids or not ids & weak_ids
        assert group["initial_lr"] == (3e-2 if ids and ids <= weak_ids else 1e-2)
    assert weak_ids == {id(p) for g in groups for p in g["params"]} & weak_ids

    # save_model: the strong model alone, loadable by plain transformers, equal to the trained strong model
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", out / "checkpoint-2"):
        saved = load_file(str(folder / "model.safetensors"))
        assert not any(k.startswith("wmss_weak_model") for k in saved)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    strong_state = {k: v for k, v in trainer.model.state_dict().items() if not k.startswith("wmss_weak_model.")}
    assert set(loaded.state_dict()) == set(strong_state)
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, strong_state[name], rtol=0, atol=0, msg=name)
    assert not [name for name in os.listdir(tmp_path / "final") if "weak" in name]
    # the checkpoint keeps the weak model's weights at its step for resuming, with the optimizer's state
    optimizer_state = torch.load(str(out / "checkpoint-2" / "optimizer.pt"), weights_only=True)
    assert optimizer_state["wmss_weak_model"].keys() == weak_at_2.keys()
    for name, value in optimizer_state["wmss_weak_model"].items():
        torch.testing.assert_close(value, weak_at_2[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(v, weak_before[k]) for k, v in weak_at_2.items())


def test_co_trained_weak_is_the_policys_submodule_only_while_training(tiny, sft_dataset, tmp_path):
    """The co-trained weak model rides in the policy while train() runs (so one optimizer / clipping / wrapper holds
    both), and is detached when train() returns: the user's model object is then the strong model alone, and its own
    `save_pretrained` saves only it. A second train() attaches it again."""
    from transformers import TrainerCallback

    seen = []

    class Attached(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(hasattr(model, "wmss_weak_model"))

    args = cpu_args(
        WMSSSFTConfig, tmp_path / "run", weak_model_name_or_path=tiny["weak"], train_weak_model=True, max_steps=2
    )
    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=args,
        train_dataset=sft_dataset,
        processing_class=tiny["tokenizer"],
        callbacks=[Attached()],
    )
    model = trainer.model
    for run in range(2):
        weak_before = {k: v.clone() for k, v in trainer.weak_model.state_dict().items()}
        trainer.train()
        assert seen == [True, True] * (run + 1)
        assert trainer.model is model and not hasattr(model, "wmss_weak_model")
        assert model._keys_to_ignore_on_save == set()  # the policy's own again (Qwen2: none)
        assert not any(name.startswith("wmss_weak_model") for name, _ in model.named_parameters())
        assert any(not torch.equal(v, weak_before[k]) for k, v in trainer.weak_model.state_dict().items())
        model.save_pretrained(str(tmp_path / f"direct{run}"))
        saved = load_file(str(tmp_path / f"direct{run}" / "model.safetensors"))
        assert set(saved) == set(AutoModelForCausalLM.from_pretrained(tiny["strong"]).state_dict()) & set(saved)
        assert not any(k.startswith("wmss_weak_model") for k in saved)


def test_co_trained_weak_is_not_missing_when_the_strong_weights_load_back(tiny, sft_dataset, tmp_path, monkeypatch):
    """The Trainer loads a checkpoint's model weights (the strong model alone) back into the policy, the weak model
    attached, for `load_best_model_at_end` and on resume: the weak keys are not reported missing, the strong model
    is the checkpoint's, and on resume the weak model is the checkpoint's (from its optimizer state)."""
    import transformers.trainer

    warned = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))

    from transformers import TrainerCallback

    at_begin = {}

    class WeakAtBegin(TrainerCallback):  # after the Trainer has loaded the checkpoint
        def on_train_begin(self, args, state, control, **kwargs):
            at_begin.update({k: v.clone() for k, v in resumed.weak_model.state_dict().items()})

    def build(callbacks=None, **kw):
        args = cpu_args(
            WMSSSFTConfig,
            tmp_path / "run",
            weak_model_name_or_path=tiny["weak"],
            train_weak_model=True,
            learning_rate=1e-2,
            save_strategy="steps",
            save_steps=1,
            **kw,
        )
        return WMSSSFTTrainer(
            tiny["strong"],
            args=args,
            train_dataset=sft_dataset,
            eval_dataset=sft_dataset.select(range(4)),
            processing_class=tiny["tokenizer"],
            callbacks=callbacks,
        )

    trainer = build(eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not hasattr(trainer.model, "wmss_weak_model")
    for name, value in load_file(os.path.join(best, "model.safetensors")).items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, rtol=0, atol=0, msg=name)

    checkpoint = str(tmp_path / "run" / "checkpoint-1")
    resumed = build(callbacks=[WeakAtBegin()])
    initial_weak = {k: v.clone() for k, v in resumed.weak_model.state_dict().items()}
    resumed.train(resume_from_checkpoint=checkpoint)
    saved_weak = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True)["wmss_weak_model"]
    assert at_begin.keys() == saved_weak.keys()
    for name, value in at_begin.items():
        torch.testing.assert_close(value, saved_weak[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(v, initial_weak[k]) for k, v in saved_weak.items())
    assert not [w for w in warned if "missing keys" in w], warned


def test_co_training_refuses_an_optimizer_that_may_skip_the_state_dict_hooks(tiny, sft_dataset, tmp_path):
    class OwnLoad(torch.optim.AdamW):
        def load_state_dict(self, state_dict):
            pass

    args = cpu_args(WMSSSFTConfig, tmp_path, weak_model_name_or_path=tiny["weak"], train_weak_model=True)
    trainer = WMSSSFTTrainer(
        tiny["strong"],
        args=args,
        train_dataset=sft_dataset,
        processing_class=tiny["tokenizer"],
        optimizer_cls_and_kwargs=(OwnLoad, {"lr": 1e-3}),
    )
    with pytest.raises(ValueError, match=r"OwnLoad has its own load_state_dict, which may skip them"):
        trainer.train()
    assert not hasattr(trainer.model, "wmss_weak_model")  # detached, also on error


COTRAIN = os.path.join(os.path.dirname(__file__), "dist", "sft_cotrain_run.py")


def run_cotrain(tiny, out, *extra):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, COTRAIN, tiny["strong"], tiny["weak"], str(out), "--steps", "6", "--save_steps", "2"]
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=600)
    return proc, [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def test_co_trained_run_sigkilled_mid_run_resumes_to_the_uninterrupted_run(tiny, tmp_path):
    import signal

    proc, _ = run_cotrain(tiny, tmp_path / "whole")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (whole,) = _
    killed, result = run_cotrain(tiny, tmp_path / "killed", "--kill_at", "5")  # after checkpoint-4, a real SIGKILL
    assert killed.returncode == -signal.SIGKILL and not result
    assert sorted(p for p in os.listdir(tmp_path / "killed") if p.startswith("checkpoint")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    proc, (resumed,) = run_cotrain(tiny, tmp_path / "killed", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(whole["losses"]) == 6 and resumed["losses"].keys() == whole["losses"].keys()
    for step, loss in whole["losses"].items():
        assert resumed["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert whole["weak_nll"]["6"] < whole["weak_nll"]["1"]  # the weak model really trained
    for name in ("final/model.safetensors", "weak_final.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "killed" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_co_training_refusals_and_resume_mismatch(tiny, sft_dataset, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match=r"train_weak_model=True cannot train the adapter-disabled PEFT base"):
        cpu_args(WMSSSFTConfig, tmp_path, train_weak_model=True, peft_base_as_weak=True)
    with pytest.raises(ValueError, match=r"train_weak_model=True with mixing_lambda=1.0"):
        cpu_args(WMSSSFTConfig, tmp_path, train_weak_model=True, mixing_lambda=1.0)
    with pytest.raises(ValueError, match=r"weak_learning_rate=0.001 is set but train_weak_model=False"):
        cpu_args(WMSSSFTConfig, tmp_path, weak_learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"weak_learning_rate must be in \(0.0, inf\)"):
        cpu_args(WMSSSFTConfig, tmp_path, train_weak_model=True, weak_learning_rate=0)

    def build(**kw):
        kwargs = {k: kw.pop(k) for k in ("peft_config",) if k in kw}
        args = cpu_args(WMSSSFTConfig, tmp_path / "run", **kw)
        return WMSSSFTTrainer(
            tiny["strong"], args=args, train_dataset=sft_dataset, processing_class=tiny["tokenizer"], **kwargs
        )

    with pytest.raises(ValueError, match=r"train_weak_model=True needs a weak model to train"):
        build(train_weak_model=True)
    with pytest.raises(ValueError, match=r"train_weak_model=True is not supported with a PEFT policy"):
        build(train_weak_model=True, weak_model_name_or_path=tiny["weak"], peft_config=LoraConfig(r=4))
    with pytest.raises(ValueError, match=r"the weak model is torch.bfloat16, the policy torch.float32"):
        build(
            train_weak_model=True,
            weak_model_name_or_path=tiny["weak"],
            weak_model_init_kwargs={"dtype": "bfloat16"},
        )

    # a checkpoint is resumed only with the train_weak_model setting that wrote it
    save = {"max_steps": 1, "save_strategy": "steps", "save_steps": 1, "weak_model_name_or_path": tiny["weak"]}
    build(train_weak_model=True, **save).train()
    checkpoint = str(tmp_path / "run" / "checkpoint-1")
    with pytest.raises(ValueError, match=r"co-trained its weak model .* but this run freezes it"):
        build(**{**save, "max_steps": 2}).train(resume_from_checkpoint=checkpoint)
    build(**save).train()  # the same checkpoint, written by a run with a frozen weak model
    with pytest.raises(ValueError, match=r"holds no co-trained weak model .* written by a run with a frozen"):
        build(train_weak_model=True, **{**save, "max_steps": 2}).train(resume_from_checkpoint=checkpoint)
    # the weak model's weights live with the training state, which save_only_model=True skips
    with pytest.raises(ValueError, match=r"train_weak_model=True with save_only_model=True"):
        cpu_args(WMSSSFTConfig, tmp_path, train_weak_model=True, save_only_model=True)
