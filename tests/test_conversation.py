"""next_turn_ids on the real SmolLM2 tokenizer: a next turn built on the ids equals the chat
template of the whole conversation, tokenized at once."""

import pytest

from coralline import models
from coralline.conversation import chat_ids, next_turn_ids, prompt_ids


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m-instruct"))


def _template(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("ends_with_eos", [True, False])
def test_a_second_turn_equals_the_template_of_the_whole_conversation(tok, ends_with_eos):
    """Holds exactly for ASCII text whose ids are the tokenizer's own encoding of it (a model
    may emit another segmentation of the same text; then the ids differ but the text is equal,
    and next_turn_ids keeps the model's ids, which is what the retained cache holds)."""
    q1, q2 = "What is the capital of France?", "And of Italy?"
    answer = "The capital of France is Paris."
    prompt = _template(tok, [{"role": "user", "content": q1}])
    assistant = tok(answer, add_special_tokens=False)["input_ids"]
    if ends_with_eos:
        assistant += [tok.eos_token_id]  # <|im_end|>: the generation stopped at EOS
    got = next_turn_ids(tok, prompt + assistant, q2, [tok.eos_token_id])
    text = tok.decode(assistant, skip_special_tokens=True)
    want = _template(
        tok,
        [
            {"role": "user", "content": q1},
            {"role": "assistant", "content": text},
            {"role": "user", "content": q2},
        ],
    )
    assert got[: len(prompt) + len(assistant)] == prompt + assistant  # extends the history
    assert got == want
    assert tok.decode(got).endswith(
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_raw_turns_and_errors(tok):
    assert next_turn_ids(tok, [1, 2], " more", chat=False) == [1, 2] + tok(" more")["input_ids"]
    with pytest.raises(ValueError, match="empty"):
        next_turn_ids(tok, [1, 2], "  ", [2])

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="send the next turn as token_ids"):
        next_turn_ids(NoTemplate(), [1, 2], "hi", [2])


def test_a_template_that_rewrites_earlier_turns_is_refused():
    class Rewriting:  # drops earlier assistant turns once a user follows (as some templates do)
        chat_template = "..."

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            if messages[-1]["role"] == "user" and len(messages) > 1:
                messages = [m for m in messages if m["role"] == "user"]
            return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    with pytest.raises(ValueError, match="rewrites earlier turns"):
        next_turn_ids(Rewriting(), [1, 2], "hi", [2])


def test_chat_ids_render_a_whole_conversation(tok):
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    got = chat_ids(tok, [(m["role"], m["content"]) for m in convo])
    assert got == _template(tok, convo)
    # developer is OpenAI's newer name for system
    dev = chat_ids(tok, [("developer", "Be brief."), ("user", "Hi")])
    assert dev == _template(tok, [convo[0], convo[1]])
    assert chat_ids(tok, [("user", "Hi")]) == prompt_ids(tok, "Hi")  # the one-message form
    for messages, match in [
        ([], "empty"),
        ([("tool", "x"), ("user", "Hi")], "role is 'tool'"),
        ([("user", "Hi"), ("assistant", "Hello")], "last message"),
        ([("user", "  ")], "last message"),
        ([("user", 5)], "text"),
    ]:
        with pytest.raises(ValueError, match=match):
            chat_ids(tok, messages)
