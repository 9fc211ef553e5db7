"""FollowEval-format harness: the bundled suite's reference answers pass and wrong answers fail;
file validation errors; scoring per language x dimension."""

import json

import pytest

from coralline.eval.followeval import DIMENSIONS, Rule, bundled_suite, load, score

SUITE = bundled_suite()


def test_suite_size_and_languages():
    assert len(SUITE) >= 60
    assert sum(i.lang == "zh" for i in SUITE) >= 25
    assert sum(i.lang == "en" for i in SUITE) >= 25
    assert all(len(set(i.dimensions)) >= 2 for i in SUITE)
    covered = {d for i in SUITE for d in i.dimensions}
    assert covered == set(DIMENSIONS)


@pytest.mark.parametrize("item", SUITE, ids=[i.id for i in SUITE])
def test_reference_passes_and_wrong_answer_fails(item):
    assert item.reference is not None and item.wrong is not None
    assert item.passes(item.reference), item.reference
    assert not item.passes(item.wrong), item.wrong


def test_score_by_language_and_dimension():
    refs = [i.reference for i in SUITE]
    s = score(SUITE, refs)
    assert s["accuracy"] == 1.0 and s["items"] == len(SUITE)
    assert s["by_language"] == {"en": 1.0, "zh": 1.0}
    half = [i.reference if i.lang == "en" else i.wrong for i in SUITE]
    s = score(SUITE, half)
    assert s["by_language"] == {"en": 1.0, "zh": 0.0}
    assert s["by_language_dimension"]["zh/response_constraints"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="responses"):
        score(SUITE, refs[:-1])


def test_rule_normalisation():
    assert Rule("abc", "fullmatch", ("strip", "lower", "remove_punctuation")).passes("  A.b,C! ")
    assert Rule("１２", "fullmatch", ()).passes("１２")
    assert Rule("12", "fullmatch", ("nfkc",)).passes("１２")
    assert Rule("x", "not_search", ()).passes("abc")
    assert Rule("a b", "fullmatch", ("collapse_whitespace",)).passes("a \n\t b")


def _write(tmp_path, obj):
    p = tmp_path / "f.jsonl"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False) + "\n")
    return p


GOOD = {
    "id": "x",
    "lang": "en",
    "dimensions": ["logical_reasoning", "response_constraints"],
    "instruction": "Say yes.",
    "rules": [{"pattern": "yes"}],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lang": "fr"}, "lang must be"),
        ({"dimensions": ["logical_reasoning"]}, "two or more"),
        ({"dimensions": ["logical_reasoning", "cooking"]}, "two or more"),
        ({"rules": []}, "non-empty list"),
        ({"rules": [{"pattern": "("}]}, "does not compile"),
        ({"rules": [{"pattern": "a", "match": "exact"}]}, "match must be"),
        ({"rules": [{"pattern": "a", "normalize": ["upper"]}]}, "normalize steps"),
        ({"instruction": " "}, "instruction must be"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_validation_errors(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load(_write(tmp_path, {**GOOD, **change}))


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="not JSON"):
        load(_write(tmp_path, "{oops\n"))
    dup = json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n"
    with pytest.raises(ValueError, match="duplicate id"):
        load(_write(tmp_path, dup))
    with pytest.raises(ValueError, match="missing field"):
        load(_write(tmp_path, {"id": "x"}))
    with pytest.raises(ValueError, match="no FollowEval file"):
        load(tmp_path / "missing.jsonl")
    assert len(load(_write(tmp_path, GOOD))) == 1
