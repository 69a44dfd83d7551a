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

from wmss_trl import trl_compat
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
