"""Step time of WMSS-GRPO vs vanilla TRL GRPO in the same run (a benchmark, not a test).

    OMP_NUM_THREADS=1 python scripts/bench_grpo.py [--hidden 256 --layers 4] [--steps 4 --rounds 3]
                                                   [--steps_per_generation 1] [--weak_rollout_prefetch 3]
                                                   [--model STRONG_DIR --weak WEAK_DIR]

Both trainers live in one process, on the same prompts, models and sampling settings, and train in alternating
rounds (vanilla, WMSS, vanilla, WMSS, ...) so that load from other processes on the machine hits both alike. The
time of an optimizer step is measured by a callback from ``on_step_begin`` to ``on_step_end`` (generation,
scoring, weak rollouts, forwards, backward and optimizer step). ``--steps_per_generation S`` is TRL's
``steps_per_generation`` for BOTH arms of a pair (so the ratio compares equal configs): one generation batch of S
optimizer steps' rows, policy and weak rows each sampled in one call, every S steps. ``--weak_rollout_prefetch P``
(the config's default, 3) is the WMSS arms' weak read-ahead: the weak rows of P + 1 generation batches in one call,
while the policy still generates every S steps. A cycle is ``S * (P + 1)`` steps (one weak call); the first cycle of
every round is dropped (warm-up), and ``--steps`` must be a multiple of the cycle, so each round times whole cycles
(the step time reported is the **mean** over the timed steps: a median would hide the expensive step).
Two clocks are reported: wall time, and the CPU time of this process. With one torch thread the CPU time is the
work done, unaffected by other processes competing for the cores, so on a shared machine it is the reliable one.

Compared pairs (``num_weak_generations = num_generations / 4``):

* ``negatives``: WMSS with weak negatives only vs vanilla, both ``beta = 0``;
* ``full``: WMSS with weak negatives + entropy-weighted advantages + KL to the weak model (``beta = 0.04``) vs
  vanilla with ``beta = 0.04`` (KL to TRL's copy of the policy). This is the headline ratio (target <= 1.35x).
* ``pool``: WMSS with weak negatives read from a precomputed weak-rollout pool (``weak_rollouts_path``, built once
  with ``build_pool`` before the timed rounds, with the run's sampling settings; the weak model is not loaded, beta =
  0) vs vanilla, beta = 0 (target <= 1.15x: the floor is the extra training rows). The one-off build cost (wall and
  CPU time per prompt, transformers backend, model load excluded) is printed.
* ``vllm`` (only where vllm is importable): both arms with ``use_vllm=True, vllm_mode="colocate"`` (TRL's engine
  for the policy), WMSS with the weak model's own colocated engine too, beta = 0 (target <= 1.25x). On vLLM's CPU
  build the linear-weight packing is switched off (:func:`keep_vllm_cpu_weights`, as tests/dist/vllm_grpo_run.py
  does) so that TRL's weight sync into its engine works; ``min_new_tokens`` becomes vLLM's ``min_tokens``. The
  colocated engines leave ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` in the environment, which would make every later
  trainer of the process wrap its model in a one-process ``DistributedDataParallel``; they are cleared before each
  trainer, so that every arm runs as a single-process run does (no DDP). Each trainer's engines stay in the process
  (about 1.5 GB each here): ``--pairs vllm,floor_vllm`` at 64 rows ran out of 23 GB after 7 trainers, so run it with
  ``--rounds 1`` or 2 on such a machine.
* ``floor`` / ``floor_vllm`` (references, no target): vanilla GRPO vs vanilla GRPO that trains on the same number of
  extra rows as WMSS appends (``B * K / G`` per process: copies of policy rows, :class:`ExtraRowsGRPOTrainer`), no
  weak model (``floor_vllm``: both on vLLM). Its ratio is the floor of the WMSS ratios: the cost of the extra
  training rows alone, with every weak row selected as a negative (as nearly all are here).

Completions are forced to ``max_completion_length`` tokens (``min_new_tokens``) unless ``--free_length``: after the
first step the two arms sample different completions, and with free lengths the step time follows the sampled
lengths more than the method.

Memory: after the timed rounds each of the four trainers runs again, alone in a fresh subprocess, for
``--memory_steps`` steps; its peak resident set during ``train()`` minus the resident set after imports ("train
memory", the CPU analogue of a GPU's allocated memory) is compared between the arms of each pair. ``--memory_steps 0``
skips it.

Without ``--model`` a toy Qwen2 (character vocabulary) of the given size is built from config, and the weak model is a
second random initialisation of it. With ``--model DIR`` (e.g. SmolLM2-135M-Instruct from
``scripts/prepare_smollm2.py``) the weak model is ``--weak DIR``, by default a second copy of the same checkpoint
(the cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from trl import GRPOTrainer  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time and CPU time of the process for each optimizer step."""

    def __init__(self):
        self.times, self.cpu_times, self._start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start[0])
        self.cpu_times.append(time.process_time() - self._start[1])


class ExtraRowsGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer training on ``B * K / G`` more rows per process (``K = G / 4``), as WMSS-GRPO appends weak
    rows: row ``l`` of the extra rows is a copy of policy row ``l * G // K`` (the parent of WMSS's weak row ``l``),
    same prompt, completion and advantage. The floor arm: the extra training rows without any weak model."""

    def _generate_and_score_completions(self, inputs):
        from wmss_trl.grpo.batch import weak_row_parents

        out = super()._generate_and_score_completions(inputs)
        n = out["prompt_ids"].size(0)
        parents = torch.tensor(weak_row_parents(n, self.num_generations, self.num_generations // 4))
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == n:
                out[key] = torch.cat([value, value[parents.to(value.device)]])
        out["num_items_in_batch"] = self.accelerator.gather(out["completion_mask"].sum()).sum()
        return out


def digit_fraction(prompts, completions, **kwargs):
    """Fraction of digit characters: a continuous reward; below 0.5 counts as wrong for the weak negatives."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def build_models(root, hidden, layers):
    from wmss_trl.toy import build_char_tokenizer, build_tiny_model, save_model_and_tokenizer

    tok = build_char_tokenizer()
    heads = max(1, hidden // 32)
    strong = save_model_and_tokenizer(
        build_tiny_model(tok, hidden, layers, heads, seed=1), tok, os.path.join(root, "strong")
    )
    weak = save_model_and_tokenizer(
        build_tiny_model(tok, hidden, layers, heads, seed=2), tok, os.path.join(root, "weak")
    )
    return strong, weak


def dataset(n):
    from datasets import Dataset

    rows = [{"prompt": [{"role": "user", "content": f"{i % 10}+{(3 * i) % 10}="}]} for i in range(n)]
    return Dataset.from_list(rows)


def keep_vllm_cpu_weights() -> None:
    """vLLM's CPU build packs every linear layer's weight and drops the original Parameter, so TRL's colocate weight
    sync fails ("'Parameter' object has no attribute 'weight_loader'"); with the packing off vLLM keeps the weights
    and uses ``torch.nn.functional.linear`` (the same switch as tests/dist/vllm_grpo_run.py; CPU only)."""
    import vllm._custom_ops
    import vllm.model_executor.layers.utils

    vllm._custom_ops._supports_onednn = False
    vllm.model_executor.layers.utils.check_cpu_sgl_kernel = lambda n, k, dtype: False


def cycle(a) -> int:
    """Optimizer steps per weak call (policy generation every S steps, one weak call every P + 1 generations)."""
    return a.steps_per_generation * (a.weak_rollout_prefetch + 1)


def make_args(kind, out, a, beta):
    from wmss_trl import WMSSGRPOConfig

    g = a.num_generations
    kw = dict(
        output_dir=os.path.join(out, kind),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        activation_checkpointing=False,
        logging_steps=10_000,
        per_device_train_batch_size=a.batch,
        num_generations=g,
        max_completion_length=a.completion_length,
        steps_per_generation=a.steps_per_generation,
        max_steps=cycle(a) + a.steps,  # one warm-up cycle, then the timed steps
        learning_rate=1e-5,
        seed=0,
        disable_tqdm=True,
        beta=beta,
    )
    on_vllm = kind.endswith("_vllm")
    if not a.free_length:  # every completion (policy and weak) decodes max_completion_length tokens
        kw["generation_kwargs"] = {("min_tokens" if on_vllm else "min_new_tokens"): a.completion_length}
    if on_vllm:
        kw.update(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128 + a.completion_length)
    if kind.startswith("wmss"):
        kw.update(num_weak_generations=g // 4, weak_rollout_prefetch=a.weak_rollout_prefetch)
        if kind == "wmss_full":
            kw.update(entropy_weighted_advantages=True)
        if kind == "wmss_pool":
            kw.update(weak_rollouts_path=a.pool)
    return WMSSGRPOConfig(**kw)


def make_trainer(kind, strong, weak, out, a, beta, timer):
    from wmss_trl import WMSSGRPOTrainer
    from wmss_trl.recipes.common import load_tokenizer

    if kind.endswith("_vllm"):  # left by an earlier trainer's colocated engines: they would make this one use DDP
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(name, None)
    args = make_args(kind, out, a, beta)
    common = dict(args=args, train_dataset=dataset(4096), processing_class=load_tokenizer(strong), callbacks=[timer])
    if kind.startswith("wmss"):
        return WMSSGRPOTrainer(strong, digit_fraction, weak_model=weak, **common)
    trainer_class = ExtraRowsGRPOTrainer if kind.startswith("vanilla_rows") else GRPOTrainer
    return trainer_class(strong, digit_fraction, **common)


PAIRS = {
    "negatives": ("vanilla_b0", "wmss_neg", 0.0),
    "full": ("vanilla_kl", "wmss_full", 0.04),
    "pool": ("vanilla_b0", "wmss_pool", 0.0),
    "vllm": ("vanilla_vllm", "wmss_vllm", 0.0),
    "floor": ("vanilla_b0", "vanilla_rows", 0.0),
    "floor_vllm": ("vanilla_vllm", "vanilla_rows_vllm", 0.0),
}
TARGETS = {"negatives": 1.35, "full": 1.35, "pool": 1.15, "vllm": 1.25, "floor": None, "floor_vllm": None}


def build_bench_pool(weak, root, a) -> dict:
    """Build the weak-rollout pool of the ``pool`` arm once (the weak model's folder, the run's sampling settings, as
    many epochs as the run needs) and time it: wall and CPU seconds per distinct prompt, weak model load excluded."""
    from transformers import AutoModelForCausalLM

    from wmss_trl.grpo.checks import pool_epochs_needed
    from wmss_trl.recipes.common import load_tokenizer
    from wmss_trl.rollouts import RolloutConfig, build_pool
    from wmss_trl.rollouts.config import sampling_settings

    args = make_args("wmss_pool", root, a, 0.0)
    data = dataset(4096)
    cfg = RolloutConfig(
        **sampling_settings(args),
        num_generations=args.num_weak_generations,
        epochs=pool_epochs_needed(args, len(data)),
        seed=args.seed,
        progress=False,
    )
    model, tok = AutoModelForCausalLM.from_pretrained(weak).eval(), load_tokenizer(weak)
    start = (time.perf_counter(), time.process_time())
    manifest = build_pool(data, model, tok, a.pool, cfg, model_path=weak)
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    n = len(manifest["prompt_ids"])
    out = {"prompts": n, "rows": manifest["num_rows"], "wall_s": wall, "cpu_s": cpu}
    out |= {"wall_s_per_prompt": wall / n, "cpu_s_per_prompt": cpu / n, "batch_size": cfg.batch_size}
    print(
        f"pool build (one-off, transformers backend, batch_size {cfg.batch_size}): {n} distinct prompts x "
        f"{cfg.epochs} epoch(s) x {cfg.num_generations} completions = {manifest['num_rows']} rows in wall {wall:.2f} s"
        f" / cpu {cpu:.2f} s: {wall / n:.3f} s wall, {cpu / n:.3f} s cpu per prompt",
        flush=True,
    )
    return out


def run_child(kind, strong, weak, a):
    """In a fresh subprocess: train one arm for ``a.memory_steps`` steps, return its peak and train memory (MB)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its neighbours, also under PYTHONSAFEPATH
    from bench_sft import PeakRSS, rss_mb

    base = rss_mb()  # after imports (torch, transformers, trl, wmss_trl are imported by now)
    beta = next(b for vk, wk, b in PAIRS.values() if kind in (vk, wk))
    if kind.endswith("_vllm"):
        keep_vllm_cpu_weights()
    a.steps = max(a.memory_steps - cycle(a), 0)  # make_args adds a warm-up cycle
    trainer = make_trainer(kind, strong, weak, tempfile.mkdtemp(prefix="bench_grpo_mem_"), a, beta, StepTimer())
    trainer.remove_callback(PrinterCallback)
    with PeakRSS() as memory:
        trainer.train()
    return {"kind": kind, "peak_mb": memory.peak, "train_mb": memory.peak - base}


def measure_memory(strong, weak, a, kinds, argv):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = {}
    for kind in kinds:
        paths = f"{strong},{weak},{a.pool or ''}"
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", kind, "--paths", paths]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"memory run of {kind} failed:\n{proc.stderr[-4000:]}")
        results[kind] = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(
            f"memory {kind:>10}: train {results[kind]['train_mb']:.0f} MB, peak RSS {results[kind]['peak_mb']:.0f} MB",
            flush=True,
        )
    return results


def add_model_flags(p: argparse.ArgumentParser, completion_length: int) -> None:
    """The model and batch flags shared by the GRPO benchmarks (this script and ``scripts/scaling.py``)."""
    p.add_argument("--model", help="strong model folder (default: a toy model built from --hidden/--layers)")
    p.add_argument("--weak", help="weak model folder (default: another initialisation of the toy model / --model)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--completion_length", type=int, default=completion_length)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p, completion_length=32)
    p.add_argument(
        "--free_length",
        action="store_true",
        help="let completions stop at EOS (default: force max_completion_length tokens, so both arms decode "
        "the same number of tokens and the comparison is not blurred by sampled lengths)",
    )
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (plus one warm-up generation cycle)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", default="negatives,full")
    p.add_argument(
        "--steps_per_generation",
        type=int,
        default=1,
        help="TRL's steps_per_generation, for both arms: S steps' rows generated (policy and weak) in one call",
    )
    p.add_argument(
        "--weak_rollout_prefetch",
        type=int,
        default=3,
        help="the WMSS arms' weak read-ahead P (the config's default): P + 1 generation batches' weak rows per call",
    )
    p.add_argument("--memory_steps", type=int, default=3, help="steps of each memory run (0: no memory runs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--pool", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.num_generations % 4:
        raise SystemExit("--num_generations must be a multiple of 4 (num_weak_generations = num_generations / 4).")
    if a.steps_per_generation < 1 or a.weak_rollout_prefetch < 0 or (a.steps % cycle(a) and not a.child):
        raise SystemExit(
            f"--steps must be a multiple of --steps_per_generation x (--weak_rollout_prefetch + 1) = "
            f"{a.steps_per_generation} x ({a.weak_rollout_prefetch} + 1) (S >= 1, P >= 0), so that every round times "
            "whole cycles (one weak call each)."
        )
    names = a.pairs.split(",")
    unknown = [name for name in names if name not in PAIRS]
    if unknown:
        raise SystemExit(f"--pairs: unknown pair(s) {unknown}; choose from {sorted(PAIRS)}.")
    if any(name.endswith("vllm") for name in names):
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise SystemExit("--pairs vllm needs vllm (pip install '.[vllm]'); it is not importable here.")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if a.child:
        strong, weak, a.pool = a.paths.split(",")
        print("RESULT " + json.dumps(run_child(a.child, strong, weak, a)), flush=True)
        return 0

    from wmss_trl.machine import describe_machine, machine_info

    print(describe_machine(), flush=True)
    machine_start = machine_info()
    root = tempfile.mkdtemp(prefix="bench_grpo_")
    # without --weak, a real model is its own weak model: the weights do not change the cost, only the numbers
    strong, weak = (a.model, a.weak or a.model) if a.model else build_models(root, a.hidden, a.layers)
    chosen = [PAIRS[name] for name in names]
    pool_build = None
    if "pool" in names:
        a.pool = os.path.join(root, "pool")
        pool_build = build_bench_pool(weak, root, a)
    if any(name.endswith("vllm") for name in names):
        keep_vllm_cpu_weights()
        print(
            "vllm arms: vLLM's CPU linear-weight packing is off (keep_vllm_cpu_weights), as in the tests", flush=True
        )
    times = {kind: [] for vk, wk, _ in chosen for kind in (vk, wk)}
    cpu_times = {kind: [] for kind in times}
    for r in range(a.rounds):
        for vk, wk, beta in chosen:
            for kind in (vk, wk):
                timer = StepTimer()
                trainer = make_trainer(kind, strong, weak, root, a, beta, timer)
                trainer.remove_callback(PrinterCallback)
                trainer.train()
                timed = slice(cycle(a), None)  # drop the warm-up cycle
                times[kind] += timer.times[timed]
                cpu_times[kind] += timer.cpu_times[timed]
                print(
                    f"round {r} {kind:>10}: wall "
                    + ", ".join(f"{t:.3f}" for t in timer.times[timed])
                    + " s; cpu "
                    + ", ".join(f"{t:.3f}" for t in timer.cpu_times[timed])
                    + " s",
                    flush=True,
                )
                del trainer
                gc.collect()  # free what can be freed (vLLM's engines of earlier trainers stay: ~1.5 GB each)

    print(
        f"\nmodel: {f'toy hidden={a.hidden} layers={a.layers}' if not a.model else a.model}; "
        f"num_generations={a.num_generations}, num_weak_generations={a.num_generations // 4}, "
        f"per_device_train_batch_size={a.batch}, max_completion_length={a.completion_length}, "
        f"steps_per_generation={a.steps_per_generation} (both arms), weak_rollout_prefetch={a.weak_rollout_prefetch} "
        f"({'sampled lengths' if a.free_length else 'every completion at full length'}), "
        f"torch threads={torch.get_num_threads()}"
    )
    summary = {}
    if pool_build is not None:
        summary["pool_build"] = pool_build
        print(
            f"pool build (one-off): {pool_build['wall_s_per_prompt']:.3f} s wall, {pool_build['cpu_s_per_prompt']:.3f} "
            f"s cpu per prompt ({pool_build['rows'] // pool_build['prompts']} completions each)"
        )
    for name, (vk, wk, beta) in zip(names, chosen):
        summary[name] = {"beta": beta, "n": len(times[vk])}
        for clock, data in (("wall", times), ("cpu", cpu_times)):
            v, w = statistics.mean(data[vk]), statistics.mean(data[wk])
            summary[name].update({f"vanilla_{clock}_s": v, f"wmss_{clock}_s": w, f"ratio_{clock}": w / v})
            print(
                f"{name:>10} ({clock:>4}): vanilla {v:.3f} s/step, WMSS {w:.3f} s/step (mean of "
                f"{len(data[vk])}), ratio {w / v:.2f}x "
                + (f"(target <= {TARGETS[name]:.2f}x)" if TARGETS[name] else "(reference: the extra rows alone)")
            )
    if a.memory_steps > 0:
        memory = measure_memory(strong, weak, a, list(times), argv)
        for name, (vk, wk, _beta) in zip(names, chosen):
            v, w = memory[vk]["train_mb"], memory[wk]["train_mb"]
            summary[name].update(
                {
                    "vanilla_train_mb": v,
                    "wmss_train_mb": w,
                    "ratio_train_mb": w / v,
                    "ratio_peak_rss": memory[wk]["peak_mb"] / memory[vk]["peak_mb"],
                }
            )
            print(
                f"{name:>10} (memory): vanilla {v:.0f} MB, WMSS {w:.0f} MB train memory, ratio {w / v:.2f}x; "
                f"peak RSS ratio {memory[wk]['peak_mb'] / memory[vk]['peak_mb']:.2f}x"
            )
    machine_end = machine_info()
    print(describe_machine(machine_end) + " (at the end)")
    summary["machine"] = {**machine_start, "load_avg_end": machine_end["load_avg"]}
    print("RESULT " + json.dumps(summary))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
