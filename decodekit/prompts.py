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
    references: tuple[tuple[str, ...], ...] = ()  # per turn, the accepted short answers, where the set gives them


def parse_questions(lines: list[str], source: str) -> list[Question]:
    """Parse JSON Lines with ``question_id``, ``category``, a non-empty list of string ``turns`` and optionally
    ``reference`` (per turn, an answer or a list of accepted answers)."""
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise ValueError("turns must be a non-empty list of non-empty strings")
            references = tuple(_answers(turn) for turn in row.get("reference") or [])
            questions.append(Question(int(row["question_id"]), str(row["category"]), tuple(turns), references))
        except (ValueError, KeyError, TypeError) as err:
            detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise InvalidParameter(f"{source}, line {number}: not a Spec-Bench question ({detail})") from None
    if not questions:
        raise InvalidParameter(f"{source} holds no questions")
    return questions


def _answers(reference: object) -> tuple[str, ...]:
    """One turn's reference: an answer, or a list of accepted answers."""
    answers = [reference] if isinstance(reference, str) else reference
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise ValueError("reference must hold, per turn, an answer or a list of answers")
    return tuple(answers)


# the question sets that ship with the package, by the name that --dataset takes
BUILTIN_SETS = {
    "prompts": "data/prompts.jsonl",  # 48 prompts: 8 for each of the six Spec-Bench task types
    "short-answers": "data/short_answers.jsonl",  # 32 one-line questions with reference answers (16 sums, 16 facts)
}


def builtin_questions(name: str = "prompts") -> list[Question]:
    """A question set that ships with the package (BUILTIN_SETS)."""
    text = files("decodekit").joinpath(BUILTIN_SETS[name]).read_text(encoding="utf-8")
    return parse_questions(text.splitlines(), f"built-in {name}")


def load_questions(path: str | Path | None = None) -> list[Question]:
    """The questions of ``path`` (Spec-Bench format), a built-in set by name, or the built-in prompts when None."""
    if path is None or path in BUILTIN_SETS:
        return builtin_questions(path or "prompts")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidParameter(f"cannot read dataset {path}: {err.strerror}") from None
    return parse_questions(text.splitlines(), str(path))
