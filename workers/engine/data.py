"""Forget/retain examples and their parsing from JSON rows.

An example is either free text ({"text": ...}) or a (prompt, answer) pair ({"prompt", "answer"};
TOFU's {"question", "answer"} is accepted as the same thing). For pairs only the answer tokens are
scored by the losses; the prompt is context.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Example:
    text: str | None = None
    prompt: str | None = None
    answer: str | None = None

    def __post_init__(self) -> None:
        if self.text is None and (self.prompt is None or self.answer is None):
            raise ValueError("an example needs 'text' or both 'prompt' and 'answer'")
        if self.text is not None and (self.prompt is not None or self.answer is not None):
            raise ValueError("an example has either 'text' or 'prompt'+'answer', not both")

    @property
    def is_pair(self) -> bool:
        return self.text is None

    @property
    def full_text(self) -> str:
        """The string a language model sees: the text, or prompt + ' ' + answer."""
        if self.text is not None:
            return self.text
        return f"{self.prompt} {self.answer}"

    def to_dict(self) -> dict[str, str]:
        if self.text is not None:
            return {"text": self.text}
        return {"prompt": self.prompt or "", "answer": self.answer or ""}


def parse_example(row: dict[str, Any]) -> Example:
    if "text" in row:
        return Example(text=str(row["text"]))
    prompt = row.get("prompt", row.get("question"))
    if prompt is None or "answer" not in row:
        raise ValueError(f"unrecognised example keys {sorted(row)}: want text, or prompt/question + answer")
    return Example(prompt=str(prompt), answer=str(row["answer"]))


def parse_examples(rows: Iterable[dict[str, Any]]) -> list[Example]:
    return [parse_example(r) for r in rows]


def read_jsonl(path: str | Path) -> list[Example]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return parse_examples(json.loads(line) for line in lines if line.strip())


def read_corpus(path: str | Path) -> tuple[list[Example], list[str]]:
    """An operator retain corpus (JSON lines): examples as given, and bare prompts (rows with a prompt or
    question and no answer) for the base model to answer itself. ValueError names the line that is wrong."""
    given: list[Example] = []
    prompts: list[str] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("want a JSON object")  # noqa: TRY004 (callers catch ValueError)
            bare = row.get("prompt", row.get("question"))
            if "answer" not in row and "text" not in row and isinstance(bare, str):
                prompts.append(bare)
            else:
                given.append(parse_example(row))
        except ValueError as exc:  # json.JSONDecodeError is one
            raise ValueError(f"{path} line {number}: {exc}") from exc
    return given, prompts
