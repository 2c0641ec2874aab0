"""Policies: strict YAML, so a typo or a wrong type is an error naming the field."""

from __future__ import annotations

import pytest

from refit.errors import RefitError
from refit.policy import POLICY_DIR, file_hash, load_policy, resolve
from tasks.finetune import UpdatePolicy
from tasks.gate import GatePolicy

GATE_YAML = """\
min_fresh_improvement: 0.05
max_golden_regression: 0.02
max_update_cost_usd: 0.50
max_inference_cost_ratio: 1.5
"""


def write(tmp_path, text: str, name: str = "policy.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_policy_file_loads(tmp_path):
    path = write(tmp_path, GATE_YAML)
    policy, resolved = load_policy(GatePolicy, path)
    assert resolved == path
    assert policy.max_update_cost_usd == 0.5 and policy.max_inference_cost_ratio == 1.5


def test_shipped_policies_by_name():
    gate, gate_path = load_policy(GatePolicy, "gate")
    update, update_path = load_policy(UpdatePolicy, "update")
    assert gate_path == POLICY_DIR / "gate.yaml" and update_path == POLICY_DIR / "update.yaml"
    assert update.bootstrap.epochs >= 1


def test_typo_in_a_key_is_named(tmp_path):
    path = write(tmp_path, GATE_YAML.replace("max_golden_regression", "max_golden_regresion"))
    with pytest.raises(RefitError) as info:
        load_policy(GatePolicy, path)
    message = str(info.value)
    assert "max_golden_regresion" in message  # the unknown key
    assert "max_golden_regression" in message  # and the required one it did not set
    assert str(path) in message


def test_typo_in_a_nested_key_is_named(tmp_path):
    text = (POLICY_DIR / "update.yaml").read_text().replace("learning_rate: 0.003", "learning_rat: 0.003")
    with pytest.raises(RefitError, match=r"ladder\.0\.learning_rat"):
        load_policy(UpdatePolicy, write(tmp_path, text))


@pytest.mark.parametrize("line, field", [
    ("max_update_cost_usd: 'cheap'", "max_update_cost_usd"),
    ("max_update_cost_usd: '0.5'", "max_update_cost_usd"),  # strict: a quoted number is not a number
    ("max_update_cost_usd: -1", "max_update_cost_usd"),  # must be > 0
    ("max_golden_regression: [0.02]", "max_golden_regression"),
])
def test_wrong_type_or_value_is_named(tmp_path, line, field):
    key = line.split(":")[0]
    text = "\n".join(line if row.startswith(key + ":") else row for row in GATE_YAML.splitlines())
    with pytest.raises(RefitError, match=field):
        load_policy(GatePolicy, write(tmp_path, text))


def test_wrong_type_in_update_policy(tmp_path):
    text = (POLICY_DIR / "update.yaml").read_text().replace("epochs: 3", "epochs: 2.5")
    with pytest.raises(RefitError, match=r"ladder\.1\.epochs"):
        load_policy(UpdatePolicy, write(tmp_path, text))


def test_invalid_and_empty_yaml(tmp_path):
    with pytest.raises(RefitError, match="not valid YAML"):
        load_policy(GatePolicy, write(tmp_path, "a: [unclosed\n", "bad.yaml"))
    with pytest.raises(RefitError, match="min_fresh_improvement"):
        load_policy(GatePolicy, write(tmp_path, "", "empty.yaml"))


def test_unknown_name_lists_known_names():
    with pytest.raises(RefitError) as info:
        load_policy(GatePolicy, "gaet")
    message = str(info.value)
    assert "'gaet'" in message
    assert "gate" in message and "update" in message


def test_missing_policy_file(tmp_path):
    with pytest.raises(RefitError, match="does not exist"):
        resolve(tmp_path / "nope.yaml")


def test_policies_are_frozen(tmp_path):
    from pydantic import ValidationError

    policy, _ = load_policy(GatePolicy, write(tmp_path, GATE_YAML))
    with pytest.raises(ValidationError):
        policy.max_update_cost_usd = 100.0


def test_file_hash_follows_content(tmp_path):
    path = write(tmp_path, GATE_YAML)
    first = file_hash(path)
    assert len(first) == 16 and file_hash(path) == first
    path.write_text(GATE_YAML.replace("1.5", "1.6"))
    assert file_hash(path) != first
