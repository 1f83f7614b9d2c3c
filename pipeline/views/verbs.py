"""Root verb and direct object of an instruction, for the diversity chart of Self-Instruct's Figure 2.

    pairs, parser = parse_verbs(["Write a poem about the sea."])   # [("write", "poem")], "heuristic"

Two parsers behind one function:
- spaCy, when it is installed together with an English pipeline (`pip install spacy` and
  `python -m spacy download en_core_web_sm`, which fetches Explosion's own release): the root of
  the first sentence if it is a verb, and its `dobj`/`obj` child, both lemmatised. Self-Instruct
  used a constituency parser the same way.
- a heuristic otherwise (the default on machines that reach only PyPI, where no English pipeline
  is published by Explosion): instructions are nearly always imperatives, so the verb is the first
  word once politeness ("please", "can you") and an opening "Given ..., " clause are skipped, and
  the object is the first word after it that is not a determiner, pronoun, number or common
  adjective. It returns no verb for questions and statements ("What is ...", "The sentence ...")
  and no object when a clause follows the verb ("Explain how ..."). Expect it to agree with a
  real parser on plain imperatives and to miss the rest; the report names the parser it used.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

PARSERS = ("auto", "spacy", "heuristic")
SPACY_PIPELINES = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg")

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+|[^\sA-Za-z0-9]")
QUOTES = {'"', "'", "\u201c", "\u201d", "\u2018", "\u2019", "`"}
MAX_PHRASE = 4  # words of a noun phrase scanned for its head
POLITE = {"please", "kindly", "now", "then", "also", "just", "next", "first", "finally"}
ASK = {"can", "could", "would", "will"}  # "Can you write ..." -> write
ADDRESSEE = {"you", "u"}
OPENERS = {
    "given", "for", "in", "if", "using", "based", "from", "with", "according", "after", "when", "as", "on",
    "by", "without", "below", "here", "assuming", "considering", "to",
}
NOT_VERBS = {
    # question words, pronouns, determiners, auxiliaries, prepositions, conjunctions
    "what", "which", "who", "whom", "whose", "why", "how", "where", "when", "whether", "is", "are", "was",
    "were", "be", "am", "do", "does", "did", "has", "have", "had", "should", "shall", "may", "might",
    "must", "i", "you", "he", "she", "it", "we", "they", "my", "your", "our", "their", "his", "her", "its",
    "this", "that", "these", "those", "there", "here", "the", "a", "an", "some", "any", "all", "each",
    "every", "no", "not", "and", "or", "but", "so", "of", "at", "to", "in", "on", "for", "with", "by",
    "from", "about", "as", "if", "than", "many", "much", "most", "one", "two", "three", "yes", "hi",
    "hello", "dear",
}
SKIP_BEFORE_OBJECT = {
    "a", "an", "the", "some", "any", "this", "that", "these", "those", "my", "your", "our", "their", "his",
    "her", "its", "me", "us", "him", "them", "it", "one", "two", "three", "four", "five", "six", "seven",
    "eight", "nine", "ten", "few", "several", "many", "more", "all", "each", "every", "another", "other",
    "short", "brief", "long", "new", "good", "simple", "funny", "creative", "detailed", "possible", "main",
    "best", "different", "appropriate", "interesting", "catchy", "complete", "following", "given", "same",
    "random", "single", "specific", "suitable", "concise", "formal", "informal", "polite", "persuasive",
    "professional", "famous", "popular", "common", "unique", "original", "quick", "basic", "personal",
    "perfect", "great", "nice", "healthy", "little", "big", "small", "top", "first", "last", "next", "own",
    "such", "up", "out", "down", "back", "off", "below", "above", "largest", "smallest", "longest",
    "shortest", "biggest", "highest", "lowest", "fastest", "cheapest", "greatest", "earliest", "latest",
    "oldest", "youngest", "most", "least", "worst",
}
NOT_OBJECTS = {
    "to", "of", "about", "if", "whether", "how", "what", "why", "when", "where", "which", "who", "that",
    "in", "on", "for", "with", "by", "from", "into", "as", "at", "and", "or", "but", "is", "are", "be",
    "yourself", "between", "than", "so", "whatever", "whichever", "whoever", "like", "more", "not",
}


def _lemma_noun(word: str) -> str:
    """A crude singular: lists -> list, stories -> story; leaves -ss, -us, -is alone."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "as", "ous")):
        return word[:-1]
    return word


def _clause(words: list[str]) -> list[str]:
    """Drop politeness and an opening subordinate phrase ("Given a list, ...") up to its comma."""
    i = 0
    while i < len(words) and (words[i] in POLITE or words[i] == ","):
        i += 1
    if i + 1 < len(words) and words[i] in ASK and words[i + 1] in ADDRESSEE:
        i += 2
        while i < len(words) and words[i] in POLITE:
            i += 1
    rest = words[i:]
    if rest and rest[0] in OPENERS and "," in rest:
        return _clause(rest[rest.index(",") + 1 :])
    return rest


def heuristic_verb_object(text: str) -> tuple[str | None, str | None]:
    """(verb, object) of an imperative instruction, or (None, None) when it does not start with a verb."""
    sentence = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]
    words = _clause([w.lower() for w in _WORD.findall(sentence) if w not in QUOTES])
    if not words or not words[0].isalpha() or words[0] in NOT_VERBS or len(words[0]) < 2:
        return None, None
    verb = words[0]
    rest = words[1:]
    while rest and (rest[0] in SKIP_BEFORE_OBJECT or rest[0].isdigit()):
        rest = rest[1:]
    phrase: list[str] = []
    for w in rest[:MAX_PHRASE]:  # the head of the noun phrase is its last word before a boundary
        ends = (
            not w.replace("-", "").isalpha()
            or w in NOT_OBJECTS
            or w in NOT_VERBS
            or (len(w) > 6 and w.endswith("ly"))
        )  # an adverb: "Sort the numbers ascendingly"
        if ends or (phrase and w.endswith(("ing", "ed"))):  # a participle after the noun: "a story based on"
            break
        phrase.append(w)
    return verb, _lemma_noun(phrase[-1]) if phrase else None


def load_spacy() -> object | None:
    """An English spaCy pipeline with a parser, or None when spaCy or every pipeline is missing."""
    try:
        import spacy
    except ImportError:
        return None
    for name in SPACY_PIPELINES:
        try:
            nlp = spacy.load(name, disable=["ner"])
        except (OSError, ImportError, ValueError):
            continue
        if "parser" in nlp.pipe_names:
            return nlp
    return None


def _spacy_pairs(nlp: object, texts: list[str]) -> list[tuple[str | None, str | None]]:
    out: list[tuple[str | None, str | None]] = []
    for doc in nlp.pipe(texts, batch_size=256):  # type: ignore[attr-defined]
        sent = next(iter(doc.sents), None)
        root = sent.root if sent is not None else None
        if root is None or root.pos_ != "VERB":
            out.append((None, None))
            continue
        obj = next((c for c in root.children if c.dep_ in ("dobj", "obj")), None)
        out.append((root.lemma_.lower(), obj.lemma_.lower() if obj is not None else None))
    return out


Pair = tuple[str | None, str | None]


def parse_verbs(texts: Iterable[str], parser: str = "auto") -> tuple[list[Pair], str]:
    """(verb, object) for each text, and the name of the parser that produced them.

    `auto` uses spaCy when an English pipeline loads, else the heuristic; `spacy` insists on it.
    """
    if parser not in PARSERS:
        raise ValueError(f"parser must be one of {', '.join(PARSERS)}, got {parser!r}")
    texts = list(texts)
    nlp = load_spacy() if parser in ("auto", "spacy") else None
    if parser == "spacy" and nlp is None:
        raise ValueError(
            "parser 'spacy' asked for, but spaCy or its English pipeline is not installed "
            "(pip install spacy && python -m spacy download en_core_web_sm)"
        )
    if nlp is not None:
        meta = getattr(nlp, "meta", {}) or {}
        return _spacy_pairs(nlp, texts), f"spacy {meta.get('name', '?')} {meta.get('version', '')}".strip()
    return [heuristic_verb_object(t) for t in texts], "heuristic"


def top_verb_objects(
    pairs: Iterable[tuple[str | None, str | None]], *, verbs: int = 20, objects: int = 4
) -> list[tuple[str, int, list[tuple[str, int]]]]:
    """The most common verbs with their most common objects, as in Self-Instruct's Figure 2:
    [(verb, count of pairs with an object, [(object, count), ...]), ...]; verbs without an object
    are left out, like the paper's verb-object pairs."""
    by_verb: dict[str, Counter[str]] = {}
    for verb, obj in pairs:
        if verb and obj:
            by_verb.setdefault(verb, Counter())[obj] += 1
    ranked = sorted(by_verb.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:verbs]
    return [
        (v, sum(c.values()), sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:objects]) for v, c in ranked
    ]
