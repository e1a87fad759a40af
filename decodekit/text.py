"""Incremental detokenization with stop strings, so streamed text never shows what the final text drops."""

from __future__ import annotations

from collections.abc import Sequence

from decodekit.errors import InvalidParameter

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


def encode_chat(tokenizer: object, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation (``[{"role": ..., "content": ...}, ...]``) ready for the assistant's turn.

    Uses the checkpoint's chat template; without one, the turns' contents joined by blank lines.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n\n".join(m["content"] for m in messages))


def check_text(text: str, what: str, param: str | None = None) -> str:
    """``text`` if it can be encoded as UTF-8; InvalidParameter otherwise (a lone surrogate, as JSON's "\\ud800"
    or undecodable bytes on a command line give)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        message = f"{what} is not valid text: an unpaired surrogate at character {err.start}"
        raise InvalidParameter(message, param) from None
    return text


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """The stop strings of a ``stop`` argument: one string is one stop string; empty ones are dropped (they would
    cut everything). InvalidParameter for anything but text."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for i, text in enumerate(stops):
        if not isinstance(text, str):
            raise InvalidParameter(f"stop strings must be text, got {type(text).__name__} at position {i}", "stop")
        check_text(text, "a stop string", "stop")
    return [text for text in stops if text]


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Index of the earliest occurrence at or after ``start`` of any stop string, or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def unsafe_tail(text: str, stops: list[str]) -> int:
    """How many trailing characters might still change or turn out to begin a stop string."""
    pending = len(text) - len(text.rstrip(REPLACEMENT))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                pending = max(pending, size)
                break
    return pending


class TextStream:
    """Turns committed token ids into text deltas. ``push`` returns the text that is now certain and, when a
    stop string completed, how many of the pushed ids to keep (through the one that completed it)."""

    def __init__(self, tokenizer: object, stops: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> tuple[str, int | None]:
        start = len(self.ids)
        self.ids.extend(new_ids)
        text = self.decode(self.ids)
        if self.stops:
            hit = find_stop(text, self.stops, self.emitted)  # what was emitted holds no stop string, not even a start
            if hit is not None:
                keep = next(
                    k
                    for k in range(1, len(new_ids) + 1)
                    if find_stop(self.decode(self.ids[: start + k]), self.stops) is not None
                )
                del self.ids[start + keep :]
                self.stopped = True
                return self._advance(text, hit), keep
        return self._advance(text, len(text) - unsafe_tail(text, self.stops)), None

    def finish(self) -> str:
        """The text held back so far (nothing after a stop string)."""
        return "" if self.stopped else self._advance(self.decode(self.ids), None)

    def _advance(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta
