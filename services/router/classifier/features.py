"""Cheap text features of a prompt (microseconds): size, structure and wording cues.

They complement the MiniLM embedding, which sees only the first few dozen tokens: length,
the number of requirements packed into a request, code and math markers, and words that
signal a demanding task ("prove", "design", "trade-offs") or a trivial one ("hi", "what is").
"""

from __future__ import annotations

import math
import re

import numpy as np

_HARD_WORDS = re.compile(
    r"\b(prove|proof|derive|derivation|design|architect\w*|implement|optimi[sz]e|trade-?offs?|"
    r"step by step|justify|analy[sz]e|evaluate|compare|contrast|reconcil\w*|concurren\w*|"
    r"distributed|algorithm|complexity|edge cases?|constraints?|rigorous\w*|generali[sz]e|"
    r"strategy|framework|timeline|root cause|trace|explain why|assess|critically|weigh\w*|"
    r"multi-?step|plan)\b", re.IGNORECASE)
_EASY_WORDS = re.compile(
    r"^(hi|hey|hello|thanks|thank you|good (morning|evening))\b|\b(what is|what's|who|when|"
    r"how many|how do i|convert|translate|yes or no|true or false|one sentence|in a few words|"
    r"tl;?dr|synonym|opposite)\b", re.IGNORECASE)
_MATH = re.compile(r"[=^+*/<>√∫∑π]|\b(sin|cos|log|ln|integral|derivative|matrix|probability)\b",
                   re.IGNORECASE)
_CODE = re.compile(r"[{};`]|\b(def|class|function|return|import|SELECT|FROM|async|await|"
                   r"const|let|var|struct|fn)\b|\w\(\)")
_LIST = re.compile(r"(^|\s)(\d+[.)]|[-*•])\s")
# A quoted span's body excludes its opener too: with "[^\]]" a run of "[" without a "]" made
# every "[" scan to the end of the text (quadratic: over a minute for 200,000 characters).
# No training prompt has a nested opener inside a quoted span, so the features are unchanged.
_QUOTED = re.compile(r"\"[^\"]{12,}\"|“[^“”]{12,}”|\[[^\[\]]{12,}\]")
_SENTENCE = re.compile(r"[.!?](\s|$)")

FEATURE_NAMES = (
    "log_chars", "log_words", "log_sentences", "digit_frac", "log_math", "log_code",
    "log_hard_words", "log_easy_words", "log_commas_ands", "log_questions", "quoted_frac",
    "log_list_items", "mean_word_len", "log_unquoted_words",
)


def text_features(text: str) -> np.ndarray:
    """Features of one prompt, float32 [len(FEATURE_NAMES)] (unscaled)."""
    words = text.split()
    n_words = len(words)
    n_chars = len(text)
    quoted = sum(len(m.group(0)) for m in _QUOTED.finditer(text))
    unquoted_words = len(_QUOTED.sub(" ", text).split())
    commas_ands = text.count(",") + text.count(";") + len(re.findall(r"\band\b", text, re.IGNORECASE))
    return np.array([
        math.log1p(n_chars),
        math.log1p(n_words),
        math.log1p(len(_SENTENCE.findall(text))),
        sum(c.isdigit() for c in text) / max(n_chars, 1),
        math.log1p(len(_MATH.findall(text))),
        math.log1p(len(_CODE.findall(text))),
        math.log1p(len(_HARD_WORDS.findall(text))),
        math.log1p(len(_EASY_WORDS.findall(text))),
        math.log1p(commas_ands),
        math.log1p(text.count("?")),
        quoted / max(n_chars, 1),
        math.log1p(len(_LIST.findall(text))),
        (sum(len(w) for w in words) / n_words) if n_words else 0.0,
        math.log1p(unquoted_words),
    ], dtype=np.float32)
