"""Size of GRPO's k3 KL term on the weak negatives' tokens: the weak model as reference vs the reference used now.

The repro of docs/real_model.md section 5 (toy models from the test helpers, about 20 s on a CPU):

    OMP_NUM_THREADS=1 python scripts/repro_kl_weak_negatives.py

A confident policy and a confident weak model, ``beta=0.04``, 4 weak samples per group and a verifier that marks the
weak samples wrong. It prints the number of selected weak-negative rows, the mean and max per-token k3 on their tokens
with the weak model as reference (before the fix), and the max with the reference the loss receives now (0). It reads
the trainer's step statistics (``trainer.wmss_stats``) and calls TRL's private ``_generate_and_score_completions``: a diagnostic,
not an example of the public API.
"""

import os
import sys
import tempfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "dist")]

import torch  # noqa: E402
from grpo_common import grpo_args, has_digit, prompt_dataset  # noqa: E402

from wmss_trl import WMSSGRPOTrainer  # noqa: E402
from wmss_trl.toy import build_char_tokenizer, build_tiny_model, load_tokenizer, save_model_and_tokenizer  # noqa: E402


def saved(root, tok, seed, scale, name):
    """A tiny model whose output embeddings are scaled by ``scale`` (confident, like an SFT'd model), saved."""
    m = build_tiny_model(tok, seed=seed)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(scale)
    return save_model_and_tokenizer(m, tok, f"{root}/{name}")


def no_digit(prompts, completions, **kw):
    return [1 - r for r in has_digit(prompts, completions)]


def main():
    root, tok = tempfile.mkdtemp(), build_char_tokenizer()
    strong, weak = saved(root, tok, 1, 10, "strong"), saved(root, tok, 2, 20, "weak")
    args = grpo_args(
        f"{root}/out", beta=0.04, num_weak_generations=4, per_device_train_batch_size=16, weak_model_name_or_path=weak
    )
    tr = WMSSGRPOTrainer(
        strong, no_digit, args=args, train_dataset=prompt_dataset(16), processing_class=load_tokenizer(strong)
    )
    tr.model.train()  # weak negatives are drawn in training mode only
    torch.manual_seed(0)
    batch = tr._generate_and_score_completions([dict(tr.train_dataset[i]) for i in range(4) for _ in range(4)])
    d = tr.wmss_stats
    neg = batch["completion_mask"].bool() & (d.source == 1).unsqueeze(1)  # tokens of the selected weak negatives

    def k3(r):
        return (torch.exp(r) - r - 1)[neg]

    before = k3(d.weak_logps - d.policy_logps)  # reference = weak model (before the fix)
    now = k3(batch["ref_per_token_logps"] - d.policy_logps)  # the reference the loss receives now
    print(f"weak-negative rows: {int((d.source == 1).sum())}")
    print(f"k3 with the weak model as reference: mean {before.mean().item():.1f}, max {before.max().item():.0f}")
    print(f"k3 with the reference the loss receives now: max |k3| {now.abs().max().item():.3g}")


if __name__ == "__main__":
    main()
