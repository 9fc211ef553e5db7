"""Incremental detokenization and stop strings: the text of a generation, one round at a time.

`TextStream.add(new_ids)` returns the text those ids added and, when a stop string appeared,
how many of them to keep; the work of a call depends on the ids it is given, not on the length
of the output so far (the engine's `_Text` decoded the whole output again, several times when a
stop string showed). The streamed text is exactly `tokenizer.decode(ids,
skip_special_tokens=True)`, `clean_up_tokenization_spaces` included where that decode applies
it (`cleans_up` asks the tokenizer), cut at the stop string.

Ids become text one id at a time, in one of two ways:
  fast tokenizers (`is_fast` and a `tokenizers.Tokenizer` in `_tokenizer`): the `tokenizers`
      library's `DecodeStream`, which re-decodes a short window of ids in Rust;
  anything else with a `decode(ids, skip_special_tokens=...)`: a windowed re-decode (vLLM's
      "prefix offset / read offset"). The window is the ids of the last emitted piece (they
      begin at a character boundary, so a leading space or a byte run decodes in context)
      and the pending ids; an id emits what decoding the window adds to decoding its context.
Both emit nothing while the text ends with U+FFFD (the ids end inside a multi-byte character)
and, as `_Text` did, a round whose text ends with U+FFFD streams nothing: its text waits for a
round that ends on a whole character, or for `flush`. With clean-up, text after the last
character that no clean-up pattern (" .", " n't", ...) contains also waits: later ids may
change it.

Stop strings, as `_Text`: the first id after which `decode(ids so far)` contains a stop string
ends the text; it is the last id kept, and the text ends where the stop string begins (text
streamed already is never taken back: the streamed beginning of a stop string spanning rounds
stays). Several stop strings: the one that ends first in the text wins, ties to the longer
(`_Text` took the first in the tuple that appeared anywhere in the round). Each id's search
covers the last (longest stop - 1) characters settled before it plus what it added or left
held back. The text searched is decode's, an incomplete trailing character (U+FFFD) included,
so a stop string holding U+FFFD may match one that is not final (as with `_Text`).

Knows nothing about models, sampling or the engine: only a tokenizer and ids. Assumes decode
is causal: a later id does not change the text of earlier ones once it ends on a whole
character (true of byte-level BPE and WordPiece; SentencePiece's leading-space strip is handled
by the context). Byte-fallback decoders break that on invalid byte runs (a run of byte tokens
that turns invalid shows as one U+FFFD per byte, earlier valid bytes included): there the
streamed text can differ from decode, as `_Text`'s could, and `DecodeStream` raises "Invalid
prefix", after which the windowed re-decode takes over. A long run of text that keeps ending in
U+FFFD (garbage bytes) keeps growing the window. A tokenizer class that overrides `decode` with
something other than its backend's decode (plus clean-up) needs `fast=False`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete (or invalid) UTF-8 sequence
# every character of transformers' clean-up patterns: a clean-up never touches, nor reaches
# across, a character outside this set, so the text up to such a character is final
_CLEANUP_CHARS = frozenset(" .?!,'ntmsvre")
_CLEANUP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're k"


def _standard_clean_up(text: str) -> str:
    """transformers' `clean_up_tokenization` (used when the tokenizer has none of its own)."""
    for pattern, repl in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(pattern, repl)
    return text


def cleans_up(tokenizer) -> bool:
    """Whether `tokenizer.decode(ids)` applies `clean_up_tokenization_spaces` by default.

    Asked of the tokenizer itself (decode a probe with and without clean-up) because the flag
    alone does not say: transformers 5 ignores it for BPE models unless forced.
    """
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    try:
        ids = tokenizer.encode(_CLEANUP_PROBE, add_special_tokens=False)
        raw = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cleaned = tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # a decode without the keyword has no clean-up to apply
        return False
    if _standard_clean_up(raw) == raw:  # the probe did not survive the round trip: trust the flag
        return True
    return cleaned != raw


def fast_backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a fast tokenizer, or None (then: the fallback)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


class _StreamDecoder:
    """`DecodeStream` over a fast tokenizer's backend, plus what it holds back on demand."""

    def __init__(self, backend) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)
        self._context: list[int] = []  # the ids of the last emitted piece
        self._context_text: str | None = ""
        self._pending: list[int] = []  # ids after that boundary (their text is held back)
        self._window: _WindowDecoder | None = None  # takes over if DecodeStream gives up

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=True)

    @property
    def pending(self) -> list[int]:
        return self._pending if self._window is None else self._window.pending

    def step(self, token_id: int) -> str | None:
        if self._window is not None:
            return self._window.step(token_id)
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:  # "Invalid prefix": the text before its window changed (see above)
            self._window = _WindowDecoder(self._decode, self._context + self._pending)
            self._window.skip(len(self._context))
            return self._window.step(token_id)
        self._pending.append(token_id)
        if piece is None:
            return None
        self._context = self._pending  # begins where the previous piece ended
        self._context_text = None
        self._pending = []
        return piece

    def held(self) -> str:
        """The text of the pending ids, as decode of everything would show it now."""
        if self._window is not None:
            return self._window.held()
        if not self._pending:
            return ""
        if self._context_text is None:
            self._context_text = self._decode(self._context)
        return self._decode(self._context + self._pending)[len(self._context_text) :]


class _WindowDecoder:
    """The windowed re-decode ("prefix offset / read offset"): the window is the ids of the
    last emitted piece (context, beginning where an earlier piece ended: a character boundary)
    followed by the pending ids; a step emits what decoding the window adds to its context."""

    def __init__(self, decode: Callable[[list[int]], str], ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(ids)  # context ids, then the pending ones
        self._read = 0  # where the pending ids begin in self._ids
        self._prefix = ""  # decode(self._ids[: self._read])

    def skip(self, n: int) -> None:
        """The first n ids are context: their text was emitted already."""
        self._read = n
        self._prefix = self._decode(self._ids[:n]) if n else ""

    @property
    def pending(self) -> list[int]:
        return self._ids[self._read :]

    def step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix) or text.endswith(REPLACEMENT):
            return None
        piece = text[len(self._prefix) :]
        del self._ids[: self._read]  # the ids of this piece are the next context
        self.skip(len(self._ids))
        return piece

    def held(self) -> str:
        if self._read == len(self._ids):
            return ""
        return self._decode(self._ids)[len(self._prefix) :]


class TextStream:
    """Incremental detokenization + stop strings over generated ids."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), *, fast: bool | None = None) -> None:
        """`fast`: None uses `DecodeStream` when the tokenizer allows, False forces the windowed
        re-decode, True requires `DecodeStream` (ValueError without a fast backend)."""
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        self.stop: tuple[str, ...] = stop
        self._overlap = max((len(s) for s in stop), default=1) - 1
        self.cleanup = cleans_up(tokenizer)
        clean = getattr(tokenizer, "clean_up_tokenization", None)
        self._clean: Callable[[str], str] = clean if callable(clean) else _standard_clean_up
        backend = fast_backend(tokenizer) if fast is not False else None
        if fast and backend is None:
            raise ValueError("fast=True needs a fast tokenizer with a tokenizers backend")
        self.fast = backend is not None
        if backend is not None:
            self._decoder: _StreamDecoder | _WindowDecoder = _StreamDecoder(backend)
        elif self.cleanup:
            self._decoder = _WindowDecoder(
                lambda ids: tokenizer.decode(
                    ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
            )
        else:
            self._decoder = _WindowDecoder(
                lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
            )
        self._pieces: list[str] = []  # the streamed text
        self._tail = ""  # the last self._overlap characters streamed (or settled this round)
        self._unsent: list[str] = []  # settled text held back with an incomplete character
        self._raw = ""  # clean-up only: settled raw text after the last final character
        self._done = False  # a stop string ended the text, or flush() was called

    @property
    def text(self) -> str:
        """All text streamed so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _settle(self, raw: str) -> str:
        """Clean-up only: the part of the settled raw text no later id can change, cleaned."""
        raw = self._raw + raw
        i = len(raw) - 1
        while i >= len(self._raw) and raw[i] in _CLEANUP_CHARS:
            i -= 1
        if i < len(self._raw):  # no final character in the new text: hold it all
            self._raw = raw
            return ""
        self._raw = raw[i + 1 :]
        return self._clean(raw[: i + 1])

    def _held(self) -> str:
        """The text after the settled text, as decode of all ids would show it now."""
        if self.cleanup:
            if not self._raw and not self._decoder.pending:
                return ""
            return self._clean(self._raw + self._decoder.held())
        return self._decoder.held()

    def _find_stop(self, window: str) -> tuple[int, int] | None:
        """(start, end) in window of the stop string that ends first, not ending in the tail."""
        best = None
        for s in self.stop:
            start = window.find(s, max(0, len(self._tail) - len(s) + 1))
            if start >= 0:
                key = (start + len(s), start)
                best = key if best is None or key < best else best
        return None if best is None else (best[1], best[0])

    def add(self, new_ids: list[int]) -> tuple[str, int | None]:
        """(text delta, number of new ids to keep if a stop string ended the text, else None)."""
        if self._done:
            raise RuntimeError("the text has ended (a stop string, or flush)")
        settled = self._unsent  # settled text not streamed yet: held rounds, then this one
        held = None  # the held-back text after the last id, when already known
        for k, token_id in enumerate(new_ids):
            piece = self._decoder.step(int(token_id))
            if piece and self.cleanup:
                piece = self._settle(piece)
            piece = piece or ""
            if self.stop:
                held = self._held()
                found = self._find_stop(self._tail + piece + held)
                if found is not None:
                    # where the stop string begins, counted from the end of the streamed text
                    cut = sum(map(len, settled)) - len(self._tail) + found[0]
                    delta = ("".join(settled) + piece + held)[: max(cut, 0)]
                    self._finish(delta)
                    return delta, k + 1
                if piece and self._overlap:
                    self._tail = (self._tail + piece)[-self._overlap :]
            if piece:
                settled.append(piece)
        if held is None:
            held = self._held()
        if held.endswith(REPLACEMENT):  # an incomplete character: hold the round back
            self._unsent = settled
            return "", None
        delta = "".join(settled)
        self._unsent = []
        if delta:
            self._pieces.append(delta)
        return delta, None

    def flush(self) -> str:
        """Whatever is still held back (the generation ended)."""
        if self._done:
            return ""
        delta = "".join(self._unsent) + self._held()
        self._finish(delta)
        return delta

    def _finish(self, delta: str) -> None:
        if delta:
            self._pieces.append(delta)
        self._unsent = []
        self._done = True
