"""Mine negatives with the tiny models; run single-process or under ``accelerate launch`` (2 processes).

    python tests/dist/mine_run.py WEAK STRONG OUT_DIR

Prints ``RESULT {json}`` on the main process: world size, distributed type, the summary and the mined rows. Every
process checks that it got the same dataset as the main process (gathered in order).
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

from accelerate import PartialState  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from mine_common import VERIFIER, mining_prompts  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from wmss_trl.negatives import mine_negatives  # noqa: E402
from wmss_trl.toy import load_tokenizer  # noqa: E402
from wmss_trl.recipes.common import exit_worker, teardown  # noqa: E402


def main():
    weak_path, strong_path, out = sys.argv[1:4]
    state = PartialState(cpu=True)
    tok = load_tokenizer(weak_path)
    weak = AutoModelForCausalLM.from_pretrained(weak_path).eval()
    strong = AutoModelForCausalLM.from_pretrained(strong_path).eval()
    dataset, summary = mine_negatives(
        mining_prompts(), weak, strong, tok, [VERIFIER], output_dir=out, **json.loads(sys.argv[4])
    )
    rows = dataset.to_list()
    everyone = gather_object([json.dumps(rows, sort_keys=True)])
    assert all(r == everyone[0] for r in everyone), "processes disagree on the mined dataset"
    if state.is_main_process:
        print("RESULT " + json.dumps({"world_size": state.num_processes, "distributed_type": str(state.distributed_type),
                                      "summary": summary, "rows": rows}), flush=True)
    teardown()


if __name__ == "__main__":
    main()
    exit_worker(0)
