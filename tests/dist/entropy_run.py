"""Per-sample entropies of a tiny model on the arithmetic dataset; run single-process or under ``accelerate launch``.

    python tests/dist/entropy_run.py MODEL OUT_DIR [N_ROWS] [BATCH]

Prints ``RESULT {json}`` on the main process: world size, distributed type, whether the scored model is ZeRO-3
partitioned, and the ``idx`` / ``entropy`` / ``num_tokens`` lists returned by ``score_entropies`` (dataset order).
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import arithmetic_prompt_completion  # noqa: E402
from trl import SFTConfig  # noqa: E402

from wmss_trl.entropy import EntropyScorer  # noqa: E402
from wmss_trl.toy import load_tokenizer  # noqa: E402
from wmss_trl.weak import is_zero3_partitioned  # noqa: E402
from wmss_trl.recipes.common import exit_worker, teardown  # noqa: E402


def main():
    model, out = sys.argv[1:3]
    n_rows = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    args = SFTConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", per_device_eval_batch_size=batch)
    # idx values that are not row numbers, to check the keying; rows in a scrambled idx order
    dataset = arithmetic_prompt_completion(n_rows).add_column("idx", [100 + (3 * i) % n_rows for i in range(n_rows)])
    scorer = EntropyScorer(model, dataset, load_tokenizer(model), args)
    result = scorer.score()
    scored = scorer._prepared_model()
    acc = scorer.accelerator
    if acc.is_main_process:
        state = acc.state
        print("RESULT " + json.dumps({
            "world_size": acc.num_processes,
            "distributed_type": str(state.distributed_type),
            "partitioned": is_zero3_partitioned(scored),
            "idx": result["idx"].tolist(),
            "entropy": result["entropy"].tolist(),
            "num_tokens": result["num_tokens"].tolist(),
        }), flush=True)
    teardown()


if __name__ == "__main__":
    main()
    exit_worker(0)
