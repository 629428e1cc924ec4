"""What a deletion request is made of: the submission contract shared by the API (request bodies), the
domain (validation, storage) and the console. Models forbid unknown fields, so a client cannot set
server-owned fields (tenant, status, version) by sending them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.engine.config import LAYER_KINDS, METHODS

Method = Literal[METHODS]
Reason = Literal["gdpr_art17", "ccpa", "copyright", "harmful_content", "other"]


class StrictModel(BaseModel):
    """Unknown fields refused, and no type coercion ("3" is not an integer): the body is what the schema says."""

    model_config = ConfigDict(extra="forbid", strict=True)


def reject_nul(value: Any, where: str = "body") -> None:
    """Raise ValueError at the first string (value or key) holding a NUL: PostgreSQL text cannot store one."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where} contains a NUL character")
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_nul(key, f"{where} key")
            reject_nul(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            reject_nul(item, f"{where}.{index}")


# ---------------------------------------------------------------- deletion requests


class ForgetItem(StrictModel):
    """Free text to forget ({"text"}), or a question/answer pair ({"prompt", "answer"})."""

    text: str | None = Field(None, min_length=1)
    prompt: str | None = Field(None, min_length=1)
    answer: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _text_or_pair(self) -> ForgetItem:
        has_pair = self.prompt is not None or self.answer is not None
        if self.text is None and not (self.prompt and self.answer):
            raise ValueError("an item needs 'text', or both 'prompt' and 'answer'")
        if self.text is not None and has_pair:
            raise ValueError("an item has either 'text' or 'prompt'+'answer', not both")
        return self

    def chars(self) -> int:
        return sum(len(v) for v in (self.text, self.prompt, self.answer) if v)

    def as_row(self) -> dict[str, str]:
        return {
            k: v for k, v in (("text", self.text), ("prompt", self.prompt), ("answer", self.answer)) if v is not None
        }


class UnlearnParams(StrictModel):
    """Per-request overrides of the operator's defaults, within bounds."""

    steps: int | None = Field(None, ge=1, le=2000)
    lr: float | None = Field(None, gt=0, le=0.1)
    layer: Literal[LAYER_KINDS] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    relearn_check: bool = False
    thresholds: dict[str, float] | None = Field(
        None, description="Verdict threshold overrides, within the allowed bounds"
    )

    @field_validator("thresholds")
    @classmethod
    def _thresholds_in_bounds(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        from workers.engine.verify.verdict import Thresholds

        Thresholds().bounded(value)
        return value


class DeletionRequestCreate(StrictModel):
    subject_ref: str = Field(
        ..., min_length=1, max_length=200, description="Your reference for the data subject or case"
    )
    reason: Reason
    forget: list[ForgetItem] = Field(..., min_length=1, description="The data to forget")
    retain: list[ForgetItem] = Field(default_factory=list, description="Optional examples whose behaviour must be kept")
    method: Method | None = None
    params: UnlearnParams | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        reject_nul(value)
        return value
