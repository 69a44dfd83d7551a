"""The WMSS-GRPO batch as pure functions (no trainer): weak rows appended to TRL's batch, padding rows dropped.

A batch is TRL's dict of ``(rows, ...)`` tensors. With weak negatives it holds ``[policy rows; weak rows]``: prompts
left-padded and completions right-padded to common widths, and a ``wmss_source`` column (:data:`SOURCE_POLICY`,
:data:`SOURCE_WEAK_NEGATIVE`, :data:`SOURCE_WEAK_UNUSED`). Unused weak rows carry no loss token (completion mask 0,
advantage 0) and are dropped before TRL's loss (:func:`loss_rows`, :func:`select_rows`).
"""

from __future__ import annotations

import torch
from trl.trainer.utils import pad


# codes of the `wmss_source` column of the batch
SOURCE_POLICY, SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED = 0, 1, 2
SOURCE_NAMES = {SOURCE_POLICY: "policy", SOURCE_WEAK_NEGATIVE: "weak_negative", SOURCE_WEAK_UNUSED: "weak_unused"}
# TRL loss types that average over the rows of a micro-batch (the others normalise by token counts)
ROW_AVERAGED_LOSSES = ("grpo", "sapo", "luspo", "dr_grpo")
# the fields of TRL's batch that weak rows know how to extend
KNOWN_FIELDS = {
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "advantages",
    "num_items_in_batch",
    "old_per_token_logps",
    "sampling_per_token_logps",
    "importance_sampling_ratio",
    "ref_per_token_logps",
}


def pad_to(t: torch.Tensor, width: int, value, side: str = "right") -> torch.Tensor:
    """Pad a ``(B, T)`` tensor to ``(B, width)`` on ``side`` with ``value``."""
    extra = width - t.size(1)
    if extra <= 0:
        return t
    filler = torch.full((t.size(0), extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([filler, t] if side == "left" else [t, filler], dim=1)


def weak_row_parents(n_policy_rows: int, num_generations: int, num_weak_generations: int) -> list[int]:
    """The policy row whose prompt each weak row uses: ``n_w = B * K / G`` weak rows, weak row ``l`` takes the prompt
    of policy row ``l * G // K``, so every group of G policy rows gets exactly K weak rows."""
    g, k = num_generations, num_weak_generations
    return [(j * g) // k for j in range(n_policy_rows * k // g)]


def append_weak_rows(
    out: dict, weak_prompt_ids: list[list[int]], weak_completion_ids: list[list[int]], pad_id: int, weak_mask=None
) -> dict[str, torch.Tensor]:
    """``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask`` of ``[out's rows; weak rows]``: prompts
    left-padded, completions right-padded to the widths of the longest row. ``weak_mask`` (``(n_w,)`` bool, optional)
    zeroes the completion mask of weak rows that must carry no loss (e.g. truncated, with
    ``mask_truncated_completions``)."""
    device = out["prompt_ids"].device
    prompts = [torch.tensor(x, dtype=torch.long) for x in weak_prompt_ids]
    completions = [torch.tensor(x, dtype=torch.long) for x in weak_completion_ids]
    width_p = max(out["prompt_ids"].size(1), max(len(x) for x in prompts))
    width_c = max(out["completion_ids"].size(1), max(len(x) for x in completions))
    w_prompt_mask = pad([torch.ones_like(x) for x in prompts], 0, "left").to(device)
    w_prompt_ids = pad(prompts, pad_id, "left").to(device)
    w_comp_mask = pad([torch.ones_like(x) for x in completions], 0, "right").to(device)
    w_comp_ids = pad(completions, pad_id, "right").to(device)
    if weak_mask is not None:
        w_comp_mask = w_comp_mask * torch.as_tensor(weak_mask, device=device).unsqueeze(1).int()
    return {
        "prompt_ids": torch.cat(
            [pad_to(out["prompt_ids"], width_p, pad_id, "left"), pad_to(w_prompt_ids, width_p, pad_id, "left")]
        ),
        "prompt_mask": torch.cat(
            [pad_to(out["prompt_mask"], width_p, 0, "left"), pad_to(w_prompt_mask, width_p, 0, "left")]
        ),
        "completion_ids": torch.cat(
            [pad_to(out["completion_ids"], width_c, pad_id), pad_to(w_comp_ids, width_c, pad_id)]
        ),
        "completion_mask": torch.cat([pad_to(out["completion_mask"], width_c, 0), pad_to(w_comp_mask, width_c, 0)]),
    }


def extend_logps_fields(out: dict, width: int, weak_old_logps: torch.Tensor, weak_sampling_logps: torch.Tensor):
    """TRL's optional per-token fields of the policy rows, extended to the weak rows and to ``width`` in place: the old
    policy's log-probs (``weak_old_logps``), the sampler's (``weak_sampling_logps``, the weak model's) and an
    importance ratio of 1."""
    n_weak = weak_old_logps.size(0)
    if out.get("old_per_token_logps") is not None:
        out["old_per_token_logps"] = torch.cat([pad_to(out["old_per_token_logps"], width, 0.0), weak_old_logps])
    if out.get("sampling_per_token_logps") is not None:
        out["sampling_per_token_logps"] = torch.cat(
            [pad_to(out["sampling_per_token_logps"], width, 0.0), weak_sampling_logps]
        )
    if out.get("importance_sampling_ratio") is not None:
        ratio = out["importance_sampling_ratio"]
        if ratio.size(1) > 1:
            ratio = pad_to(ratio, width, 1.0)
        out["importance_sampling_ratio"] = torch.cat(
            [ratio, torch.ones(n_weak, ratio.size(1), device=ratio.device, dtype=ratio.dtype)]
        )


def loss_rows(source: torch.Tensor, rows: int) -> torch.Tensor:
    """Which rows of a micro-batch go to the loss: every row but the unused weak ones, topped up with unused ones (in
    order) to ``rows`` rows when fewer are left (every process must run the same number of rows)."""
    keep = source != SOURCE_WEAK_UNUSED
    keep[(~keep).nonzero().flatten()[: rows - int(keep.sum())]] = True
    return keep


def select_rows(inputs: dict, keep: torch.Tensor) -> dict:
    """``inputs`` with every per-row tensor (first dimension = the row count) restricted to the rows of ``keep``."""
    n = keep.size(0)
    return {
        key: value[keep] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == n else value
        for key, value in inputs.items()
    }
