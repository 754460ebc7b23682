"""What the pages say about typed values and durations, in the app's words. Pure functions; no Streamlit.

A Streamlit number input with bounds refuses an out-of-range value in the browser without a word (a red
outline) and the action then runs with the previous value; the pages therefore draw unbounded inputs,
name the range in the label, and check the value here: a problem blocks the action and says why.
"""

from __future__ import annotations

import html
import re

_NEAREST = re.compile(r"[;,:]?\s*(the )?nearest valid.*$", re.IGNORECASE)


def range_label(label: str, low: float, high: float) -> str:
    """The label with its valid range, e.g. "Steps (1 to 1,000,000)"."""
    return f"{label} ({_number(low)} to {_number(high)})"


def range_problem(label: str, value: float | None, low: float, high: float) -> str | None:
    """What is wrong with a typed value, or None when it lies in [low, high]."""
    if value is None:
        return f"{label}: type a number from {_number(low)} to {_number(high)}."
    if low <= value <= high:
        return None
    return (f"{label} must be from {_number(low)} to {_number(high)}; {_number(value)} is outside that "
            "range. Nothing runs with it until it is fixed.")


def without_suggestion(message: str) -> str:
    """A library message minus its own "nearest valid ..." hint, when the page shows one nearest shape of
    its own (two different suggestions at once confuse)."""
    return _NEAREST.sub("", message).rstrip(" ;,:")


def duration_text(seconds: float | None) -> str:
    """A duration for people: "about 12 s", "about 3 min", "about 1.5 h"."""
    if seconds is None:
        return "unknown until the parent has been scored once"
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def _number(value: float) -> str:
    return f"{value:,}" if float(value).is_integer() else f"{value:,.4g}"


# The library's messages name command-line flags; in the app each is a control with a label.
FLAG_NAMES = {
    "--seq-len": 'a smaller "Sequence length"',
    "--overwrite": 'tick "Replace an existing folder of that name"',
    "--batch-size": '"Batch size"',
    "--steps": '"Steps"',
    "--eval-every": '"Validate every (steps)"',
    "--lr": '"Learning rate"',
    "--calib-tokens": '"Calibration token budget"',
    "--tokens": '"Validation tokens"',
}
_FLAG = re.compile(r"(?:a smaller |pass )?(--[a-z][a-z-]*)")


def app_words(message: str) -> str:
    """A library message with its command-line flags replaced by the app's controls."""
    return _FLAG.sub(lambda m: FLAG_NAMES.get(m.group(1), m.group(0)), message)


_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)\b[^<>]*>")
_BREAKS = {"br", "p", "div", "li", "ul", "ol", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote"}


def without_markup(text: str) -> str:
    """A model's text without the HTML tags web text taught it (Gemma writes ``<strong>``): the words stay,
    the tags go (a block tag leaves a space), entities such as ``&amp;`` read as their character. Shown
    text is escaped afterwards all the same (ui.plain, html.escape)."""
    words = _TAG.sub(lambda m: " " if m.group(2).lower() in _BREAKS else "", text)
    return html.unescape(words)
