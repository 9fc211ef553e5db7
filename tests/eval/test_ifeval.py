"""IFEval: every one of the 25 checkers on a passing and a failing response; the real data."""

from pathlib import Path

import pytest

from coralline.eval.ifeval import (
    CHECKERS,
    Prompt,
    check,
    count_sentences,
    default_data_path,
    load_prompts,
    score,
)

DATA = default_data_path()

CASES = {
    "keywords:existence": (
        {"keywords": ["ocean", "salt"]},
        "The ocean is full of salt.",
        "The sea is blue.",
    ),
    "keywords:frequency": (
        {"keyword": "cat", "frequency": 2, "relation": "at least"},
        "A cat met another cat.",
        "A cat sat.",
    ),
    "keywords:forbidden_words": ({"forbidden_words": ["bad"]}, "All is fine.", "This is bad."),
    "keywords:letter_frequency": (
        {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
        "Zero is fine.",
        "Zizzy zebras.",
    ),
    "language:response_language": (
        {"language": "de"},
        "Das ist ein schöner Tag und wir gehen heute spazieren.",
        "This is a nice day and we are going for a walk today.",
    ),
    "length_constraints:number_sentences": (
        {"num_sentences": 3, "relation": "less than"},
        "One. Two.",
        "One. Two. Three. Four.",
    ),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2},
        "First.\n***\nSecond.",
        "Only one.",
    ),
    "length_constraints:number_words": (
        {"num_words": 5, "relation": "at least"},
        "one two three four five six",
        "one two",
    ),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "First part.\n\nThen the second.",
        "First part.\n\nAfter that.",
    ),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2},
        "Hi [name] at [place].",
        "Hi [name].",
    ),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."},
        "Hello.\nP.S. bye",
        "Hello. Bye.",
    ),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one"),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Yes."),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2},
        "*first* and *second*",
        "*only one*",
    ),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nA\nSection 2\nB",
        "Section 1\nA",
    ),
    "detectable_format:json_format": ({}, '```json\n{"a": 1}\n```', "{a: 1"),
    "detectable_format:title": ({}, "<<My Title>>\ntext", "My Title\ntext"),
    "combination:two_responses": ({}, "First answer.\n******\nSecond answer.", "Only one."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", "Hi!"),
    "startend:end_checker": ({"end_phrase": "Peace!"}, "Goodbye. Peace!", "Peace! Goodbye."),
    "change_case:capital_word_frequency": (
        {"capital_frequency": 2, "capital_relation": "at least"},
        "THIS is VERY nice",
        "This is nice",
    ),
    "change_case:english_capital": (
        {},
        "THIS IS A SHOUTED ENGLISH SENTENCE ABOUT THE WEATHER.",
        "This is not shouted.",
    ),
    "change_case:english_lowercase": (
        {},
        "this is a quiet english sentence about the weather.",
        "This Is Not Lower.",
    ),
    "punctuation:no_comma": ({}, "No commas here.", "Yes, a comma."),
    "startend:quotation": ({}, '"Quoted answer."', "Not quoted."),
}


def test_every_instruction_type_has_a_case():
    assert set(CASES) == set(CHECKERS) and len(CHECKERS) == 25


@pytest.mark.parametrize("iid", sorted(CASES))
def test_checker_passes_and_fails(iid):
    kwargs, good, bad = CASES[iid]
    p = Prompt(1, "Say hi.", [iid], [kwargs])
    assert check(p, good) == [True], good
    assert check(p, bad) == [False], bad


def test_loose_mode_forgives_a_preamble_and_markdown():
    p = Prompt(1, "x", ["startend:quotation"], [{}])
    response = 'Sure, here it is:\n"Quoted answer."'
    assert check(p, response) == [False]
    assert check(p, response, loose=True) == [True]


def test_sentence_counter():
    assert count_sentences("Dr. Smith arrived. He paid $3.50. Great!") == 3


def test_real_data_loads_and_scores():
    prompts = load_prompts(DATA)
    assert len(prompts) == 541
    ids = {i for p in prompts for i in p.instruction_id_list}
    assert ids == set(CHECKERS)
    empty = score(prompts, [""] * len(prompts))
    assert empty["prompt_level_strict"] == 0.0 == empty["instruction_level_loose"]
    echo = score(prompts, [p.prompt for p in prompts])  # echoing the prompt follows some
    assert 0.0 < echo["instruction_level_strict"] < 1.0


def test_bad_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"key": 1, "prompt": "p", "instruction_id_list": ["nope:x"], "kwargs": [{}]}\n')
    with pytest.raises(ValueError, match="unknown instruction ids"):
        load_prompts(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="not an IFEval record"):
        load_prompts(bad)
    with pytest.raises(ValueError, match="no IFEval data"):
        load_prompts(tmp_path / "missing.jsonl")


def test_default_data_is_the_vendored_copy_inside_the_package(monkeypatch):
    import coralline

    monkeypatch.delenv("CORALLINE_IFEVAL_DATA", raising=False)
    path = default_data_path()
    package = Path(coralline.__file__).resolve().parent
    assert path.resolve().is_relative_to(package / "data" / "ifeval"), path
    assert path.is_file() and (path.parent / "LICENSE").is_file()
    assert len(load_prompts(path)) == 541


def test_environment_variable_overrides_the_data_path(monkeypatch, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(
        '{"key": 7, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], '
        '"kwargs": [{}]}\n'
    )
    monkeypatch.setenv("CORALLINE_IFEVAL_DATA", str(mine))
    assert default_data_path() == mine
    assert [p.key for p in load_prompts(default_data_path())] == [7]
