"""A FollowEval-style harness: bilingual instruction-following items scored by regular
expressions (FollowEval: Jing et al. 2023; its official set is not public, so this reads any
file in the format below and ships a suite written by this team).

Format: JSON Lines, one item per line:
  id          unique string
  lang        "en" or "zh"
  dimensions  two or more of: string_manipulation, commonsense_reasoning, logical_reasoning,
              spatial_reasoning, response_constraints
  instruction the prompt given to the model
  rules       a non-empty list of {"pattern": regex, "match": mode, "normalize": [steps]}
                match      "search" (the pattern occurs), "fullmatch" (the whole normalised
                           response matches), "not_search" (the pattern does not occur)
                normalize  applied in order before matching: "strip", "lower", "nfkc"
                           (full-width -> half-width, etc.), "collapse_whitespace",
                           "remove_punctuation" (ASCII and CJK punctuation), "remove_spaces"
  reference   (optional) an answer that passes every rule
  wrong       (optional) an answer that fails at least one rule
An item is correct when ALL its rules pass; accuracy = correct items / items, reported per
language x dimension (an item counts in each of its dimensions).

Knows nothing about models: it validates files and scores (item, response) pairs.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DIMENSIONS = (
    "string_manipulation",
    "commonsense_reasoning",
    "logical_reasoning",
    "spatial_reasoning",
    "response_constraints",
)
MATCH_MODES = ("search", "fullmatch", "not_search")
NORMALIZERS = (
    "strip",
    "lower",
    "nfkc",
    "collapse_whitespace",
    "remove_punctuation",
    "remove_spaces",
)
_PUNCT = re.compile(
    r"[\u3000-\u303f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
    r"!-/:-@\[-`{-~\u2018-\u201f\u2026]"
)


@dataclass(frozen=True)
class Rule:
    pattern: str
    match: str = "search"
    normalize: tuple[str, ...] = ()

    def normalized(self, text: str) -> str:
        for step in self.normalize:
            if step == "strip":
                text = text.strip()
            elif step == "lower":
                text = text.lower()
            elif step == "nfkc":
                text = unicodedata.normalize("NFKC", text)
            elif step == "collapse_whitespace":
                text = re.sub(r"\s+", " ", text)
            elif step == "remove_punctuation":
                text = _PUNCT.sub("", text)
            elif step == "remove_spaces":
                text = re.sub(r"\s+", "", text)
        return text

    def passes(self, response: str) -> bool:
        text = self.normalized(response)
        if self.match == "search":
            return re.search(self.pattern, text, flags=re.DOTALL) is not None
        if self.match == "fullmatch":
            return re.fullmatch(self.pattern, text, flags=re.DOTALL) is not None
        return re.search(self.pattern, text, flags=re.DOTALL) is None


@dataclass(frozen=True)
class Item:
    id: str
    lang: str
    dimensions: tuple[str, ...]
    instruction: str
    rules: tuple[Rule, ...]
    reference: str | None = None
    wrong: str | None = None

    def passes(self, response: str) -> bool:
        return all(r.passes(response) for r in self.rules)


def _item(d: dict, where: str) -> Item:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: an item must be a JSON object")
    missing = [k for k in ("id", "lang", "dimensions", "instruction", "rules") if k not in d]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    unknown = set(d) - {"id", "lang", "dimensions", "instruction", "rules", "reference", "wrong"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    if d["lang"] not in ("en", "zh"):
        raise ValueError(f"{where}: lang must be 'en' or 'zh', got {d['lang']!r}")
    dims = d["dimensions"]
    if not isinstance(dims, list) or len(set(dims)) < 2 or any(x not in DIMENSIONS for x in dims):
        raise ValueError(f"{where}: dimensions must list two or more of {DIMENSIONS}")
    if not isinstance(d["instruction"], str) or not d["instruction"].strip():
        raise ValueError(f"{where}: instruction must be a non-empty string")
    if not isinstance(d["rules"], list) or not d["rules"]:
        raise ValueError(f"{where}: rules must be a non-empty list")
    rules = []
    for k, r in enumerate(d["rules"]):
        if not isinstance(r, dict) or "pattern" not in r:
            raise ValueError(f"{where}: rule {k} needs a pattern")
        mode = r.get("match", "search")
        if mode not in MATCH_MODES:
            raise ValueError(f"{where}: rule {k} match must be one of {MATCH_MODES}")
        norm = r.get("normalize", [])
        if not isinstance(norm, list) or any(n not in NORMALIZERS for n in norm):
            raise ValueError(f"{where}: rule {k} normalize steps must be from {NORMALIZERS}")
        try:
            re.compile(r["pattern"])
        except re.error as e:
            raise ValueError(f"{where}: rule {k} pattern does not compile: {e}") from None
        rules.append(Rule(r["pattern"], mode, tuple(norm)))
    return Item(
        str(d["id"]),
        d["lang"],
        tuple(dims),
        d["instruction"],
        tuple(rules),
        d.get("reference"),
        d.get("wrong"),
    )


def load(path: str | Path) -> list[Item]:
    """Items of a FollowEval-format file, validated; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no FollowEval file at {path}")
    items, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        item = _item(d, where)
        if item.id in seen:
            raise ValueError(f"{where}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def bundled_suite() -> list[Item]:
    """The suite shipped with coralline (bilingual, written by this team)."""
    ref = resources.files("coralline") / "data" / "followeval" / "coralline_bilingual_v1.jsonl"
    with resources.as_file(ref) as p:
        return load(p)


def score(items: list[Item], responses: list[str]) -> dict:
    """Accuracy overall, per language, and per language x dimension."""
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    cells: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    langs: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    ok_total = 0
    for item, resp in zip(items, responses, strict=True):
        ok = int(item.passes(resp))
        ok_total += ok
        langs[item.lang][0] += ok
        langs[item.lang][1] += 1
        for dim in item.dimensions:
            cells[(item.lang, dim)][0] += ok
            cells[(item.lang, dim)][1] += 1
    return {
        "accuracy": ok_total / len(items),
        "items": len(items),
        "by_language": {k: v[0] / v[1] for k, v in sorted(langs.items())},
        "by_language_dimension": {
            f"{k[0]}/{k[1]}": {"accuracy": v[0] / v[1], "items": v[1]}
            for k, v in sorted(cells.items())
        },
    }
