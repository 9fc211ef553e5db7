"""IFEval scoring (Zhou et al. 2023, arXiv 2311.07911): the 25 verifiable instruction types,
written from their public definitions, with strict and loose accuracy at prompt and
instruction level.

  strict   the response as generated
  loose    the instruction counts as followed if ANY of 8 variants passes: the response with
           markdown '*' removed or not, and with its first line, last line, or both removed
  prompt-level accuracy       share of prompts whose instructions ALL pass
  instruction-level accuracy  share of all instructions that pass
Differences from the reference implementation, stated: words are counted with the regex \\w+
(the reference uses nltk's RegexpTokenizer(r"\\w+"), the same rule); capital words are found with
a regex word split instead of nltk.word_tokenize (no punkt data offline); sentences are split by
a regex close to the reference's split_into_sentences. Language identification is langdetect
(as in the reference), seeded for determinism.

Knows nothing about models: it scores (prompt record, response) pairs.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


def _relation(count: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"unknown relation {relation!r} (expected 'less than' or 'at least')")


def _lang(text: str) -> str | None:
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None


_ABBREV = r"(Mr|St|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|Mt|Inc|Ltd|Jr|Sr|Co|vs|etc|e\.g|i\.e)"


def count_sentences(text: str) -> int:
    """Sentences, split like the reference's split_into_sentences (abbreviations, decimals,
    ellipses and quoted ends are not boundaries)."""
    t = " " + text.replace("\n", " ") + "  "
    t = re.sub(_ABBREV + r"[.]", r"\1<prd>", t)
    t = re.sub(r"(\d)[.](\d)", r"\1<prd>\2", t)
    t = re.sub(r"\.{2,}", lambda m: "<prd>" * len(m.group()), t)
    t = re.sub(r"\s([A-Za-z])[.] ", r" \1<prd> ", t)
    t = t.replace('."', '".').replace('!"', '"!').replace('?"', '"?')
    t = re.sub(r"([.?!])", r"\1<stop>", t)
    t = t.replace("<prd>", ".")
    return len([s for s in t.split("<stop>") if s.strip()])


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


# ---------------------------------------------------------------------------------- checkers
def keywords_existence(r: str, keywords: list[str]) -> bool:
    return all(re.search(k, r, flags=re.IGNORECASE) for k in keywords)


def keywords_frequency(r: str, keyword: str, frequency: int, relation: str) -> bool:
    return _relation(len(re.findall(keyword, r, flags=re.IGNORECASE)), relation, frequency)


def keywords_forbidden_words(r: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(r"\b" + w + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words)


def keywords_letter_frequency(r: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _relation(Counter(r.lower())[letter.lower()], let_relation, let_frequency)


def language_response_language(r: str, language: str) -> bool:
    return _lang(r) == language


def length_number_sentences(r: str, num_sentences: int, relation: str) -> bool:
    return _relation(count_sentences(r), relation, num_sentences)


def length_number_paragraphs(r: str, num_paragraphs: int) -> bool:
    parts = re.split(r"\s?\*\s?\*\s?\*\s?", r)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def length_number_words(r: str, num_words: int, relation: str) -> bool:
    return _relation(count_words(r), relation, num_words)


def length_nth_paragraph_first_word(
    r: str, num_paragraphs: int, nth_paragraph: int, first_word: str
) -> bool:
    paragraphs = [p for p in re.split(r"\n\n", r) if p.strip()]
    if len(paragraphs) != num_paragraphs or nth_paragraph > len(paragraphs):
        return False
    words = paragraphs[nth_paragraph - 1].strip().split()
    if not words:
        return False
    word = words[0].lstrip("'\"").rstrip(".,!?;:'\"").lower()
    return word == first_word.lower()


def content_number_placeholders(r: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= num_placeholders


def content_postscript(r: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    elif marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def format_number_bullet_lists(r: str, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def format_constrained_response(r: str) -> bool:
    return any(
        o in r.strip() for o in ("My answer is yes.", "My answer is no.", "My answer is maybe.")
    )


def format_number_highlighted_sections(r: str, num_highlights: int) -> bool:
    found = re.findall(r"\*[^\n\*]*\*", r) + re.findall(r"\*\*[^\n\*]*\*\*", r)
    return sum(1 for h in found if h.strip("*").strip()) >= num_highlights


def format_multiple_sections(r: str, section_spliter: str, num_sections: int) -> bool:
    sections = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", r)
    return len(sections) - 1 >= num_sections


def format_json(r: str) -> bool:
    v = r.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if v.startswith(prefix):
            v = v[len(prefix) :]
            break
    v = v.removesuffix("```").strip()
    try:
        json.loads(v)
    except ValueError:
        return False
    return True


def format_title(r: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def combination_two_responses(r: str) -> bool:
    parts = r.split("******")
    valid = []
    for i, p in enumerate(parts):
        if not p.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(p)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def combination_repeat_prompt(r: str, prompt_to_repeat: str) -> bool:
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def startend_end_checker(r: str, end_phrase: str) -> bool:
    return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def case_capital_word_frequency(r: str, capital_frequency: int, capital_relation: str) -> bool:
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", r)
    return _relation(sum(1 for w in words if w.isupper()), capital_relation, capital_frequency)


def case_english_capital(r: str) -> bool:
    return r.isupper() and _lang(r) == "en"


def case_english_lowercase(r: str) -> bool:
    return r.islower() and _lang(r) == "en"


def punctuation_no_comma(r: str) -> bool:
    return "," not in r


def startend_quotation(r: str) -> bool:
    v = r.strip()
    return len(v) > 1 and v[0] == '"' and v[-1] == '"'


CHECKERS: dict[str, Callable[..., bool]] = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": length_number_sentences,
    "length_constraints:number_paragraphs": length_number_paragraphs,
    "length_constraints:number_words": length_number_words,
    "length_constraints:nth_paragraph_first_word": length_nth_paragraph_first_word,
    "detectable_content:number_placeholders": content_number_placeholders,
    "detectable_content:postscript": content_postscript,
    "detectable_format:number_bullet_lists": format_number_bullet_lists,
    "detectable_format:constrained_response": format_constrained_response,
    "detectable_format:number_highlighted_sections": format_number_highlighted_sections,
    "detectable_format:multiple_sections": format_multiple_sections,
    "detectable_format:json_format": format_json,
    "detectable_format:title": format_title,
    "combination:two_responses": combination_two_responses,
    "combination:repeat_prompt": combination_repeat_prompt,
    "startend:end_checker": startend_end_checker,
    "change_case:capital_word_frequency": case_capital_word_frequency,
    "change_case:english_capital": case_english_capital,
    "change_case:english_lowercase": case_english_lowercase,
    "punctuation:no_comma": punctuation_no_comma,
    "startend:quotation": startend_quotation,
}


@dataclass(frozen=True)
class Prompt:
    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict]


def default_data_path() -> Path:
    """Where IFEval's input_data.jsonl is read from: $CORALLINE_IFEVAL_DATA when set, else the
    541 prompts shipped inside the package (coralline/data/ifeval/, vendored unchanged from the
    IFEval release under its Apache-2.0 licence; see SOURCE.md there)."""
    env = os.environ.get("CORALLINE_IFEVAL_DATA")
    if env:
        return Path(env)
    return Path(str(resources.files("coralline") / "data" / "ifeval" / "input_data.jsonl"))


def load_prompts(path: str | Path) -> list[Prompt]:
    """IFEval input_data.jsonl, validated (unknown instruction ids are a clear error)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no IFEval data at {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            p = Prompt(
                int(d["key"]), str(d["prompt"]), list(d["instruction_id_list"]), list(d["kwargs"])
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not an IFEval record ({e})") from None
        unknown = [i for i in p.instruction_id_list if i not in CHECKERS]
        if unknown or len(p.kwargs) != len(p.instruction_id_list):
            raise ValueError(f"{path}:{n}: unknown instruction ids {unknown} or kwargs mismatch")
        out.append(p)
    return out


def _variants(response: str) -> list[str]:
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    base = [response, first, last, both]
    return [v for v in base + [v.replace("*", "") for v in base] if v.strip()]


def check(prompt: Prompt, response: str, loose: bool = False) -> list[bool]:
    """One verdict per instruction of the prompt."""
    verdicts = []
    for iid, kw in zip(prompt.instruction_id_list, prompt.kwargs, strict=True):
        fn = CHECKERS[iid]
        kw = {k: v for k, v in kw.items() if v is not None}
        if iid == "combination:repeat_prompt" and "prompt_to_repeat" not in kw:
            kw["prompt_to_repeat"] = prompt.prompt
        candidates = _variants(response) if loose else [response]
        verdicts.append(bool(response.strip()) and any(fn(c, **kw) for c in candidates))
    return verdicts


def score(prompts: list[Prompt], responses: list[str]) -> dict[str, float]:
    """Prompt- and instruction-level accuracy, strict and loose (fractions in [0, 1])."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    out = {}
    for mode in ("strict", "loose"):
        per = [check(p, r, loose=mode == "loose") for p, r in zip(prompts, responses, strict=True)]
        out[f"prompt_level_{mode}"] = sum(all(v) for v in per) / max(1, len(per))
        flat = [x for v in per for x in v]
        out[f"instruction_level_{mode}"] = sum(flat) / max(1, len(flat))
    out["average_strict"] = (out["prompt_level_strict"] + out["instruction_level_strict"]) / 2
    return out
