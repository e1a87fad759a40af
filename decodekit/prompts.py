"""Question sets in Spec-Bench's question.jsonl format: the built-in set, or any file of that format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from decodekit.errors import InvalidParameter


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]


def parse_questions(lines: list[str], source: str) -> list[Question]:
    """Parse JSON Lines with ``question_id``, ``category`` and a non-empty list of string ``turns``."""
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise ValueError("turns must be a non-empty list of non-empty strings")
            questions.append(Question(int(row["question_id"]), str(row["category"]), tuple(turns)))
        except (ValueError, KeyError, TypeError) as err:
            detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise InvalidParameter(f"{source}, line {number}: not a Spec-Bench question ({detail})") from None
    if not questions:
        raise InvalidParameter(f"{source} holds no questions")
    return questions


def builtin_questions() -> list[Question]:
    """The project's own 48 prompts: 8 for each of the six Spec-Bench task types."""
    text = files("decodekit").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    return parse_questions(text.splitlines(), "built-in prompts")


def load_questions(path: str | Path | None = None) -> list[Question]:
    """The questions of ``path`` (Spec-Bench format), or the built-in set when None."""
    if path is None:
        return builtin_questions()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidParameter(f"cannot read dataset {path}: {err.strerror}") from None
    return parse_questions(text.splitlines(), str(path))
