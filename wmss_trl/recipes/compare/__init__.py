"""``wmss compare``: WMSS-GRPO against vanilla GRPO on your own ``wmss grpo`` config, over seeds, with pass@k.

    wmss compare --config run.yaml [--arms vanilla,wmss] [--seeds 0,1,2] [--eval_dataset ...] [--k 1,4,16]
                 [--output_dir runs/compare] [--equal_time] [--eval_steps N] [--accelerate_config zero3]

The YAML and flags are those of ``wmss grpo`` (TRL's parser), plus the ones of :class:`CompareArguments` and an
optional ``arms:`` mapping of extra arms, each a set of config overrides::

    arms:
      wmss_no_entropy: {entropy_weighted_advantages: false}
      wmss_kl_only: {num_weak_generations: 0, entropy_weighted_advantages: false}

Arms: ``vanilla`` is the config with every WMSS option at its default and no weak model: our ``WMSSGRPOTrainer``
then *is* TRL's ``GRPOTrainer`` (the drop-in promise), plus our fix of TRL's ``RepeatSampler`` epoch order on
resume, so a resumed vanilla run is exact. ``wmss`` is the config as given (it must name a weak model). With
``--equal_time``, ``vanilla_equal_time`` is vanilla given, per seed, the measured training time of the ``wmss`` arm
(or the first non-vanilla arm) in extra steps.

Each (arm, seed) is a separate ``wmss grpo`` process (under ``accelerate launch`` with ``--accelerate_config``)
with ``seed = data_seed = <seed>``: every arm starts from the same model and sees the same prompts in the same order
for the same number of steps. Its log goes to ``<output_dir>/runs/<arm>/seed<seed>/train.log``. This process then
evaluates, on the held-out prompts (``--eval_dataset``, default: the config's ``dataset_test_split``), the base model
once per seed and each arm's final model (and its ``checkpoint-N`` every ``--eval_steps`` N, saved for that), all
with the base config's sampling settings and reward functions and the seed's sampling seed
(:mod:`wmss_trl.evaluation`: greedy pass@1, pass@k, mean reward).

Output in ``output_dir``: ``compare.md`` (the table: per-arm means with 95% t CIs over seeds, paired same-seed
differences vs vanilla with CIs, step time and peak memory ratios vs vanilla measured in the same runs),
``compare.json`` (everything, with provenance), ``metrics_vs_step.png`` and ``pass_at_k.png``. Resumable: a finished
(arm, seed) is skipped, an interrupted one resumes from its last complete checkpoint; a re-run with another base
config (or eval settings, or library versions) is refused. A failing arm is reported by name (its log's tail), the
other arms' results are kept and written, and the command exits non-zero. Bad input (an unknown arm or override
field, k > n, no eval set, ...) is refused before any model loads.
"""

from __future__ import annotations

import os
import sys

from .args import (
    EQUAL_TIME,
    RESULTS,
    RUN_FIELDS,
    VANILLA,
    WMSS,
    CompareArguments,
    check_arms,
    valid_fields,
    wmss_field_defaults,
)
from .plan import Plan, parse
from .plots import plots
from .records import check_record, digest, read_json, versions, write_json
from .report import markdown, summarize_runs
from .runs import Evaluator, base_file, evaluate_run, run_arm, run_config, run_dir, train


__all__ = [
    "EQUAL_TIME",
    "RESULTS",
    "RUN_FIELDS",
    "VANILLA",
    "WMSS",
    "CompareArguments",
    "Evaluator",
    "Plan",
    "check_arms",
    "check_record",
    "digest",
    "evaluate_run",
    "main",
    "markdown",
    "parse",
    "plots",
    "run_config",
    "run_dir",
    "summarize_runs",
    "train",
    "valid_fields",
    "versions",
    "wmss_field_defaults",
]


def main(argv: list[str] | None = None) -> int:
    """Parse and check (:mod:`.plan`), run every (seed, arm) (:mod:`.runs`), then the statistics, the table and the
    plots (:mod:`.report`, :mod:`.plots`). Exits non-zero when a run failed (the others are kept)."""
    from tqdm.auto import tqdm

    argv = sys.argv[1:] if argv is None else argv
    plan = parse(argv)
    check_record(os.path.join(plan.output_dir, "compare_config.json"), plan.record, "a comparison")
    config_hash = digest(plan.record)
    print(
        f"wmss compare: arms {', '.join(plan.arms)} x seeds {', '.join(map(str, plan.seeds))}, eval on "
        f"{plan.eval_info['num_prompts']} prompts x n={plan.num_samples}, k={plan.ks}, in {plan.output_dir} "
        f"(config {config_hash})",
        flush=True,
    )
    base, runs, failures = {}, {}, []
    evaluator = Evaluator(plan)
    bar = tqdm([(seed, arm) for seed in plan.seeds for arm in plan.arms], desc="wmss compare", unit="run")
    for seed, arm in bar:
        bar.set_postfix_str(f"{arm} seed {seed}")
        try:
            result = run_arm(plan, arm, seed, config_hash, runs, base, evaluator)
        except RuntimeError as e:
            failures.append(str(e))
            tqdm.write(f"FAILED: {e}")
            continue
        runs.setdefault(arm, {})[seed] = result
    bar.close()
    for seed in plan.seeds:  # base evaluations of seeds whose runs were all finished earlier
        if seed not in base and os.path.isfile(base_file(plan, seed)):
            base[seed] = read_json(base_file(plan, seed))["result"]
    return write_results(plan, config_hash, argv, base, runs, failures)


def write_results(plan: Plan, config_hash: str, argv: list[str], base: dict, runs: dict, failures: list[str]) -> int:
    """``compare.json``, ``compare.md`` (also printed) and the plots; the exit code (1 when a run failed)."""
    out = plan.output_dir
    summary = summarize_runs(plan, base, runs) if runs else {"metrics": [], "base": {}, "arms": {}}
    report = {
        "provenance": {"config_hash": config_hash, **plan.record, "argv": argv},
        "arms": {arm: plan.overrides[arm] for arm in plan.arms},
        "seeds": plan.seeds,
        "k": plan.ks,
        "summary": summary,
        "base": base,
        "runs": runs,
        "failures": failures,
    }
    write_json(os.path.join(out, "compare.json"), report)
    if runs:
        with open(os.path.join(out, "compare.md"), "w") as f:
            f.write(markdown(plan, summary, failures))
        print("\n" + markdown(plan, summary, failures))
        if plan.cmp.plot:
            for path in plots(plan, summary, out):
                print(f"plot: {path}")
    print(f"results: {os.path.join(out, 'compare.md')}, {os.path.join(out, 'compare.json')}")
    if failures:
        names = sorted({f.split("'")[1] for f in failures})
        print(
            f"wmss compare: {len(failures)} run(s) failed: arm(s) {', '.join(names)} (see above); the finished "
            "runs are kept, and a re-run retries only the failed ones.",
            file=sys.stderr,
        )
        return 1
    return 0
