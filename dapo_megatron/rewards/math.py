"""The DAPO rule-based math reward.

Only the tail of the response is read (the last :data:`TAIL_CHARS` characters, as in the DAPO
reference): the text after the *last* ``Answer:`` (case-insensitive, up to the end of that line)
is the prediction. Prediction and ground truth are normalised the Minerva way (strip ``$``,
``\\boxed{}``, ``\\text{}``, spaces, units, thousands separators, trailing period...) and compared
as strings. If they differ, ``math_verify`` decides whether they are mathematically equivalent
(``0.5`` vs ``\\frac{1}{2}``). If there is no ``Answer:`` line, the last ``\\boxed{...}`` in the tail
is used instead. Correct -> score ``1.0``, otherwise ``-1.0``.
"""

from __future__ import annotations

import re
import threading
from typing import Any

# Imported eagerly (sympy is slow to import) so a reward worker pays it before its first timed call.
from math_verify import parse, verify

__all__ = ["TAIL_CHARS", "compute_score", "extract_answer", "last_boxed", "normalize_answer"]

#: How many trailing characters of the response are inspected.
TAIL_CHARS = 300

_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)

# Units and filler words dropped when they trail a number ("5 dollars" -> "5").
_UNIT_WORDS = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "inch",
    "hours",
    "hour",
    "km",
    "units",
    "unit",
    "points",
    "feet",
    "foot",
    "minutes",
    "minute",
    "seconds",
    "digits",
    "cents",
    "degrees",
    "cm",
    "m",
    "gm",
    "g",
    "kg",
    "pounds",
    "meters",
    "students",
    "days",
    "years",
    "people",
    "times",
)
_NUMBER_WITH_UNIT_RE = re.compile(
    r"^([-+]?\d[\d,]*(?:\.\d+)?)(?:\s*(?:" + "|".join(_UNIT_WORDS) + r")\b\.?)+$", re.IGNORECASE
)
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SPACING_COMMANDS = ("\\!", "\\,", "\\;", "\\:", "\\ ", "~")


def _braced(text: str, open_idx: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[open_idx] == "{"`` and the index after it."""
    depth = 0
    for i in range(open_idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; None if there is none."""
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        got = _braced(text, text.index("{", start))
        if got is not None:
            return got[0]
    return None


def _unwrap_command(text: str, command: str) -> str:
    """Replace every ``\\command{X}`` by ``X`` (balanced braces)."""
    pattern = re.compile(r"\\" + command + r"\s*\{")
    while True:
        m = pattern.search(text)
        if not m:
            return text
        got = _braced(text, m.end() - 1)
        if got is None:
            return text
        inner, end = got
        text = text[: m.start()] + inner + text[end:]


def extract_answer(response: str) -> str | None:
    """The raw text after the last ``Answer:`` in the tail of ``response`` (to end of line)."""
    tail = response[-TAIL_CHARS:]
    matches = list(_ANSWER_RE.finditer(tail))
    if not matches:
        return None
    return tail[matches[-1].end() :].split("\n", 1)[0].strip()


def normalize_answer(answer: str) -> str:
    """Minerva-style normalisation of a final answer, applied to prediction and ground truth."""
    text = answer.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    # "x = 5" -> "5" (both sides get the same treatment, so "y=2x" compares as "2x")
    text = text.split("=")[-1]
    text = text.replace("\\$", "").replace("$", "")
    for cmd in ("text", "textbf", "mathrm", "mathbf", "mbox", "overline"):
        text = _unwrap_command(text, cmd)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    for cmd in _SPACING_COMMANDS:
        text = text.replace(cmd, " ")
    text = text.strip().rstrip(".").strip()
    m = _NUMBER_WITH_UNIT_RE.match(text)
    if m:
        text = m.group(1)
    text = re.sub(r"\s+", "", text)
    # Shorthand TeX: \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    text = re.sub(r"\\frac([^{\\\s])([^{\\\s])", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\{[^{}]*\})([^{\\\s])", r"\\frac\1{\2}", text)
    text = re.sub(r"\\sqrt([^{\\\s])", r"\\sqrt{\1}", text)
    if _THOUSANDS_RE.match(text):
        text = text.replace(",", "")
    # "5.0" / "5." -> "5"
    if re.fullmatch(r"[-+]?\d+\.0*", text):
        text = text.split(".")[0]
    if text.startswith("+"):
        text = text[1:]
    return text


def _math_verify_equal(pred: str, ground_truth: str) -> bool:
    """``math_verify`` equivalence; signal-based timeouts only work on the main thread."""
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${ground_truth}$", parsing_timeout=timeout)
        target = parse(f"${pred}$", parsing_timeout=timeout)
        if not gold or not target:
            return False
        return bool(verify(gold, target, timeout_seconds=timeout))
    except Exception:  # math_verify raises on exotic input; that is simply "not equal"
        return False


def compute_score(response: str, ground_truth: str, **_: Any) -> dict[str, Any]:
    """Score one response with the DAPO rule.

    Args:
        response: the generated text (only its last :data:`TAIL_CHARS` characters are read).
        ground_truth: the reference answer (``reward_model.ground_truth``).

    Returns:
        ``{"score": 1.0 | -1.0, "acc": bool, "pred": str}``; ``pred`` is the normalised
        prediction ("" when no answer was found).
    """
    raw = extract_answer(response)
    if raw is None:
        raw = last_boxed(response[-TAIL_CHARS:])
    if raw is None:
        return {"score": -1.0, "acc": False, "pred": ""}
    pred = normalize_answer(raw)
    gold = normalize_answer(str(ground_truth))
    correct = bool(pred) and pred == gold
    if not correct and pred:
        correct = _math_verify_equal(pred, gold)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
