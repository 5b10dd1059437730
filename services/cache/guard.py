"""The semantic cache's false-hit guard: rules checked after the cosine score passes.

Sentence embeddings put "is X safe" and "is X not safe", "2 eggs" and "3 eggs", "capital of
France" and "capital of Germany" close together (cosine 0.9-0.99 on all-MiniLM-L6-v2), yet the
answers differ. A candidate above the similarity threshold is only served if these all agree
between the query and the stored query:

1. negation: the same number of negation cues (not, no, never, without, n't, ...), and no word
   in one text that is a negated form of a word in the other (unsafe/safe, illegal/legal,
   impossible/possible, non-toxic/toxic counts as a cue);
2. numbers: the same multiset of quantities: digits anywhere ("Q1", "2FA", "3.11", "10,000"),
   number words ("twenty five" = 25), ordinals ("3rd" = "third");
3. entities: every named-entity-like word of one text appears in the other. Entity-like: a
   capitalized word that does not start a sentence, a word with inner capitals or digits
   ("iPhone", "NASA", "K2"), or a gazetteer place/language name in any case ("france");
4. opposites: no antonym pair split across the texts (largest/smallest, before/after, ...);
5. direction: no "A to B" in one text with "B to A" in the other ("from X to Y", "X into Y",
   "X from Y" read as Y -> X). Mean-pooled embeddings barely see word order: "convert a list to
   a string" and "convert a string to a list" score 0.99.

The rules are deliberately one-sided: a paraphrase that changes a number's spelling or drops a
name is missed (a cheaper error than serving a wrong answer). Pure functions, no model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

GAZETTEER_PATH = Path(__file__).parent / "data" / "gazetteer.txt"

_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
_NUM_RE = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?:(st|nd|rd|th)(?![A-Za-z]))?")
_ORDINAL_RE = re.compile(r"\d+(?:st|nd|rd|th)", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"[.!?:;\n]")

NEGATION_CUES = frozenset(
    "not no never none nobody nothing neither nor nowhere without cannot non "
    "dont doesnt didnt isnt arent wasnt werent cant couldnt wont wouldnt shouldnt "
    "havent hasnt hadnt".split()
)
_NEGATION_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_ORDINALS = {w: i + 1 for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split())}

OPPOSITES = (
    ("largest", "smallest"), ("biggest", "smallest"), ("larger", "smaller"),
    ("bigger", "smaller"), ("most", "least"), ("more", "less"), ("maximum", "minimum"),
    ("max", "min"), ("best", "worst"), ("better", "worse"), ("highest", "lowest"),
    ("higher", "lower"), ("longest", "shortest"), ("longer", "shorter"), ("oldest", "youngest"),
    ("oldest", "newest"), ("older", "younger"), ("before", "after"), ("increase", "decrease"),
    ("buy", "sell"), ("open", "closed"), ("open", "close"), ("hot", "cold"), ("cheap", "expensive"),
    ("cheapest", "expensive"), ("early", "late"), ("earliest", "latest"), ("fastest", "slowest"),
    ("faster", "slower"), ("import", "export"), ("input", "output"), ("upload", "download"),
    ("enable", "disable"), ("add", "remove"), ("win", "lose"), ("true", "false"),
    ("above", "below"), ("north", "south"), ("east", "west"), ("male", "female"),
    ("men", "women"), ("positive", "negative"), ("minimum", "max"), ("encrypt", "decrypt"),
    ("start", "stop"), ("private", "public"), ("inside", "outside"), ("always", "sometimes"),
)

_DIRECTIONAL = frozenset(("to", "into", "onto", "from"))
_DETERMINERS = frozenset("a an the my your our their this that these those some".split())

# Function words that are capitalized in title-case text or start quotes without naming anything.
COMMON = frozenset(
    "a an the and or but if then so of in on at to for from by with about as into over under "
    "is are was were be been being am do does did done have has had can could will would shall "
    "should may might must i me my mine we us our you your he him his she her it its they them "
    "their this that these those what which who whom whose when where why how whats hows "
    "please tell give show explain write list find make help let lets im ive id ok okay yes no "
    "not any some all each every there here than too very just also".split()
)


@dataclass(frozen=True)
class Verdict:
    """Outcome of a guard check: ok, or the rule that failed and why."""

    ok: bool
    rule: str = ""
    detail: str = ""


PASS = Verdict(True)


@dataclass(frozen=True)
class TextFeatures:
    """What the rules compare, extracted once per text."""

    words: frozenset[str]
    negations: int
    numbers: tuple[str, ...]
    entities: frozenset[str]
    arrows: frozenset[tuple[str, str]]


def _norm(word: str) -> str:
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    # "don't" -> "dont": one spelling for the contraction cues.
    return w.replace("'", "")


def _number_words(words: list[str]) -> list[str]:
    """Values of runs of number words ("twenty five" -> "25") and ordinals ("third" -> "#3")."""
    out: list[str] = []
    total = current = 0
    in_run = False
    for w in words + [""]:
        if w in _UNITS or w in _TENS:
            current += _UNITS.get(w, 0) + _TENS.get(w, 0)
        elif w in _SCALES and (in_run or w == "hundred"):
            scale = _SCALES[w]
            if scale == 100:
                current = max(current, 1) * 100
            else:
                total, current = total + max(current, 1) * scale, 0
        elif w == "and" and in_run:
            continue
        else:
            if in_run:
                out.append(str(total + current))
            total = current = 0
            in_run = False
            if w in _ORDINALS:
                out.append(f"#{_ORDINALS[w]}")
            continue
        in_run = True
    return out


def _digit_numbers(text: str) -> list[str]:
    out = []
    for m in _NUM_RE.finditer(text):
        raw = m.group(0)
        if m.group(1):
            out.append("#" + raw[: -2].replace(",", ""))
        else:
            out.append(raw.replace(",", ""))
    return out


class SemanticGuard:
    """Checks a semantic candidate against the query with the rules in the module docstring."""

    def __init__(self, gazetteer: Iterable[str] = ()):
        phrases = [tuple(g.split()) for g in gazetteer if g.strip()]
        self._phrases = frozenset(phrases)
        self._max_phrase = max((len(p) for p in phrases), default=0)

    @classmethod
    def default(cls) -> SemanticGuard:
        """A guard with the packaged gazetteer (services/cache/data/gazetteer.txt)."""
        return cls(_load_gazetteer(GAZETTEER_PATH))

    def features(self, text: str) -> TextFeatures:
        """Extracts words, negation count, numbers and entities of one text."""
        tokens = [(m.group(0), m.start()) for m in _WORD_RE.finditer(text)]
        words = [_norm(t) for t, _ in tokens]
        negations = sum(w in NEGATION_CUES or t.lower().replace("’", "'").endswith("n't")
                        for (t, _), w in zip(tokens, words))
        numbers = sorted(_digit_numbers(text) + _number_words(words))
        entities = set(self._gazetteer_hits(words))
        prev_end = 0
        for i, (tok, start) in enumerate(tokens):
            initial = i == 0 or bool(_SENTENCE_END_RE.search(text, prev_end, start))
            prev_end = start + len(tok)
            if _is_entity_like(tok, initial) and words[i] not in COMMON:
                entities.add(words[i])
        return TextFeatures(frozenset(words), negations, tuple(numbers), frozenset(entities),
                            _arrows(words))

    def _gazetteer_hits(self, words: list[str]) -> Iterable[str]:
        for i in range(len(words)):
            for n in range(min(self._max_phrase, len(words) - i), 0, -1):
                if tuple(words[i : i + n]) in self._phrases:
                    yield from words[i : i + n]
                    break

    def check(self, query: str, candidate: str) -> Verdict:
        """Whether `candidate` (a stored query) may answer `query`. Symmetric."""
        return self.compare(self.features(query), self.features(candidate))

    def compare(self, a: TextFeatures, b: TextFeatures) -> Verdict:
        """Applies the rules to two texts' features, in order; the first failure is returned."""
        if a.negations != b.negations:
            return Verdict(False, "negation", f"negation cues {a.negations} vs {b.negations}")
        pair = _negated_pair(a.words, b.words) or _negated_pair(b.words, a.words)
        if pair:
            return Verdict(False, "negation", f"negated form {pair[0]!r} vs {pair[1]!r}")
        if a.numbers != b.numbers:
            return Verdict(False, "number", f"numbers {list(a.numbers)} vs {list(b.numbers)}")
        missing = _missing_entities(a.entities, b.words) | _missing_entities(b.entities, a.words)
        if missing:
            return Verdict(False, "entity", f"entities not in both: {sorted(missing)}")
        for x, y in OPPOSITES:
            if (x in a.words and y in b.words or y in a.words and x in b.words) and not (
                x in a.words and x in b.words or y in a.words and y in b.words
            ):
                return Verdict(False, "opposite", f"opposites {x!r} / {y!r}")
        flipped = next(((x, y) for x, y in a.arrows if (y, x) in b.arrows), None)
        if flipped:
            return Verdict(False, "direction", f"{flipped[0]!r} -> {flipped[1]!r} reversed")
        return PASS


def _is_entity_like(token: str, sentence_initial: bool) -> bool:
    if _ORDINAL_RE.fullmatch(token):  # "3rd" is a number, compared by the number rule
        return False
    if any(c.isalpha() for c in token) and any(c.isdigit() for c in token):
        return True
    if any(c.isupper() for c in token[1:]):
        return True
    return token[0].isupper() and not sentence_initial


def _negated_pair(words: frozenset[str], other: frozenset[str]) -> tuple[str, str] | None:
    for w in words - other:
        for p in _NEGATION_PREFIXES:
            base = w[len(p):]
            if w.startswith(p) and len(base) >= 3 and base in other:
                return w, base
    return None


def _arrows(words: list[str]) -> frozenset[tuple[str, str]]:
    """Directed (source, target) word pairs around to/into/onto/from, skipping determiners."""
    out = set()
    for i, w in enumerate(words):
        if w not in _DIRECTIONAL:
            continue
        left = next((x for x in reversed(words[:i]) if x not in _DETERMINERS), None)
        right = next((x for x in words[i + 1 :] if x not in _DETERMINERS), None)
        if left and right:
            out.add((right, left) if w == "from" else (left, right))
    return frozenset(out)


def _missing_entities(entities: frozenset[str], words: frozenset[str]) -> set[str]:
    # Tolerate a plural/singular difference ("Mondays" / "Monday").
    return {e for e in entities if e not in words and e + "s" not in words
            and not (e.endswith("s") and e[:-1] in words)}


@lru_cache(maxsize=4)
def _load_gazetteer(path: Path) -> tuple[str, ...]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(ln.strip().lower() for ln in lines if ln.strip() and not ln.startswith("#"))
