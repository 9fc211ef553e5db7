"""The token ids of a conversation's next turn, built so a retained KV cache can be reused.

A verifier that retains a session's KV cache (VerifyRequest.retain) prefills only the tokens a
next request adds after what it cached: the previous prompt and output. That saving needs the
next prompt to EXTEND those ids token for token, which re-rendering and re-tokenizing the whole
conversation does not promise (the decoded output may tokenize differently). `next_turn_ids`
appends to the ids themselves: the chat template's markup after an assistant turn plus the new
user turn and the generation prompt, tokenized on its own.

How: render the template for [user "A", assistant SENTINEL] and for the same plus the new user
message (with the generation prompt); the text after SENTINEL in the second is what follows an
assistant turn. When the history ends with an end-of-turn token (the generation stopped at EOS)
whose text starts that suffix, the template's own copy is dropped.

`chat_ids` renders a whole conversation given as messages (the OpenAI `messages`, the proto's
`ChatMessages`) with the template, for a first request.

Knows nothing about models or services; it uses a Hugging Face tokenizer only.
"""

from __future__ import annotations

from collections.abc import Iterable

SENTINEL = "<<coralline:assistant-turn>>"  # a text no template adds or changes


def prompt_ids(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of a first user turn: the tokenizer's chat template (with the generation
    prompt) when chat=True and it has one, else the bare text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        return _templated(tokenizer, [{"role": "user", "content": text}])
    return _ids(tokenizer(text))


ROLES = ("system", "user", "assistant")  # what a conversation given as messages may hold
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message


def chat_ids(tokenizer, messages: Iterable[tuple[str, str]]) -> list[int]:
    """Token ids of a whole conversation [(role, content), ...]: the tokenizer's chat template
    with the generation prompt. The last message must be a non-empty user message; roles are
    system, user, assistant (developer is read as system)."""
    turns = []
    for i, (role, content) in enumerate(messages):
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise ValueError(
                f"messages[{i}].role is {role!r}: coralline takes system, user, assistant "
                "(or developer) messages"
            )
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be text")
        turns.append({"role": role, "content": content})
    if not turns:
        raise ValueError("the prompt is empty: messages has no message")
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ValueError("the last message must be a non-empty user message")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template: send the prompt as text or ids")
    return _templated(tokenizer, turns)


def messages_ids(tokenizer, request, history: list[int] | None) -> list[int]:
    """The prompt ids of a GenerateRequest whose prompt is `messages` (a first request only:
    a continued conversation sends its next turn as text or ids)."""
    if history is not None:
        raise ValueError("continue_session takes the next turn as text or token_ids, not messages")
    return chat_ids(tokenizer, ((m.role, m.content) for m in request.messages.messages))


def _templated(tokenizer, turns: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def next_turn_ids(
    tokenizer,
    history_ids: list[int],
    message: str,
    eos_token_ids: Iterable[int] = (),
    chat: bool = True,
) -> list[int]:
    """history_ids (previous prompt ids + generated ids) followed by the ids of a new user
    turn and the generation prompt (chat=True, the tokenizer's chat template), or of the bare
    message text (chat=False)."""
    if not isinstance(message, str) or not message.strip():
        raise ValueError("the message is empty")
    history = [int(t) for t in history_ids]
    if not chat:
        return history + _ids(tokenizer(message, add_special_tokens=False))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat template: send the next turn as token_ids "
            "(or append the bare text with chat=False)"
        )
    first = [{"role": "user", "content": "A"}, {"role": "assistant", "content": SENTINEL}]
    second = [*first, {"role": "user", "content": message}]
    before = tokenizer.apply_chat_template(first, tokenize=False)
    after = tokenizer.apply_chat_template(second, tokenize=False, add_generation_prompt=True)
    head, sep, suffix = after.partition(SENTINEL)
    if not sep or SENTINEL in suffix or not before.startswith(head + SENTINEL):
        raise ValueError(
            "this chat template rewrites earlier turns, so a next turn cannot extend the "
            "previous ids: send the whole conversation as token_ids"
        )
    if history and history[-1] in set(eos_token_ids):
        eos_text = tokenizer.decode([history[-1]])
        if eos_text and suffix.startswith(eos_text):
            suffix = suffix[len(eos_text) :]
    return history + _ids(tokenizer(suffix, add_special_tokens=False))


def _ids(encoding) -> list[int]:
    ids = encoding["input_ids"] if not isinstance(encoding, list) else encoding
    return [int(t) for t in ids]
