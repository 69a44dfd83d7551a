"""The weak vLLM backend's config and its refusals before any model loads (no vllm needed: core suite)."""

import importlib.util
import os
import sys

import pytest


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from grpo_common import grpo_args  # noqa: E402

from wmss_trl.grpo.checks import check_weak_vllm  # noqa: E402
from wmss_trl.rollouts.sampling import stream_seed  # noqa: E402
from wmss_trl.rollouts.vllm_engine import SamplingSettings, completion_seeds  # noqa: E402


HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize(
    "kw, backend",
    [
        (dict(), None),
        (dict(num_weak_generations=2), None),
        (dict(num_weak_generations=2, use_vllm=True), "colocate"),
        (dict(num_weak_generations=2, use_vllm=True, weak_use_vllm=False), None),
        (dict(num_weak_generations=2, weak_use_vllm=True), "colocate"),
        (dict(num_weak_generations=2, weak_vllm_server_base_url="http://127.0.0.1:8001"), "server"),
        (dict(use_vllm=True), None),  # no weak negatives: nothing to sample
    ],
)
def test_backend_choice(tmp_path, kw, backend):
    assert grpo_args(tmp_path, **kw).weak_vllm_backend == backend


NEG = dict(num_weak_generations=2)


@pytest.mark.parametrize(
    "kw, loaded",
    [
        (dict(NEG), True),  # transformers' generate decodes the negatives
        (dict(NEG, weak_use_vllm=True), False),  # the weak engine decodes them (and returns the behaviour log-probs)
        (dict(NEG, weak_vllm_server_base_url="http://127.0.0.1:8001"), False),
        (dict(NEG, weak_use_vllm=True, beta=0.04), True),  # the KL reference reads it
        (dict(NEG, weak_use_vllm=True, entropy_weighted_advantages=True), True),  # the weak entropy
        (dict(NEG, weak_use_vllm=True, mixing_lambda=0.5), True),  # the mixed policy log-probs
    ],
)
def test_weak_model_loaded_only_when_something_reads_it(tmp_path, kw, loaded):
    assert grpo_args(tmp_path, **kw).weak_model_loaded is loaded


def test_weak_folder_and_dtype_of_an_unloaded_weak_model(tiny):
    from wmss_trl.weak import load_weak_model, weak_dtype, weak_folder

    assert weak_folder(None, tiny["weak"]) == tiny["weak"]
    assert weak_folder(tiny["weak"], "elsewhere") == tiny["weak"]  # the trainer's argument wins, as when loading
    model = load_weak_model(tiny["weak"], {"dtype": "bfloat16"})
    assert weak_folder(model, None) == tiny["weak"] and weak_dtype(model, None) == "bfloat16"
    assert weak_dtype(None, None) == "float32" == str(load_weak_model(tiny["weak"]).dtype).removeprefix("torch.")
    assert weak_dtype(None, '{"dtype": "bfloat16"}') == "bfloat16" and weak_dtype(None, {"dtype": "auto"}) == "auto"


def test_gpu_memory_utilization_is_checked(tmp_path):
    with pytest.raises(ValueError, match="weak_vllm_gpu_memory_utilization"):
        grpo_args(tmp_path, weak_vllm_gpu_memory_utilization=1.5)


def test_refusals_before_loading(tiny, tmp_path):
    args = grpo_args(tmp_path, num_weak_generations=2, weak_use_vllm=True)
    if HAS_VLLM:
        check_weak_vllm(args, tiny["weak"])  # a local safetensors folder: accepted
    else:
        with pytest.raises(ValueError, match=r"vllm is not installed. Install it \(pip install 'wmss_trl\[vllm\]'\)"):
            check_weak_vllm(args, tiny["weak"])
        return
    with pytest.raises(ValueError, match="loads the weak checkpoint from a local folder"):
        check_weak_vllm(args, "org/not-a-folder")
    peft = grpo_args(tmp_path, num_weak_generations=2, weak_use_vllm=True, peft_base_as_weak=True)
    with pytest.raises(ValueError, match="peft_base_as_weak=True makes it the policy's adapter-disabled base"):
        check_weak_vllm(peft, None)


def test_completion_seeds_are_per_prompt_and_draw():
    seeds = completion_seeds([3, 4], 2, 3)
    assert seeds == [stream_seed(3, 0), stream_seed(3, 1), stream_seed(3, 2)] + [stream_seed(4, j) for j in range(3)]
    assert len(set(seeds)) == 6
    assert completion_seeds(7, 2, 1) == [stream_seed(stream_seed(7, 0), 0), stream_seed(stream_seed(7, 1), 0)]
    assert completion_seeds(None, 2, 2) == [None] * 4
    with pytest.raises(ValueError, match="one seed per prompt"):
        completion_seeds([1], 2, 1)


def test_sampling_settings_request():
    s = SamplingSettings(
        max_tokens=8, temperature=0.7, top_k=0, min_p=None, stop_token_ids=(6,), extra={"min_tokens": 2}
    )
    assert s.request() == {
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "stop_token_ids": [6],
        "n": 1,
        "logprobs": 0,
        "min_tokens": 2,
    }
