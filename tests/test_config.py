import json

import pytest

from rematch_fast import ConfigError, ReMatchConfig


def test_round_trip_keeps_unknown_keys(tmp_path):
    c = ReMatchConfig(hidden_size=32, num_learnable_tokens=4, max_pixels=50000)
    d = c.to_dict()
    d["future_field"] = {"x": 1}
    (tmp_path / "c.json").write_text(json.dumps(d))
    c2 = ReMatchConfig.load(tmp_path / "c.json")
    assert c2.num_learnable_tokens == 4 and c2.max_pixels == 50000 and c2.projector.hidden_size == 32
    c2.save(tmp_path / "d.json")
    assert json.loads((tmp_path / "d.json").read_text())["future_field"] == {"x": 1}


@pytest.mark.parametrize("bad, match", [
    (dict(num_learnable_tokens=0), "num_learnable_tokens"),
    (dict(fusion="max"), "fusion"),
    (dict(min_pixels=10_000, max_pixels=5_000), "min_pixels"),
    (dict(match_template="no fields"), "{query}"),
    (dict(embed_template="{instruction}{item}{item}"), "exactly once"),
    (dict(answer_yes="Yes", answer_no="Yes"), "different"),
    (dict(projector={"hidden_size": 8, "activation": "tanhh"}), "activation"),
    (dict(format_version=99), "upgrade"),
])
def test_invalid_config_is_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        ReMatchConfig(hidden_size=16, **bad)


def test_query_first_is_derived():
    assert ReMatchConfig(hidden_size=8).query_first
    doc_first = ReMatchConfig(hidden_size=8, match_template="D:\n{document}\nQ:\n{query}\nOK?")
    assert not doc_first.query_first


def test_missing_file_and_bad_json(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ReMatchConfig.load(tmp_path / "c.json")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match="hidden_size"):
        ReMatchConfig.load(tmp_path / "c.json")
