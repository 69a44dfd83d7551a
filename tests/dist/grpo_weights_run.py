"""Entropy-weighted advantages: 2 processes give the weights of 1 process on the same batch.

    accelerate launch --config_file wmss_trl/accelerate_configs/ddp.yaml tests/dist/grpo_weights_run.py

A fixed global batch of token entropies is split over the processes (unequal numbers of completion tokens per
process); each computes its rows' weights with the statistics summed across processes (``accelerator.reduce``, as
the trainer does). The main process gathers them and compares with the single-process weights of the whole batch.
Prints ``RESULT {json}``.
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from wmss_trl.advantages import entropy_advantage_weights  # noqa: E402
from wmss_trl.recipes.common import exit_worker, teardown  # noqa: E402


def main():
    acc = Accelerator(cpu=True)  # with the MULTI_GPU launch config; without it: 2 independent world-size-1 jobs (trap T2)
    world, rank = acc.num_processes, acc.process_index
    g = torch.Generator().manual_seed(0)
    rows, width = 8, 6
    hw = torch.rand(rows, width, generator=g) * 4
    hp = hw + torch.randn(rows, width, generator=g)
    mask = torch.rand(rows, width, generator=g) > 0.3
    mask[: rows // 2, :2] = False  # unequal token counts across processes
    results = {}
    for name, kw in {"default": {}, "clipped": {"min_weight": 0.2, "max_weight": 2.0}, "base_only": {"coefs": (1.0, 0.0, 0.0)}}.items():
        local = slice(rank * rows // world, (rank + 1) * rows // world)
        w_local = entropy_advantage_weights(hw[local], hp[local], mask[local],
                                            reduce_sum=lambda t: acc.reduce(t, reduction="sum"), **kw)
        w_all = acc.gather(w_local)
        single = entropy_advantage_weights(hw, hp, mask, **kw)
        results[name] = (w_all - single).abs().max().item()
        results[name + "_local_only_diff"] = (
            entropy_advantage_weights(hw[local], hp[local], mask[local], **kw) - single[local]
        ).abs().max().item()
    if acc.is_main_process:
        print("RESULT " + json.dumps({"world_size": world, "distributed_type": str(acc.state.distributed_type), **results}), flush=True)
    teardown()


if __name__ == "__main__":
    main()
    exit_worker(0)
