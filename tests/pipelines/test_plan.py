"""Plan schema: valid examples load; every defect names its key and the fix."""

from pathlib import Path

import pytest
import yaml

from fedsilo.errors import ConfigError
from pipelines.plan import load_plan, parse_plan, parse_plan_text

PLANS = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "plans").glob("*.yaml"))


def base() -> dict:
    return yaml.safe_load(next(p for p in PLANS if p.stem == "seg3d-unet-dp").read_text())


@pytest.mark.parametrize("path", PLANS, ids=[p.stem for p in PLANS])
def test_example_plans_are_valid(path):
    plan = load_plan(path)
    assert plan.name and len(plan.hash()) == 64


def test_example_plans_cover_seg3d_seg2d_and_classification():
    tasks = {load_plan(p).task for p in PLANS}
    assert "seg3d" in tasks and "seg2d" in tasks and tasks & {"cls2d", "cls3d"}


def test_hash_ignores_key_order_comments_and_whitespace():
    raw = base()
    text = yaml.safe_dump(raw, sort_keys=True)
    reordered = "# a comment\n" + yaml.safe_dump(dict(reversed(list(raw.items()))), sort_keys=False, indent=4)
    assert parse_plan_text(text).hash() == parse_plan_text(reordered).hash()


def test_hash_changes_with_any_value():
    raw = base()
    h = parse_plan(raw).hash()
    raw["training"]["local_epochs"] += 1
    assert parse_plan(raw).hash() != h


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda r: r.update(colour="blue"), "colour"),
        (lambda r: r["model"].update(network="ResNet50"), "model.network"),
        (lambda r: r["privacy"].update(target_epsilon=0), "privacy.target_epsilon"),
        (lambda r: r["privacy"].update(target_epsilon=-1.0), "privacy.target_epsilon"),
        (lambda r: r["privacy"].update(target_delta=0.5), "privacy.target_delta"),
        (lambda r: r["training"].update(batch_size="big"), "training.batch_size"),
        (lambda r: r["training"].update(epochs=3), "training.epochs"),
        (lambda r: r["federation"].update(rounds=0), "federation.rounds"),
        (lambda r: r["federation"]["aggregation"].update(rule="mystery"), "federation.aggregation.rule"),
        (lambda r: r["federation"].update(server_optimizer={"name": "rmsprop"}), "federation.server_optimizer.name"),
        (lambda r: r["federation"].update(server_optimizer={"name": "adam", "beta": 0.9}), "federation.server_optimizer.beta"),
        (lambda r: r["federation"].update(update_norm_bound=-1), "federation.update_norm_bound"),
        (lambda r: r["federation"].update(update_norm_bound="big"), "federation.update_norm_bound"),
        (lambda r: r["federation"].update(update_norm_action="shrink"), "federation.update_norm_action"),
        (lambda r: r["model"]["args"].update(channelz=[1]), "model.args.channelz"),
        (lambda r: r["model"]["args"].update(act="$torch.nn.ReLU"), "model.args.act"),
        (lambda r: r["data"].update(transforms=[{"name": "Exec"}]), "data.transforms[0].name"),
        (lambda r: r.update(task="detection"), "task"),
    ],
)
def test_defects_name_the_key_and_a_fix(mutate, key):
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        parse_plan(raw)
    assert f"'{key}'" in err.value.one_line()
    assert "fix:" in err.value.one_line()


def test_classification_network_refused_for_segmentation():
    raw = base()
    raw["model"] = {"network": "DenseNet121"}
    with pytest.raises(ConfigError, match="does not do seg3d"):
        parse_plan(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no plan file"):
        load_plan(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n  task: [seg3d\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_plan(bad)


def test_robust_rule_server_optimizer_and_norm_bound_are_read():
    raw = yaml.safe_load(PLANS[0].read_text())
    raw["federation"].update(aggregation={"rule": "trimmed_mean", "args": {"beta": 0.2}}, server_optimizer={"name": "yogi", "args": {"tau": 0.01}},
                             update_norm_bound=5, update_norm_action="clip")
    f = parse_plan(raw).federation
    assert (f.aggregation.rule, f.aggregation.args) == ("trimmed_mean", {"beta": 0.2})
    assert (f.server_optimizer.name, f.server_optimizer.args) == ("yogi", {"tau": 0.01})
    assert (f.update_norm_bound, f.update_norm_action) == (5, "clip")
    assert parse_plan(raw).hash() != parse_plan(yaml.safe_load(PLANS[0].read_text())).hash()


def test_the_schema_reference_in_docs_is_generated_from_the_schema():
    from pipelines.plan import schema_reference

    doc = Path(__file__).resolve().parents[2] / "docs" / "plan-schema.md"
    assert doc.read_text(encoding="utf-8") == schema_reference(), "regenerate it: fedsilo plan schema --out docs/plan-schema.md"
    for key in ("federation.aggregation.rule", "privacy.target_epsilon", "data.transforms[].name", "federation.update_norm_action"):
        assert f"| `{key}` |" in doc.read_text(encoding="utf-8")


def _secure(**federation) -> dict:
    raw = base()
    raw["federation"].update({"secure_aggregation": "secagg+", "update_norm_bound": 5.0, "min_silos": 3, **federation})
    return raw


def test_secure_aggregation_and_compression_are_read_and_hashed_only_when_set():
    default_hash = parse_plan(base()).hash()
    plan = parse_plan(_secure())
    assert plan.federation.secure_aggregation == "secagg+" and plan.hash() != default_hash
    raw = base()
    raw["federation"].update({"compression": "topk", "topk_fraction": 0.05})
    plan = parse_plan(raw)
    assert (plan.federation.compression, plan.federation.topk_fraction) == ("topk", 0.05)
    raw = base()  # the defaults, written out, keep the hash of a plan written before these keys existed
    raw["federation"].update({"compression": "float32", "secure_aggregation": "none"})
    assert parse_plan(raw).hash() == default_hash


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multikrum", "bulyan", "centered_clipping", "geometric_median",
                                  "norm_bounded_mean"])
def test_secure_aggregation_refuses_rules_that_need_individual_updates(rule):
    with pytest.raises(ConfigError) as err:
        parse_plan(_secure(aggregation={"rule": rule}))
    text = err.value.one_line()
    assert "federation.secure_aggregation" in text and f"rule '{rule}' needs them" in text and "use aggregation rule fedavg" in text


@pytest.mark.parametrize("change, words", [
    ({"update_norm_bound": None}, "needs federation.update_norm_bound"),
    ({"min_silos": 2}, "read the other's"),
    ({"compression": "int8"}, "compression would save nothing"),
])
def test_secure_aggregation_refusals_say_why_and_what_instead(change, words):
    raw = _secure(**change)
    if change.get("update_norm_bound", 0) is None:
        del raw["federation"]["update_norm_bound"]
    with pytest.raises(ConfigError) as err:
        parse_plan(raw)
    assert words in err.value.one_line() and "federation.secure_aggregation" in err.value.one_line()


def test_topk_fraction_without_topk_and_unknown_compression_are_refused():
    raw = base()
    raw["federation"]["topk_fraction"] = 0.1
    with pytest.raises(ConfigError, match="topk_fraction.*only with compression: topk"):
        parse_plan(raw)
    raw = base()
    raw["federation"]["compression"] = "zip"
    with pytest.raises(ConfigError, match="federation.compression"):
        parse_plan(raw)
