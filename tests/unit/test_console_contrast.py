"""The console's colours meet WCAG 2.2 contrast, read from the stylesheet the service serves: text at least
4.5:1 against its background (AA, 1.4.3), the focus ring and form borders at least 3:1 against what they
sit on (1.4.11)."""

from __future__ import annotations

import re

import pytest

from service.api.console import STATIC_DIR

TEXT, NON_TEXT = 4.5, 3.0


def rules() -> dict[str, dict[str, str]]:
    """selector -> {property: value} of console.css (flat rules only, comments dropped, var() resolved)."""
    css = re.sub(r"/\*.*?\*/", "", (STATIC_DIR / "console.css").read_text(), flags=re.S)
    parsed: dict[str, dict[str, str]] = {}
    for selector, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        declarations = dict(
            (name.strip(), value.strip()) for name, _, value in
            (d.partition(":") for d in body.split(";") if ":" in d)
        )
        for one in selector.split(","):
            parsed.setdefault(one.strip(), {}).update(declarations)
    variables = {k: v for k, v in parsed[":root"].items() if k.startswith("--")}
    for declarations in parsed.values():
        for name, value in declarations.items():
            declarations[name] = re.sub(r"var\((--[\w-]+)\)", lambda m: variables[m.group(1)], value)
    return parsed


def colour(selector: str, prop: str) -> str:
    value = rules()[selector][prop]
    match = re.search(r"#[0-9a-fA-F]{3,6}\b", value)
    assert match, f"{selector} {{{prop}}} holds no hex colour: {value!r}"
    return match.group(0)


def luminance(hex_colour: str) -> float:
    digits = hex_colour.lstrip("#")
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    channels = [int(digits[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


PAGE, SOFT, BAR = ("body", "background"), (".card", "background"), (".bar", "background")
PAIRS = {  # what is drawn: (foreground, background, minimum)
    "body text": (("body", "color"), PAGE, TEXT),
    "hints on the page": ((".muted", "color"), PAGE, TEXT),
    "hints in a card": ((".hint", "color"), SOFT, TEXT),
    "links": (("a", "color"), PAGE, TEXT),
    "links in a card": (("a", "color"), SOFT, TEXT),
    "button text": (("button", "color"), ("button", "background"), TEXT),
    "the bar's text": ((".bar", "color"), BAR, TEXT),
    "the bar's button": ((".bar button", "color"), (".bar button", "background"), TEXT),
    "pass": ((".pass", "color"), SOFT, TEXT),
    "fail": ((".fail", "color"), SOFT, TEXT),
    "errors": ((".error", "color"), PAGE, TEXT),
    "warning text": (("body", "color"), (".warning", "background"), TEXT),
    "links in the active version's row": (("a", "color"), ("tr.active", "background"), TEXT),
    "form field borders": (("input", "border"), PAGE, NON_TEXT),
    "focus ring on the page": ((":focus-visible", "outline"), PAGE, NON_TEXT),
    "focus ring in a card": ((":focus-visible", "outline"), SOFT, NON_TEXT),
    "focus ring on the bar": ((":focus-visible", "outline"), BAR, NON_TEXT),
}


@pytest.mark.parametrize("what", sorted(PAIRS))
def test_console_colours_meet_wcag_contrast(what):
    foreground, background, minimum = PAIRS[what]
    ratio = contrast(colour(*foreground), colour(*background))
    assert ratio >= minimum, f"{what}: {ratio:.2f}:1 < {minimum}:1"
