"""2 steps of WMSS-GRPO with vLLM for the policy (TRL's colocate mode) and for the weak model (its own colocated
engine), on CPU, in one process. Prints one JSON line (``RESULT {...}``) for tests/test_vllm_weak.py.

    python tests/dist/vllm_grpo_run.py WORKDIR
"""

import json
import os
import sys


os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest


def keep_vllm_cpu_weights() -> None:
    """vLLM's CPU build packs every linear layer's weight (oneDNN, or the SGL kernel for bf16 on AMX CPUs) and drops
    the original Parameter (``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``), so TRL's colocate
    weight sync (``load_weights``) fails with "'Parameter' object has no attribute 'weight_loader'". With both off,
    vLLM keeps the weights and uses ``torch.nn.functional.linear``, and TRL's sync works. CPU only (on GPU there is
    no packing); the weak engine is never synced and does not need this."""
    import vllm._custom_ops
    import vllm.model_executor.layers.utils

    vllm._custom_ops._supports_onednn = False
    vllm.model_executor.layers.utils.check_cpu_sgl_kernel = lambda n, k, dtype: False


def main(workdir: str) -> None:
    import torch
    from conftest import cpu_args
    from grpo_common import has_digit, prompt_dataset

    from wmss_trl import WMSSGRPOConfig, WMSSGRPOTrainer
    from wmss_trl.grpo import SOURCE_WEAK_NEGATIVE
    from wmss_trl.rollouts.vllm_engine import WeakVLLMEngine
    from wmss_trl.toy import build_char_tokenizer, build_tiny_model, load_tokenizer, save_model_and_tokenizer

    keep_vllm_cpu_weights()
    tok = build_char_tokenizer()
    paths = {}
    for name, seed in (("strong", 1), ("weak", 2)):  # 2 heads of 32: a head size vLLM's CPU attention supports
        paths[name] = save_model_and_tokenizer(
            build_tiny_model(tok, hidden_size=64, num_heads=2, seed=seed), tok, os.path.join(workdir, name)
        )
    args = cpu_args(
        WMSSGRPOConfig,
        os.path.join(workdir, "out"),
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_weak_generations=2,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=128,
        max_steps=2,
        weak_use_vllm=os.environ.get("WMSS_TEST_WEAK_HF") != "1",
    )
    trainer = WMSSGRPOTrainer(
        paths["strong"],
        has_digit,
        args=args,
        train_dataset=prompt_dataset(16),
        processing_class=load_tokenizer(paths["strong"]),
        weak_model=paths["weak"],
    )
    trainer.train()
    stats = trainer.wmss_stats
    weak_rows = stats.behaviour_logps.size(0)
    # the weak rows' behaviour log-probs (vLLM's) against a transformers forward of the weak model: log softmax(z / T)
    n_pol = stats.source.numel() - weak_rows
    neg = stats.source[n_pol:] == SOURCE_WEAK_NEGATIVE
    history = trainer.state.log_history
    print(
        "RESULT "
        + json.dumps(
            {
                "weak_engine": type(trainer.weak_sampler.vllm).__name__,
                "is_weak_engine": isinstance(trainer.weak_sampler.vllm, WeakVLLMEngine),
                "weak_model_loaded": trainer.weak_model is not None,  # transformers' copy: only when something reads it
                "weak_engine_dtype": getattr(trainer.weak_sampler.vllm, "dtype", None),
                "policy_vllm": trainer.use_vllm and trainer.vllm_mode == "colocate",
                "steps": trainer.state.global_step,
                "losses": [h["loss"] for h in history if "loss" in h],
                "weak_accuracy": [h.get("wmss/weak_accuracy") for h in history if "loss" in h],
                "weak_rows": weak_rows,
                "negatives": int(neg.sum()),
                "behaviour_finite": bool(torch.isfinite(stats.behaviour_logps[stats.weak_mask.bool()]).all()),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1])
