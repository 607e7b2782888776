"""Per-layer coefficients: `scaling` (task arithmetic, TIES and the other methods with a
per-layer parameter) as rules [{pattern: regex | glob: pattern, value: number or one per
model}, ..., {value: default}], first match wins - against a naive per-key merge, in Python and
YAML, with strict validation naming the bad rule."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from saft_hf.cli import main
from saft_hf.merging import merge, registry, search_coefficients, task_arithmetic, ties_merging
from saft_hf.merging.registry import ParamError, layer_value

SHAPES = {"enc.layer.0.attn.q.weight": (5, 4), "enc.layer.0.mlp.fc.weight": (6, 4), "enc.layer.1.mlp.fc.weight": (6, 4),
          "enc.layer.1.ln.weight": (4,), "head.weight": (3, 4)}


def models(num=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    tvs = [{k: 0.1 * torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(num)]
    return pre, tvs


RULES = [{"pattern": r"layer\.1\..*mlp", "value": [0.9, 0.1]},   # regex, searched in the name
         {"glob": "*.mlp.*", "value": 0.5},                      # glob, whole name
         {"pattern": "^head", "value": [0.0, 1.0]},
         {"value": [0.3, 0.2]}]                                   # default
EXPECTED = {"enc.layer.0.attn.q.weight": [0.3, 0.2], "enc.layer.0.mlp.fc.weight": [0.5, 0.5],
            "enc.layer.1.mlp.fc.weight": [0.9, 0.1], "enc.layer.1.ln.weight": [0.3, 0.2], "head.weight": [0.0, 1.0]}


def test_layer_value_first_match_wins():
    rules = registry.validate_params("task_arithmetic", {"scaling": RULES}, num_tasks=2)["scaling"]
    for key, want in EXPECTED.items():
        got = layer_value(rules, key)
        assert (got if isinstance(got, list) else [got, got]) == want, key
    assert layer_value(0.4, "anything") == 0.4


def test_task_arithmetic_per_layer_per_task_matches_naive():
    pre, tvs = models()
    merged = task_arithmetic(pre, tvs, RULES)
    for k in SHAPES:
        a, b = EXPECTED[k]
        torch.testing.assert_close(merged[k], pre[k] + a * tvs[0][k] + b * tvs[1][k], atol=1e-6, rtol=1e-6, msg=k)


def test_ties_per_layer_lambda_matches_per_key_scaling():
    pre, tvs = models(3, seed=1)
    rules = [{"glob": "enc.layer.0.*", "value": 0.25}, {"value": 0.75}]
    merged = ties_merging(pre, tvs, scaling=rules, density=0.4)
    unit = ties_merging(pre, tvs, scaling=1.0, density=0.4)
    for k in SHAPES:
        lam = 0.25 if k.startswith("enc.layer.0.") else 0.75
        torch.testing.assert_close(merged[k], pre[k] + lam * (unit[k] - pre[k]), atol=1e-6, rtol=1e-6, msg=k)


def test_a_single_default_rule_is_the_plain_value():
    pre, tvs = models(seed=2)
    for method, plain in [("task_arithmetic", [0.3, 0.6]), ("ties", 0.6), ("iso_c", 1.2), ("tsv_merging", 0.8),
                          ("della", 0.5), ("breadcrumbs", 0.7)]:
        a = merge(method, pre, tvs, scaling=[{"value": plain}])
        b = merge(method, pre, tvs, scaling=plain)
        assert all(torch.equal(a[k], b[k]) for k in a), method


BAD = [
    ([{"pattern": "mlp(", "value": 0.5}, {"value": 0.3}], "scaling[0].pattern 'mlp(' is not a valid regular expression"),
    ([{"pattern": "mlp", "value": 0.5}], "must end with a default rule"),
    ([{"value": 0.3}, {"pattern": "mlp", "value": 0.5}], "scaling[0] has no `pattern` or `glob`: only the last rule"),
    ([{"filter": "mlp", "value": 0.5}, {"value": 0.3}], "scaling[0] has unknown key(s) ['filter']"),
    ([{"pattern": "mlp", "glob": "*mlp*", "value": 0.5}, {"value": 0.3}], "has both `pattern` and `glob`"),
    ([{"pattern": "mlp"}, {"value": 0.3}], "scaling[0] has no `value`"),
    ([{"pattern": "", "value": 0.5}, {"value": 0.3}], "scaling[0].pattern must be a non-empty string"),
    ([{"pattern": "mlp", "value": "0.5"}, {"value": 0.3}], "scaling[0].value must be a number, got the string"),
    ([{"pattern": "mlp", "value": [0.1, 0.2, 0.3]}, {"value": 0.3}], "scaling[0].value has 3 values but there are 2"),
    ([{"pattern": "mlp", "value": [{"value": 1}]}, {"value": 0.3}], "not nested rules"),
    ([{"glob": "*", "value": 0.5}, 0.3], "scaling[1] must be a mapping"),
]


@pytest.mark.parametrize("rules,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_rules_are_refused_naming_the_rule(rules, message):
    with pytest.raises(ParamError) as err:
        registry.validate_params("task_arithmetic", {"scaling": rules}, num_tasks=2)
    assert message in str(err.value)


def test_rules_are_refused_where_not_declared():
    with pytest.raises(ParamError, match=r"density(\[0\])? must be a number"):
        registry.validate_params("ties", {"density": [{"value": 0.2}]})
    with pytest.raises(ParamError, match="ties scaling\\[0\\].value must be a number"):
        registry.validate_params("ties", {"scaling": [{"value": [0.1, 0.2]}]}, num_tasks=2)


def test_per_layer_rules_in_yaml_and_bad_regex_error(tmp_path, capsys):
    pre, tvs = models()
    save_file(pre, str(tmp_path / "pre.safetensors"))
    for i, tv in enumerate(tvs):
        save_file({k: pre[k] + tv[k] for k in SHAPES}, str(tmp_path / f"ft{i}.safetensors"))
    text = f"""
pretrained: {tmp_path / 'pre.safetensors'}
models: [{tmp_path / 'ft0.safetensors'}, {tmp_path / 'ft1.safetensors'}]
method: task_arithmetic
params:
  scaling:
    - {{pattern: 'layer\\.1\\..*mlp', value: [0.9, 0.1]}}
    - {{glob: '*.mlp.*', value: 0.5}}
    - {{pattern: '^head', value: [0.0, 1.0]}}
    - {{value: [0.3, 0.2]}}
"""
    (tmp_path / "ok.yaml").write_text(text)
    assert yaml.safe_load(text)["params"]["scaling"] == RULES
    assert main(["merge", str(tmp_path / "ok.yaml"), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    (tmp_path / "bad.yaml").write_text(text.replace("'^head'", "'^head['"))
    assert main(["merge", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "out2"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "scaling[2].pattern '^head[' is not a valid regular expression" in err
    assert not (tmp_path / "out2").exists()


def test_search_with_fixed_per_layer_rules_for_another_parameter():
    """A method's searched parameter and per-layer rules coexist: TIES searches density with a
    fixed per-layer lambda."""
    pre, tvs = models(seed=3)
    rules = [{"glob": "head.*", "value": 0.0}, {"value": 1.0}]
    res = search_coefficients(pre, tvs, lambda sd: {"t": float(-(sd["head.weight"] - pre["head.weight"]).abs().sum())},
                              method="ties", params={"scaling": rules}, grid={"density": [0.2, 0.5]}, progress=False)
    assert len(res.points) == 2 and all(p.absolute["t"] == 0.0 for p in res.points)
    assert res.best_merge_config()["params"]["scaling"] == rules
