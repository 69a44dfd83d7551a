"""Benchmark: step time and peak memory of WD-JT (WMSSSFTTrainer) vs plain SFT (TRL's SFTTrainer), same run.

    python scripts/bench_sft.py                 # default: hidden 512, 6 layers, vocab 32000, batch 8 x 256 tokens
    python scripts/bench_sft.py --steps 8 --hidden 256 --layers 4

The configurations, each in its own fresh subprocess (so peak memory is not polluted by the others), on the
same model, data, seed and batch:

    sft          plain TRL SFT, full fine-tuning (TRL 1.16's fused LM head: on CPU a chunked pure-torch fallback)
    sft_hf       plain SFT through transformers' Trainer and the model's own loss (full logits), same data
    wdjt         WD-JT with a separate frozen weak model (fp32, and bf16 as `wdjt_bf16weak`); with `logging_steps=1`
                 every step is a logged one, so it also computes the saturation metrics every step (their default,
                 `saturation_metrics=None`, computes them on logged steps only): `wdjt_nodiag` is the same run with
                 `saturation_metrics=False`, i.e. the WD-JT loss alone, the cost of a step that logs nothing
    sft_lora     plain TRL SFT with LoRA (and `sft_hf_lora`, the transformers-Trainer version)
    wdjt_lora    WD-JT with LoRA, the weak model being the adapter-disabled base (no second copy)

Step time: median over the steps after 2 warm-up steps, as wall time and as the process's CPU time (with one
thread the CPU time does not depend on what else the machine runs, so prefer it on a shared machine). Memory: the process's resident set, sampled every 2 ms
during `trainer.train()`; "train MB" is the peak minus the RSS measured right after imports (i.e. the memory that
models, data and training add, the CPU analogue of a GPU's allocated memory), "peak MB" the raw peak RSS. Ratios
are against the matching SFT baseline measured in this same invocation. Targets (issue 2): time <= 1.45x;
train memory <= 1.3x with a separate weak model, <= 1.1x with the adapter-disabled weak model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time


CONFIGS = ["sft", "sft_hf", "wdjt", "wdjt_nodiag", "wdjt_bf16weak", "sft_lora", "sft_hf_lora", "wdjt_lora"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Peak resident set size (MB) of this process while the ``with`` block runs, sampled every 2 ms by a thread."""

    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def build_models(root: str, hidden: int, layers: int, vocab: int) -> tuple[str, str]:
    """Strong and weak checkpoints of the same architecture (the weak one a different random init)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from wmss_trl.toy import build_char_tokenizer

    tok = build_char_tokenizer()
    paths = []
    for name, seed in (("strong", 1), ("weak", 2)):
        torch.manual_seed(seed)
        cfg = Qwen2Config(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        path = os.path.join(root, name)
        Qwen2ForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def run_one(config: str, strong: str, weak: str, steps: int, batch: int, seq: int, chunk: int) -> dict:
    """Runs in the child process: one configuration, returns its measurements."""
    base_rss = rss_mb()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from wmss_trl import WMSSSFTConfig, WMSSSFTTrainer
    from wmss_trl.toy import load_tokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base_rss = rss_mb()  # after imports
    tok = load_tokenizer(strong)
    digits = "0123456789"
    rows = []
    for i in range(batch * steps):
        text = "".join(digits[(i * 7 + j * 3) % 10] for j in range(seq))
        rows.append({"prompt": text[: seq // 4], "completion": text[seq // 4 : seq - 1]})
    data = Dataset.from_list(rows)

    common = dict(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        activation_checkpointing=False,
        logging_steps=1,
        per_device_train_batch_size=batch,
        max_steps=steps,
        seed=0,
        disable_tqdm=True,
        max_length=seq + 8,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    peft_config = lora if config.endswith("lora") else None
    if config.startswith("sft"):
        trainer = SFTTrainer(
            strong, args=SFTConfig(**common), train_dataset=data, processing_class=tok, peft_config=peft_config
        )
        if config.startswith("sft_hf"):  # same prepared data, model and collator; the model's own full-logits loss
            from transformers import Trainer, TrainingArguments

            hf_args = TrainingArguments(
                **{k: v for k, v in common.items() if k != "max_length"}, remove_unused_columns=False
            )
            trainer = Trainer(
                trainer.model, args=hf_args, train_dataset=trainer.train_dataset, data_collator=trainer.data_collator
            )
    else:
        kw = dict(mixing_lambda=0.5, mixing_chunk_size=chunk)
        if config in ("wdjt", "wdjt_nodiag", "wdjt_bf16weak"):
            kw["weak_model_name_or_path"] = weak
        if config == "wdjt_nodiag":
            kw["saturation_metrics"] = False
        if config == "wdjt_bf16weak":
            kw["weak_model_init_kwargs"] = {"dtype": "bfloat16"}
        if config == "wdjt_lora":
            kw["peft_base_as_weak"] = True
        trainer = WMSSSFTTrainer(
            strong,
            args=WMSSSFTConfig(**common, **kw),
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config,
        )
        if not trainer.use_mixing:
            raise SystemExit(f"{config}: WD-JT is not active (no weak model); the benchmark would time plain SFT.")

    step_times: list[float] = []
    cpu_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)
            cpu_times.append(time.process_time() - self.c)

    trainer.add_callback(Timer())
    with PeakRSS() as memory:
        trainer.train()
    timed = step_times[2:] if len(step_times) > 2 else step_times
    cpu = cpu_times[2:] if len(cpu_times) > 2 else cpu_times
    return {
        "config": config,
        "step_s": statistics.median(timed),
        "cpu_s": statistics.median(cpu),
        "peak_mb": memory.peak,
        "train_mb": memory.peak - base_rss,
        "loss": trainer.state.log_history[-2].get("loss"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--chunk_size", type=int, default=256, help="WD-JT mixing_chunk_size")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # inside a fresh subprocess
        strong, weak = args.paths.split(",")
        print(
            "RESULT "
            + json.dumps(run_one(args.child, strong, weak, args.steps, args.batch, args.seq, args.chunk_size))
        )
        return

    from wmss_trl.machine import describe_machine, machine_info

    print(describe_machine(), flush=True)
    machine_start = machine_info()
    root = tempfile.mkdtemp(prefix="wmss-bench-")
    strong, weak = build_models(root, args.hidden, args.layers, args.vocab)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    results = {}
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", config, "--paths", f"{strong},{weak}"]
        cmd += [
            f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "batch", "seq", "steps", "chunk_size")
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{config} failed:\n{proc.stderr[-4000:]}")
        results[config] = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        r = results[config]
        print(
            f"{config:<14} step {r['step_s']:.3f}s (CPU {r['cpu_s']:.3f}s)  peak RSS {r['peak_mb']:.0f} MB  train mem {r['train_mb']:.0f} MB  loss {r['loss']}",
            flush=True,
        )

    print(
        f"\nmodel: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; "
        f"{args.steps} steps; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    )
    print(f"{'comparison':<28}{'time':>8}{'CPU time':>10}{'train mem':>11}{'peak RSS':>10}   targets")
    pairs = [
        ("wdjt", "sft", "<=1.45x, <=1.3x"),
        ("wdjt", "sft_hf", "<=1.45x, <=1.3x"),
        ("wdjt_nodiag", "sft_hf", "<=1.45x, <=1.3x"),
        ("wdjt_bf16weak", "sft", "<=1.45x, <=1.3x"),
        ("wdjt_bf16weak", "sft_hf", "<=1.45x, <=1.3x"),
        ("wdjt_lora", "sft_lora", "<=1.45x, <=1.1x"),
        ("wdjt_lora", "sft_hf_lora", "<=1.45x, <=1.1x"),
    ]
    for wd, base, target in pairs:
        if wd in results and base in results:
            a, b = results[wd], results[base]
            print(
                f"{wd + ' / ' + base:<28}{a['step_s'] / b['step_s']:>7.2f}x{a['cpu_s'] / b['cpu_s']:>9.2f}x"
                f"{a['train_mb'] / b['train_mb']:>10.2f}x"
                f"{a['peak_mb'] / b['peak_mb']:>9.2f}x   {target}"
            )
    machine_end = machine_info()
    print(describe_machine(machine_end) + " (at the end)")
    print(
        "RESULT "
        + json.dumps({"results": results, "machine": {**machine_start, "load_avg_end": machine_end["load_avg"]}})
    )


if __name__ == "__main__":
    main()
