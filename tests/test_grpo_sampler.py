"""The weak model's seeded sampler: the Gumbel-max draw after transformers' warpers samples the warped softmax (as
``do_sample=True`` does), and a row's completion depends on its key only, not on the other rows of the call."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList

from wmss_trl.grpo import GumbelMaxSampler, greedy_copy, sampling_warpers, stream_seed


SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),  # TRL's defaults: the plain softmax
    dict(temperature=0.7, top_k=5, top_p=0.9),
    dict(temperature=1.3, top_k=0, top_p=0.8, min_p=0.05),
]


def chi2_quantile(df: int, z: float = 3.29) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.29: upper 5e-4 tail)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic of ``counts`` against ``probs`` over the support, and its degrees of freedom."""
    n, support = counts.sum().item(), probs > 0
    expected = probs[support].double() * n
    return float(((counts[support].double() - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def warped_probs(logits: torch.Tensor, settings: GenerationConfig) -> torch.Tensor:
    scores = logits.clone()
    for warper in sampling_warpers(settings):
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("kw", SETTINGS)
def test_gumbel_max_draws_have_the_warped_softmax_distribution(kw):
    """20,000 rows with distinct keys, one draw each from fixed logits over 12 tokens: the frequencies match the
    softmax of the warped scores (chi-square), and filtered tokens are never drawn."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.8, 0.5, 0.2, 0.0, -0.5, -1.0, -2.0, -3.0, 1.2]])
    settings = GenerationConfig(do_sample=True, **kw)
    probs = warped_probs(logits, settings)[0]
    n = 20_000
    scores = logits.expand(n, -1).clone()
    for warper in sampling_warpers(settings):
        scores = warper(None, scores)
    out = GumbelMaxSampler([(0, 0, 0, j) for j in range(n)], prompt_width=1)(
        torch.zeros(n, 1, dtype=torch.long), scores
    )
    assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == n * 11  # one token per row
    counts = torch.bincount(out.argmax(-1), minlength=12)
    assert (counts[probs == 0] == 0).all()
    stat, df = chi2(counts, probs)
    assert stat < chi2_quantile(df), (stat, df, counts.tolist(), probs.tolist())
    # and the draw is the row's: the same keys give the same tokens, another seed other tokens
    again = GumbelMaxSampler([(0, 0, 0, j) for j in range(n)], 1)(torch.zeros(n, 1, dtype=torch.long), scores)
    other = GumbelMaxSampler([(1, 0, 0, j) for j in range(n)], 1)(torch.zeros(n, 1, dtype=torch.long), scores)
    assert torch.equal(again, out) and not torch.equal(other, out)


@pytest.mark.parametrize("kw", SETTINGS)
def test_same_warpers_and_distribution_as_transformers_do_sample(tiny, kw):
    """Against transformers' own sampling on a real model: the warpers are the ones ``generate(do_sample=True)``
    builds (same classes, same order, same arguments), and the first sampled token of 6,000 rows has the same
    distribution along our greedy + Gumbel-max path as along ``do_sample=True`` (both chi-square against the exact
    warped softmax of the model's logits)."""
    model = AutoModelForCausalLM.from_pretrained(tiny["strong"]).eval()
    tok = tiny["tokenizer"]
    settings = GenerationConfig(do_sample=True, max_new_tokens=1, pad_token_id=tok.pad_token_id, **kw)
    settings = model._prepare_generation_config(settings)[0]
    theirs = [p for p in model._get_logits_processor(settings, device="cpu") if "Warper" in type(p).__name__]
    ours = sampling_warpers(settings)
    assert [type(w) for w in ours] == [type(w) for w in theirs]
    assert [vars(w) for w in ours] == [vars(w) for w in theirs]

    n = 6000
    ids = torch.tensor([tok("3+4=")["input_ids"]] * n)
    with torch.no_grad():
        probs = warped_probs(model(ids[:1]).logits[:, -1].float(), settings)[0]
        torch.manual_seed(0)
        sampled = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings)[:, -1]
        processors = LogitsProcessorList([*ours, GumbelMaxSampler([(0, 0, 0, j) for j in range(n)], ids.size(1))])
        gumbel = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=greedy_copy(settings),
            logits_processor=processors,
        )[:, -1]
    vocab = probs.numel()
    for name, tokens in (("do_sample", sampled), ("gumbel", gumbel)):
        counts = torch.bincount(tokens, minlength=vocab)
        assert (counts[probs == 0] == 0).all(), name
        stat, df = chi2(counts, probs)
        assert stat < chi2_quantile(df), (name, stat, df)


def test_a_rows_completion_does_not_depend_on_the_other_rows(tiny):
    """Eight rows with prompts of different lengths, decoded for 24 tokens together (one left-padded call) and each
    alone: the same completions, token for token. This measures the floating-point caveat of GumbelMaxSampler: a
    row's logits can differ in the last bits with the batch it is decoded in, which could flip a near-tie."""
    model = AutoModelForCausalLM.from_pretrained(tiny["weak"]).eval()
    tok = tiny["tokenizer"]
    prompts = ["1+2=", "13+4=", "7+7=", "123+45=", "9=", "2+2+2=", "40+1=", "5+55+5="]
    settings = GenerationConfig(
        do_sample=True,
        max_new_tokens=24,
        min_new_tokens=24,
        temperature=1.2,
        top_p=0.95,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
    )
    keys = [(0, 0, 5, j) for j in range(len(prompts))]

    def decode(rows):
        ids = [torch.tensor(tok(prompts[j])["input_ids"]) for j in rows]
        width = max(len(x) for x in ids)
        input_ids = torch.stack([torch.cat([torch.full((width - len(x),), tok.pad_token_id), x]) for x in ids])
        mask = torch.stack(
            [torch.cat([torch.zeros(width - len(x), dtype=torch.long), torch.ones_like(x)]) for x in ids]
        )
        processors = LogitsProcessorList(
            [*sampling_warpers(settings), GumbelMaxSampler([keys[j] for j in rows], width)]
        )
        with torch.no_grad():
            out = model.generate(
                input_ids, attention_mask=mask, generation_config=greedy_copy(settings), logits_processor=processors
            )
        return out[:, width:]

    together = decode(range(len(prompts)))
    alone = torch.cat([decode([j]) for j in range(len(prompts))])
    flips = (together != alone).any(-1).sum().item()
    assert flips == 0, f"{flips} of {len(prompts)} rows differ"
    assert len({tuple(row.tolist()) for row in together}) == len(prompts)  # sampled, not a constant


def test_stream_seeds_are_distinct():
    seeds = {stream_seed(0, e, b, j, t) for e in range(3) for b in range(10) for j in range(16) for t in range(8)}
    assert len(seeds) == 3 * 10 * 16 * 8 and all(0 <= s < 2**63 for s in seeds)
