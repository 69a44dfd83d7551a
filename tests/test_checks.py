"""The shared numeric validators: conversion, finiteness, ranges, order."""

import math

import pytest

from wmss_trl.checks import check_float, check_int, check_order, check_shares


def test_check_float_converts_strings_and_returns_the_float():
    assert check_float("mixing_lambda", "0.5", low=0.0, high=1.0, low_open=True) == 0.5
    assert isinstance(check_float("x", 1, low=0.0), float)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -math.inf, "nan", "abc", None, True, [1.0]])
def test_check_float_refuses_non_finite_and_non_numbers(bad):
    with pytest.raises(ValueError, match="weak_negative_threshold"):
        check_float("weak_negative_threshold", bad)


@pytest.mark.parametrize(
    "value, kw",
    [
        (0.0, dict(low=0.0, low_open=True)),
        (-1.0, dict(low=0.0)),
        (1.5, dict(high=1.0)),
        (1.0, dict(high=1.0, high_open=True)),
    ],
)
def test_check_float_ranges(value, kw):
    with pytest.raises(ValueError, match="must be in"):
        check_float("x", value, **kw)


def test_check_float_optional_and_bounds_inclusive():
    assert check_float("x", None, optional=True) is None
    assert check_float("x", 0.0, low=0.0) == 0.0 and check_float("x", 1.0, high=1.0) == 1.0


def test_check_int():
    assert check_int("k", "3", low=0) == 3 and check_int("k", 2.0) == 2
    for bad in (2.5, "x", None, True):
        with pytest.raises(ValueError, match="integer"):
            check_int("k", bad)
    with pytest.raises(ValueError, match="must be in"):
        check_int("k", -1, low=0)


def test_check_order_and_shares():
    check_order("lo", 1.0, "hi", 2.0)
    check_order("lo", None, "hi", 2.0)
    with pytest.raises(ValueError, match="lo .* must be <= hi"):
        check_order("lo", 3.0, "hi", 2.0)
    assert check_shares(("a", "b", "c"), ("0.1", 0.8, 0)) == (0.1, 0.8, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        check_shares(("a", "b", "c"), (0, 0, 0))
    with pytest.raises(ValueError, match="b must be in"):
        check_shares(("a", "b", "c"), (0.1, -0.8, 0.1))


def test_require_safetensors_refuses_pickle_only_folders(tmp_path):
    from wmss_trl.weak import require_safetensors

    (tmp_path / "config.json").write_text("{}")
    require_safetensors(str(tmp_path))  # no weights at all: from_pretrained reports it
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(
        ValueError, match=r"weak model checkpoint .* pickle weights only \(pytorch_model.bin\).*save_pretrained"
    ):
        require_safetensors(str(tmp_path), "weak model")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    require_safetensors(str(tmp_path))
    require_safetensors("org/name")  # not a local folder


def test_trl_configs_are_accepted_and_converted(tmp_path):
    from transformers import TrainingArguments
    from trl import DPOConfig, GRPOConfig, SFTConfig

    from wmss_trl import WMSSDPOConfig, WMSSGRPOConfig, WMSSSFTConfig
    from wmss_trl.checks import as_wmss_config

    for trl_cls, ours, kw in (
        (SFTConfig, WMSSSFTConfig, dict(eos_token="<|end|>", max_length=77)),
        (DPOConfig, WMSSDPOConfig, dict(beta=0.3, loss_type=["ipo"])),
        (GRPOConfig, WMSSGRPOConfig, dict(num_generations=4, per_device_train_batch_size=4, generation_batch_size=8)),
    ):
        given = trl_cls(output_dir=str(tmp_path), use_cpu=True, bf16=False, learning_rate=3e-5, **kw)
        got = as_wmss_config(given, ours, "m", "X")
        assert type(got) is ours and got.learning_rate == 3e-5 and got.output_dir == str(tmp_path)
        assert all(getattr(got, k) == getattr(given, k) for k in kw)  # eos_token too (to_dict() masks *_token)
        assert as_wmss_config(got, ours, "m", "X") is got
    plain = as_wmss_config(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, seed=5), WMSSDPOConfig, "m", "X")
    assert isinstance(plain, WMSSDPOConfig) and plain.seed == 5
    with pytest.raises(TypeError, match="args must be a WMSSDPOConfig"):
        as_wmss_config({"beta": 0.1}, WMSSDPOConfig, "m", "DPO")
