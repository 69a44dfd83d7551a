"""Per-rank memory and time of WMSS-GRPO under DeepSpeed ZeRO-3, measured at 1 and 2 processes (a benchmark, not a
test), and the paper model that extrapolates it to 8 and 64 GPUs (docs/scaling.md).

    OMP_NUM_THREADS=1 python scripts/scaling.py [--model STRONG_DIR] [--steps 3] [--output docs/results/scaling.json]
    python scripts/scaling.py --extrapolate          # the paper model only (no measurement)

Arms, same prompts, model and sampling settings, each in fresh ``accelerate launch`` processes with the shipped
ZeRO-3 config (``num_processes`` set to 1 or 2):

* ``vanilla_b0``: TRL's ``GRPOTrainer``, ``beta = 0`` (no reference model);
* ``vanilla_kl``: TRL's ``GRPOTrainer``, ``beta = 0.04`` (TRL's reference copy of the policy, sharded like it);
* ``wmss``: ``WMSSGRPOTrainer`` with a weak model, weak negatives (``num_weak_generations = num_generations / 4``),
  entropy-weighted advantages and ``beta = 0.04`` (the weak model is the reference, so it replaces TRL's copy).

Each rank reports what it holds: bytes of the policy's parameters (its ZeRO-3 partition, ``ds_tensor``), of the
weak / reference model's, of the optimizer's fp32 partition and Adam states, its peak resident set during
``train()`` minus the resident set before the trainer was built ("train memory", the CPU analogue of allocated GPU
memory), and the mean wall / CPU time of an optimizer step (the first generation cycle dropped: the first step at the
default ``--steps_per_generation 1``, which every arm shares). With 1 torch thread per rank the CPU time is the work
done, unaffected by other load; wall time at 2 processes on 2 cores also pays for the collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ARMS = ("vanilla_b0", "vanilla_kl", "wmss")
MB = 2**20


# --------------------------------------------------------------------------------------------------------- measured
def local_bytes(module) -> int:
    """Bytes of ``module``'s parameters this rank holds: the ZeRO-3 partition (``ds_tensor``) when sharded, else the
    whole tensor."""
    total = 0
    for p in module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        total += t.numel() * t.element_size()
    return total


def optimizer_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (Adam's m and v) plus, under ZeRO, its fp32 master partition."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate / DeepSpeed wrappers
    inner = getattr(inner, "optimizer", inner)
    total = sum(
        v.numel() * v.element_size() for state in inner.state.values() for v in state.values() if hasattr(v, "numel")
    )
    for flat in getattr(getattr(optimizer, "optimizer", optimizer), "fp32_partitioned_groups_flat", []) or []:
        total += flat.numel() * flat.element_size()
    return total


def run_rank(kind: str, strong: str, weak: str, a) -> dict:
    """Inside ``accelerate launch``: build one arm, train ``S + a.steps`` steps (S = ``--steps_per_generation``),
    report this rank's numbers."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its neighbours, also under PYTHONSAFEPATH
    from bench_grpo import StepTimer, dataset, digit_fraction, make_args
    from bench_sft import PeakRSS, rss_mb
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.recipes.common import load_tokenizer

    base = rss_mb()
    # bench_grpo's settings of the same arm (completions forced to full length, 2 weak rows per group of 8, the same
    # steps_per_generation S for every arm): one warm-up generation cycle of S steps, then ``a.steps`` timed steps
    bench_kind = {"vanilla_b0": "vanilla_b0", "vanilla_kl": "vanilla_kl", "wmss": "wmss_full"}[kind]
    a.free_length, a.pool = False, None
    args = make_args(bench_kind, tempfile.mkdtemp(prefix=f"scaling_{kind}_"), a, 0.0 if kind == "vanilla_b0" else 0.04)
    timer = StepTimer()
    common = dict(args=args, train_dataset=dataset(4096), processing_class=load_tokenizer(strong), callbacks=[timer])
    if kind == "wmss":
        trainer = WMSSGRPOTrainer(strong, digit_fraction, weak_model=weak, **common)
    else:
        trainer = GRPOTrainer(strong, digit_fraction, **common)
    trainer.remove_callback(PrinterCallback)
    with PeakRSS() as memory:
        trainer.train()
    policy = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    second = getattr(trainer, "weak_model", None) or getattr(trainer, "ref_model", None)
    return {
        "kind": kind,
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "policy_mb": local_bytes(policy) / MB,
        "weak_or_ref_mb": local_bytes(second) / MB if second is not None else 0.0,
        "optimizer_mb": optimizer_bytes(trainer.optimizer) / MB,
        "train_mb": memory.peak - base,
        "peak_mb": memory.peak,
        "step_s": statistics.fmean(timer.times[a.steps_per_generation :]),
        "step_cpu_s": statistics.fmean(timer.cpu_times[a.steps_per_generation :]),
    }


def launch(kind: str, nproc: int, strong: str, weak: str, argv: list[str]) -> list[dict]:
    """``accelerate launch`` the shipped ZeRO-3 config with ``nproc`` processes; one result per rank."""
    import yaml

    from wmss_trl.launch import resolve_accelerate_config

    with open(resolve_accelerate_config("zero3")) as f:
        config = yaml.safe_load(f)
    config["num_processes"] = nproc
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    yaml.safe_dump(config, cfg)
    cfg.close()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.name, "--main_process_port"]
    cmd += [str(29500 + nproc), os.path.abspath(__file__), *argv, "--child", kind, "--paths", f"{strong},{weak}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"{kind} at {nproc} process(es) failed:\n{proc.stderr[-6000:]}")
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    for r in rows:
        r["launch_s"] = time.perf_counter() - start
    return rows


def print_table(path: str) -> None:
    """The measured runs of ``path`` as one markdown table (one row per model, arm and process count; the ranks'
    mean, since their partitions are equal)."""
    print(
        "| model | arm | processes | policy / rank (MB) | weak or ref / rank (MB) | optimizer / rank (MB) | train memory / rank (MB) | step CPU (s) | step wall (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in json.load(open(path)):
        groups = {}
        for r in run["rows"]:
            groups.setdefault((r["kind"], r["world_size"]), []).append(r)
        for (kind, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], ARMS.index(kv[0][0]))):
            mean = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0] if isinstance(rs[0][k], float)}
            print(
                f"| {run['model'].split('/')[-1]} | {kind} | {n} | {mean['policy_mb']:.1f} | {mean['weak_or_ref_mb']:.1f} | "
                f"{mean['optimizer_mb']:.1f} | {mean['train_mb']:.0f} | {mean['step_cpu_s']:.2f} | {mean['step_s']:.2f} |"
            )


# ------------------------------------------------------------------------------------------------------ paper model
# Shapes of the two models the paper model is written for (Qwen3-4B / Qwen3-8B, from their config.json).
MODELS = {
    "4B": {"params": 4.02e9, "hidden": 2560, "layers": 36, "vocab": 151_936},
    "8B": {"params": 8.19e9, "hidden": 4096, "layers": 36, "vocab": 151_936},
}


def paper_model(name: str, gpus: int, tokens: int = 16 * 1024, weak_share: float = 0.25) -> dict:
    """Per-GPU memory (GB) of one GRPO training step under ZeRO-3 with bf16 mixed precision on ``gpus`` GPUs.

    With P parameters: policy weights 2P/N + gradients 2P/N + fp32 master and Adam m, v 12P/N (ZeRO-3 shards all
    three); the weak model (WMSS) or TRL's reference (vanilla, beta > 0) 2P/N in bf16; activations of a micro-batch
    of T tokens with activation checkpointing: 2 T h L (the checkpointed layer inputs) + 34 T h (one layer being
    recomputed, Korthikanti et al. 2022, without the attention-score term that flash attention removes) + the fp32
    logits of one chunk; WMSS trains (1 + weak_share) T tokens (its weak rows) and, with WD-JT, holds the weak
    model's logits chunk too. A colocated vLLM engine holds the full bf16 weights (2P, tensor parallel 1) plus its KV
    cache; the weak engine is a second one; a precomputed weak-rollout pool needs none at train time.
    """
    m = MODELS[name]
    p, h, layers, vocab = m["params"], m["hidden"], m["layers"], m["vocab"]
    gb = 1e9
    chunk = 1024  # tokens per logits chunk (mixing_chunk_size-like)

    def activations(t):
        return (2 * t * h * layers + 34 * t * h) / gb + chunk * vocab * 4 / gb

    states = 16 * p / gpus / gb
    second = 2 * p / gpus / gb
    return {
        "model": name,
        "gpus": gpus,
        "states_gb": states,
        "weak_or_ref_gb": second,
        "act_vanilla_gb": activations(tokens),
        "act_wmss_gb": activations((1 + weak_share) * tokens) + chunk * vocab * 4 / gb,
        "vllm_engine_weights_gb": 2 * p / gb,
    }


def print_paper_model() -> list[dict]:
    rows = [paper_model(n, g) for n in MODELS for g in (8, 64)]
    print("paper model, per GPU (GB), 16k tokens per micro-batch, weak rows = 25 % of the policy's:")
    print("| model | GPUs | policy states | weak (= vanilla ref) | act. vanilla | act. WMSS | vLLM engine weights |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['gpus']} | {r['states_gb']:.1f} | {r['weak_or_ref_gb']:.2f} | "
            f"{r['act_vanilla_gb']:.1f} | {r['act_wmss_gb']:.1f} | {r['vllm_engine_weights_gb']:.1f} |"
        )
    return rows


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    from bench_grpo import add_model_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p, completion_length=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps (plus one warm-up generation cycle)")
    p.add_argument(
        "--steps_per_generation",
        type=int,
        default=1,
        help="TRL's steps_per_generation, the same for every arm (--steps must be a multiple of it)",
    )
    p.add_argument("--processes", default="1,2")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--output", help="append the results to this JSON file (a list of runs)")
    p.add_argument("--extrapolate", action="store_true", help="print the paper model only")
    p.add_argument("--table", metavar="JSON", help="print the measured runs of this JSON file as a markdown table")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps_per_generation < 1 or a.steps < 1 or a.steps % a.steps_per_generation:
        raise SystemExit(f"--steps ({a.steps}) must be a positive multiple of --steps_per_generation.")
    if a.extrapolate or a.table:
        print_table(a.table) if a.table else print_paper_model()
        return
    if a.child:
        strong, weak = a.paths.split(",")
        print("RESULT " + json.dumps(run_rank(a.child, strong, weak, a)), flush=True)
        return
    from bench_grpo import build_models

    from wmss_trl.machine import describe_machine

    if a.model:
        strong, weak = a.model, a.weak or a.model
    else:
        strong, weak = build_models(tempfile.mkdtemp(prefix="scaling_models_"), a.hidden, a.layers)
    raw = sys.argv[1:] if argv is None else list(argv)
    child_argv = [f"--num_generations={a.num_generations}", f"--batch={a.batch}", f"--steps={a.steps}"]
    child_argv.append(f"--steps_per_generation={a.steps_per_generation}")
    child_argv.append(f"--completion_length={a.completion_length}")
    print(f"scaling: {strong} (weak {weak}); {describe_machine()}", flush=True)
    rows = []
    for nproc in [int(x) for x in a.processes.split(",")]:
        for kind in a.arms.split(","):
            for r in launch(kind, nproc, strong, weak, child_argv):
                rows.append(r)
                print(
                    f"{kind:>10} x{nproc} rank {r['rank']}: policy {r['policy_mb']:.1f} MB, weak/ref "
                    f"{r['weak_or_ref_mb']:.1f} MB, optimizer {r['optimizer_mb']:.1f} MB, train memory "
                    f"{r['train_mb']:.0f} MB, step {r['step_s']:.2f} s wall / {r['step_cpu_s']:.2f} s CPU",
                    flush=True,
                )
    if a.output:
        runs = json.load(open(a.output)) if os.path.exists(a.output) else []
        runs.append({"model": a.model or f"toy h{a.hidden} L{a.layers}", "argv": raw, "rows": rows})
        with open(a.output, "w") as f:
            json.dump(runs, f, indent=1)
    print_paper_model()


if __name__ == "__main__":
    main()
