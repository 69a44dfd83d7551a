"""The private TRL / transformers names wmss_trl relies on (wmss_trl.trl_compat): each one still holds in the installed
versions, the checker names a broken one clearly, and the list is complete (no private TRL name is used elsewhere)."""

import ast
import inspect
import pathlib
import re
import textwrap

import pytest
from transformers import GenerationMixin, Trainer
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from wmss_trl import trl_compat, trl_overrides
from wmss_trl.trl_compat import CONTACT_POINTS, Contact, check_contact, fused_lm_head_output


PACKAGE = pathlib.Path(trl_compat.__file__).parent
# our own names that happen to match a private name of transformers.Trainer
OWN_NAMES = {"_evaluate"}  # recipes/demo.py: a method of its own TrainerCallback


@pytest.mark.parametrize("contact", CONTACT_POINTS, ids=lambda c: f"{c.owner}.{c.name}:{c.kind}")
def test_contact_point_holds(contact):
    problem = check_contact(contact)
    assert problem is None, f"TRL / transformers changed a name wmss_trl relies on: {problem}"


@pytest.mark.parametrize(
    "contact, says",
    [
        (Contact("trl:GRPOTrainer", "_no_such_method", "method", ("grpo",), ("model",)), "no longer exists"),
        (Contact("trl:GRPOTrainer", "_compute_loss", "method", ("grpo",), ("model", "batch")), "signature changed"),
        (Contact("trl:GRPOTrainer", "_no_such_attribute", "attribute", ("grpo",)), "assigns self._no_such_attribute"),
        (Contact("trl:DPOTrainer", "_compute_loss", "source", ("dpo",), ("if self.gone:",)), "no longer contains"),
        (Contact("trl.trainer.utils", "_Gone", "import", ("sft",)), "no longer exists"),
        (
            Contact("trl:GRPOTrainer", "_compute_loss", "sequence", ("grpo",), ("advantages =", "per_token_logps, ")),
            "in this order",
        ),
        (Contact("trl.no_such_module", "x", "import", ("sft",)), "cannot be imported"),
    ],
)
def test_checker_names_what_broke(contact, says):
    problem = check_contact(contact)
    assert problem is not None and says in problem and contact.name in problem and contact.owner in problem


def _private_names_used() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                used.setdefault(node.attr, set()).add(path.name)
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in ("trl", "transformers")
            ):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        used.setdefault(alias.name, set()).add(path.name)
    return used


def test_every_private_trl_name_is_listed():
    """Any private name wmss_trl reads or overrides that TRL's / transformers' trainer classes define (as a method,
    a class attribute or an attribute their code assigns) must be in CONTACT_POINTS."""
    classes = [GRPOTrainer, DPOTrainer, SFTTrainer, Trainer, GenerationMixin]
    sources = "\n".join(inspect.getsource(cls) for base in classes for cls in inspect.getmro(base)[:-1])
    listed = {c.name for c in CONTACT_POINTS}
    unlisted = {
        name: sorted(files)
        for name, files in _private_names_used().items()
        if name not in listed | OWN_NAMES
        and (any(hasattr(cls, name) for cls in classes) or re.search(rf"self\.{name}\s*(:[^=\n]*)?=[^=]", sources))
    }
    assert not unlisted, f"private TRL/transformers names used but not listed in wmss_trl.trl_compat: {unlisted}"


def test_dpo_reads_only_fused_fields_we_fill():
    """The stand-in WD-JT policy output of WMSS-DPO fills every field DPOTrainer._compute_loss reads."""
    from wmss_trl.dpo.policy import _WMSSPolicy

    read = set(re.findall(r"\boutputs\.(\w+)", inspect.getsource(DPOTrainer._compute_loss)))
    tree = ast.parse(textwrap.dedent(inspect.getsource(_WMSSPolicy._mixed_forward)))
    calls = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "fused_lm_head_output"
    ]
    filled = {kw.arg for call in calls for kw in call.keywords}
    assert len(calls) == 1 and read and read <= filled, read - filled


def test_fused_output_refuses_unknown_field():
    out = fused_lm_head_output(log_probs=1)
    assert out.log_probs == 1 and out.entropy is None
    with pytest.raises(TypeError, match="no field.*'log_probz'"):
        fused_lm_head_output(log_probz=1)


def _overrides(ours, base) -> dict[str, list[str]]:
    """The names our classes / mixins in ``ours``' MRO define (besides ``__init__`` and other dunders) that the TRL
    trainer ``base`` also has, each with the sorted names of our classes that define it."""
    found: dict[str, set[str]] = {}
    for cls in ours.__mro__:
        if cls.__module__.split(".")[0] != "wmss_trl":
            continue
        for name in vars(cls):
            if not name.startswith("__") and hasattr(base, name):
                found.setdefault(name, set()).add(cls.__name__)
    return {name: sorted(classes) for name, classes in found.items()}


def _trainer_pairs():
    from wmss_trl import WMSSDPOTrainer, WMSSGRPOTrainer, WMSSSFTTrainer

    return [(WMSSSFTTrainer, SFTTrainer), (WMSSDPOTrainer, DPOTrainer), (WMSSGRPOTrainer, GRPOTrainer)]


@pytest.mark.parametrize("ours, base", _trainer_pairs(), ids=lambda c: c.__name__)
def test_overrides_are_the_reviewed_list(ours, base):
    """Every TRL / transformers method a trainer overrides (its MRO: our classes and mixins) is in
    trl_overrides.OVERRIDES with its reason, and every listed one still is an override: a new one is a reviewed change."""
    expected: dict[str, set[str]] = {}
    for override in trl_overrides.OVERRIDES[ours.__name__]:
        expected.setdefault(override.name, set()).add(override.defined_in)
    assert all(o.reason for o in trl_overrides.OVERRIDES[ours.__name__])
    found = _overrides(ours, base)
    assert found == {name: sorted(classes) for name, classes in expected.items()}, (
        f"{ours.__name__} overrides {sorted(found.keys() - expected.keys())} not listed in trl_overrides.OVERRIDES; "
        f"listed but no longer overridden: {sorted(expected.keys() - found.keys())}"
    )


MAX_OVERRIDES = 4


@pytest.mark.parametrize("ours, base", _trainer_pairs(), ids=lambda c: c.__name__)
def test_at_most_four_overrides_per_trainer(ours, base):
    """The count rule (issue 12, docs/architecture.md): each trainer overrides at most 4 TRL / transformers methods
    besides ``__init__``, counting the methods its mixins override (each name once). TRL's card attributes
    (``_name``, ``_paper``, ``_tag_names``: class attributes TRL's own trainers set) are not methods and not counted;
    every callable is."""
    counted = sorted(set(_overrides(ours, base)) - set(trl_overrides.CARD_ATTRIBUTES))
    assert all(not callable(getattr(base, name)) for name in trl_overrides.CARD_ATTRIBUTES)
    assert len(counted) <= MAX_OVERRIDES, f"{ours.__name__} overrides {len(counted)} > {MAX_OVERRIDES}: {counted}"


@pytest.mark.parametrize("ours, base", _trainer_pairs(), ids=lambda c: c.__name__)
def test_overrides_are_short(ours, base):
    """Each override is short (at most 40 lines, docstring included): the work lives in helpers next to it."""
    long = {}
    for name, classes in _overrides(ours, base).items():
        for cls_name in classes:
            cls = next(c for c in ours.__mro__ if c.__name__ == cls_name)
            member = vars(cls)[name]
            member = member.fget if isinstance(member, property) else member
            lines = len(inspect.getsource(member).splitlines())
            if lines > 40:
                long[f"{cls_name}.{name}"] = lines
    assert not long, long


def test_grpo_batch_rewards_are_what_calculate_rewards_returned(tiny, tmp_path, monkeypatch):
    """trl_compat.grpo_batch_rewards reads back, from TRL GRPO's completions log, exactly the gathered rewards its
    `_calculate_rewards` returned for the batch just scored (NaN for an unscored reward included)."""
    import torch

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent / "dist"))
    from grpo_common import grpo_args, prompt_dataset
    from trl import GRPOConfig

    from wmss_trl.toy import load_tokenizer

    def partial_reward(completions, **_):  # None (unscored) for every other completion
        return [None if i % 2 else float(len(str(c))) for i, c in enumerate(completions)]

    def digits(completions, **_):
        return [float(sum(ch.isdigit() for ch in str(c))) for c in completions]

    args = grpo_args(tmp_path, config_class=GRPOConfig, per_device_train_batch_size=8, num_generations=4)
    trainer = GRPOTrainer(
        tiny["strong"],
        [partial_reward, digits],
        args=args,
        train_dataset=prompt_dataset(8),
        processing_class=load_tokenizer(tiny["strong"]),
    )
    returned = []
    calculate = trainer._calculate_rewards

    def spy(*a, **kw):
        returned.append(calculate(*a, **kw))
        return returned[-1]

    trainer._calculate_rewards = spy
    trainer.model.train()
    for seed in (0, 1):  # the second batch: read after a first one is already in the log
        torch.manual_seed(seed)
        rows = [dict(trainer.train_dataset[i]) for i in range(2) for _ in range(trainer.num_generations)]
        trainer._generate_and_score_completions(rows)
        got = trl_compat.grpo_batch_rewards(trainer, len(rows))
        assert got.shape == returned[-1].shape and got.dtype == returned[-1].dtype and got.is_contiguous()
        assert torch.equal(torch.isnan(got), torch.isnan(returned[-1])) and torch.isnan(got).any()
        assert torch.equal(got.nan_to_num(-1.0), returned[-1].nan_to_num(-1.0))
