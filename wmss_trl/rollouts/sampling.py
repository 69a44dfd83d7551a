"""Sampling pieces of the weak rollouts that do not need a trainer: the seeded Gumbel-max sampler (a row's draw
depends on its key only), the warpers ``generate`` would apply and the recorder of the sampled tokens' log-probs."""

from __future__ import annotations

import copy
import hashlib
import math

import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    GenerationConfig,
    LogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.logits_process import TopHLogitsWarper


class SampledTokenLogProbs(LogitsProcessor):
    """Records ``log softmax(scores / T)[sampled token]`` for every generated token, keeping one step's distribution.

    ``generate`` runs user processors before its sampling warpers (temperature, top-k/p), so ``scores`` are the
    model's logits (after penalties, if any were configured) and the recorded values are the temperature-scaled,
    full-vocabulary log-probs, the quantity TRL's fused LM head computes. A step's sampled token is read from the
    next call's ``input_ids``; :meth:`finish` adds the last one.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous = None
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.logps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` log-probs aligned with ``completion_ids``."""
        if self.previous is not None and len(self.logps) < completion_ids.size(1):
            self.logps.append(
                self.previous.gather(1, completion_ids[:, len(self.logps) : len(self.logps) + 1]).squeeze(1)
            )
        self.previous = None
        if not self.logps:
            return torch.zeros(completion_ids.shape, device=completion_ids.device)
        out = torch.stack(self.logps, dim=1)
        width = completion_ids.size(1)
        return torch.nn.functional.pad(out, (0, max(0, width - out.size(1))))[:, :width]  # zeros after the last token


def stream_seed(*parts: int) -> int:
    """A 63-bit generator seed from a tuple of integers (BLAKE2b of their text): distinct tuples, unrelated streams."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sampling_warpers(settings: GenerationConfig) -> list[LogitsProcessor]:
    """The warpers ``generate`` applies after the logits processors when ``do_sample=True`` (transformers 5,
    ``GenerationMixin._get_logits_processor``, one beam): temperature, top-h, top-k, top-p, min-p, typical-p, epsilon
    and eta cutoffs, in that order, each only when its setting is active."""
    c, warpers = settings, []
    if c.temperature is not None and c.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(c.temperature))
    if c.top_h is not None:
        warpers.append(TopHLogitsWarper(top_h=c.top_h))
    if c.top_k is not None and c.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=c.top_k, min_tokens_to_keep=1))
    if c.top_p is not None and c.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=c.top_p, min_tokens_to_keep=1))
    if c.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=c.min_p, min_tokens_to_keep=1))
    if c.typical_p is not None and c.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=c.typical_p, min_tokens_to_keep=1))
    if c.epsilon_cutoff is not None and 0.0 < c.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=c.epsilon_cutoff, min_tokens_to_keep=1))
    if c.eta_cutoff is not None and 0.0 < c.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=c.eta_cutoff, min_tokens_to_keep=1))
    return warpers


def greedy_copy(settings: GenerationConfig) -> GenerationConfig:
    """``settings`` with ``do_sample=False`` and every warper setting at transformers' neutral default (the warpers
    and the draw are passed as logits processors instead, see :class:`GumbelMaxSampler`)."""
    greedy = copy.deepcopy(settings)
    greedy.do_sample = False
    for name, neutral in (
        ("temperature", 1.0),
        ("top_h", None),
        ("top_k", 50),
        ("top_p", 1.0),
        ("min_p", None),
        ("typical_p", 1.0),
        ("epsilon_cutoff", 0.0),
        ("eta_cutoff", 0.0),
    ):
        setattr(greedy, name, neutral)
    return greedy


class GumbelMaxSampler(LogitsProcessor):
    """Draws each row's next token from ``softmax(scores)`` as ``argmax_v(scores_v + g_v)``, with Gumbel noise
    ``g = -log(-log u)``, ``u ~ U(0, 1)`` in fp64 from a ``torch.Generator`` seeded by ``(row key, token position)``
    (:func:`stream_seed`). By the Gumbel-max trick the argmax is an exact sample of the softmax; its randomness is the
    row's own, so a row's draw depends only on its key and its logits: not on the other rows of the ``generate`` call,
    nor on torch's global RNG. Placed after the sampling warpers (:func:`sampling_warpers`) in a greedy ``generate``,
    it samples exactly what ``do_sample=True`` would. Returns 0 at the drawn token and -inf elsewhere.

    Floating point: a row's logits can still differ in the last bits with the batch it is decoded in (another batch
    size or padding width changes how the matrix products and the attention softmax are blocked and summed), and a
    near-tie of ``scores + g`` (the two best within such a last-bit difference) can then flip a token, after which
    the completion diverges. The tests measure it: no row flipped (16 weak rows between 1 and 2 processes, 8 rows
    decoded alone and together; and, with the since-removed read-ahead, 16 rows decoded 4 batches at a time), while
    the log-probs recorded with them moved by up to 4.8e-7. The noise is fp64 and finite (``u`` clamped away from 0), so a filtered token (-inf) is never drawn.
    """

    def __init__(self, row_keys: list[tuple[int, ...]], prompt_width: int):
        self.row_keys = row_keys
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.size(1) - self.prompt_width  # the completion token being drawn
        noise = torch.stack([self.gumbel(scores.size(1), stream_seed(*key, position)) for key in self.row_keys])
        choice = (scores.double() + noise.to(scores.device)).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, -math.inf).scatter_(1, choice, 0.0)

    @staticmethod
    def gumbel(size: int, seed: int) -> torch.Tensor:
        """``size`` standard Gumbel variates (fp64, finite) from a generator seeded with ``seed``."""
        u = torch.rand(size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        return -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float64).tiny)))
