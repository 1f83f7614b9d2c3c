"""Synthetic Self-Instruct-style instructions for benchmarks and scale tests.

    .venv/bin/python -c "from bench.synthetic import make_synthetic_instructions as m; print(*m(20, 0), sep='\\n')"

`make_synthetic_instructions(n, seed)` returns `n` instructions built from task templates whose
slots are filled with compositional phrases (topics, people, goals, constraints), so that most of
them are mutually distinct under ROUGE-L, as in a deduplicated Self-Instruct pool. About
`DUPLICATE_RATE` of them are planted near-duplicates: an earlier instruction with one to three small
edits (a synonym, a dropped or inserted word, two words swapped, a polite prefix, different case or
punctuation). The same (n, seed) always gives the same list.
"""

from __future__ import annotations

import random

DUPLICATE_RATE = 0.15  # share of planted near-duplicates

# fmt: off
_MAKE = ["Write", "Compose", "Create", "Draft", "Generate", "Produce", "Come up with", "Design", "Prepare"]
_STYLE = [
    "short", "funny", "formal", "persuasive", "creative", "detailed", "concise", "friendly", "sad",
    "inspiring", "technical", "simple", "poetic", "dramatic", "casual", "professional", "heartfelt",
    "sarcastic", "mysterious", "optimistic", "critical", "whimsical", "balanced", "catchy", "vivid",
    "thoughtful", "playful", "serious", "gentle", "nostalgic", "urgent", "calm", "bold", "quirky",
]
_GENRE = [
    "poem", "story", "essay", "tweet", "headline", "slogan", "limerick", "haiku", "speech", "letter",
    "blog post", "product description", "riddle", "joke", "dialogue", "review", "paragraph",
    "song chorus", "advertisement", "newsletter intro", "toast", "cover letter", "movie pitch",
    "news report", "fable", "sonnet", "press release", "podcast intro", "travel guide", "menu",
]
_T_ADJ = [
    "ancient", "urban", "tiny", "forgotten", "electric", "floating", "underground", "haunted",
    "medieval", "futuristic", "tropical", "arctic", "digital", "wooden", "royal", "busy", "quiet",
    "abandoned", "secret", "giant", "local", "rural", "coastal", "vintage", "solar", "robotic",
    "musical", "invisible", "competitive", "endangered", "broken", "golden", "neglected", "crowded",
]
_T_NOUN = [
    "libraries", "bakeries", "lighthouses", "gardens", "trains", "bicycles", "volcanoes", "bees",
    "markets", "bridges", "castles", "glaciers", "forests", "museums", "satellites", "farms",
    "orchestras", "hospitals", "schools", "rivers", "deserts", "islands", "factories", "cities",
    "coral reefs", "telescopes", "subways", "vineyards", "stadiums", "parks", "harbors", "caves",
    "robots", "kitchens", "theaters", "airports", "bookstores", "mountains", "wolves", "owls",
    "submarines", "windmills", "greenhouses", "carnivals", "monasteries", "laboratories", "canals",
]
_T_PLACE = [
    "Japan", "Peru", "the Sahara", "Norway", "ancient Rome", "Mars", "the Arctic", "Brazil", "Kenya",
    "Iceland", "the Amazon", "Scotland", "Mongolia", "Egypt", "New Zealand", "Vietnam", "Chicago",
    "the Alps", "Lagos", "Istanbul", "the year 3000", "a small village", "the Middle Ages", "Antarctica",
]
_P_ADJ = [
    "busy", "retired", "shy", "curious", "nervous", "ambitious", "young", "elderly", "tired",
    "creative", "skeptical", "newly hired", "first year", "left handed", "colorblind", "bilingual",
]
_P_ROLE = [
    "nurse", "teacher", "student", "manager", "farmer", "designer", "programmer", "chef", "parent",
    "pilot", "librarian", "musician", "mechanic", "lawyer", "scientist", "firefighter", "writer",
    "accountant", "gardener", "photographer", "athlete", "dentist", "plumber", "barista", "architect",
]
_G_VERB = [
    "learn", "build", "fix", "organize", "start", "improve", "grow", "plan", "practice", "master",
    "write", "teach", "sell", "design", "save money for", "prepare for", "recover from", "host",
]
_G_OBJ = [
    "a podcast", "a vegetable garden", "basic Spanish", "a marathon", "a home budget",
    "a small online shop", "a job interview", "a novel", "a treehouse", "public speaking",
    "a chess opening", "a photography portfolio", "a family reunion", "a sourdough starter",
    "a mobile app", "a wedding speech", "a charity auction", "a camping trip", "a science fair project",
    "a guitar solo", "a career change", "a daily running habit", "a book club", "a knee injury",
]
_LABELS = [
    ("positive", "negative"), ("fact", "opinion"), ("formal", "informal"), ("spam", "not spam"),
    ("true", "false"), ("sarcastic", "sincere"), ("urgent", "not urgent"), ("safe", "unsafe"),
    ("question", "statement"), ("relevant", "irrelevant"), ("easy", "hard"), ("old", "new"),
]
_ITEMS = [
    "sentence", "paragraph", "tweet", "email", "product review", "news headline", "customer message",
    "movie plot", "recipe", "statement", "question", "text message", "poem", "job posting", "abstract",
]
_CONCEPTS = [
    "photosynthesis", "inflation", "recursion", "relativity", "compound interest", "blockchain",
    "natural selection", "the water cycle", "machine learning", "supply and demand", "gravity",
    "democracy", "vaccines", "the greenhouse effect", "binary search", "plate tectonics",
    "opportunity cost", "encryption", "the placebo effect", "neural networks", "tides", "entropy",
    "probability", "hash tables", "the immune system", "cloud computing", "game theory", "osmosis",
]
_LANGS = ["French", "Spanish", "German", "Japanese", "Italian", "Portuguese", "Korean", "Dutch", "Swahili"]
_ASPECTS = [
    "cost", "safety", "ease of use", "environmental impact", "speed", "popularity", "durability",
    "long term value", "history", "health benefits", "learning curve", "reliability", "comfort",
]
_PAIRS = [
    ("cats", "dogs"), ("Python", "JavaScript"), ("tea", "coffee"), ("trains", "planes"),
    ("renting", "buying"), ("books", "movies"), ("solar power", "wind power"), ("iOS", "Android"),
    ("running", "swimming"), ("email", "chat"), ("stocks", "bonds"), ("summer", "winter"),
    ("paper maps", "GPS"), ("vinyl", "streaming"), ("chess", "go"), ("cities", "suburbs"),
]
_FEATURES = [
    "main idea", "tone", "subject", "verb tense", "named entities", "logical fallacy", "audience",
    "grammatical errors", "key arguments", "author's intent", "most important word", "metaphors",
]
_NUMS = ["three", "five", "ten", "two", "four", "seven", "six", "eight"]
_MATH = [
    "the sum of all even numbers between {a} and {b}", "the greatest common divisor of {a} and {b}",
    "the area of a circle with radius {a}", "{a} percent of {b}", "the average of {a}, {b} and {c}",
    "the number of primes below {a}", "the least common multiple of {a} and {b}",
]
_RECIPIENTS = [
    "your landlord", "a customer", "your manager", "a professor", "a hotel", "your team",
    "a potential client", "the city council", "an old friend", "a job applicant", "a supplier",
]
_PURPOSES = [
    "asking for a deadline extension", "complaining about a late delivery", "declining a meeting",
    "requesting a refund", "announcing a product launch", "thanking them for their help",
    "reporting a broken heater", "following up after an interview", "inviting them to a workshop",
    "apologizing for a billing mistake", "asking for a letter of recommendation", "proposing a new schedule",
]
_CONSTRAINTS = [
    " in under 50 words", " in under 100 words", " for a general audience", " using only simple words",
    " in the style of Shakespeare", " with a surprising ending", " that rhymes", " in exactly three sentences",
    " as bullet points", " from the point of view of a pirate", " without using the letter e",
    " in a hopeful tone", " in the second person", " with a moral at the end", " as a numbered list",
    " in a single paragraph",
]
_CONTEXTS = [
    "As a travel agent,", "For my biology class,", "Imagine you are a museum guide.",
    "Pretend you are a pirate captain.", "For a company newsletter,", "Acting as a personal trainer,",
    "My team is launching an app next week.", "I run a small coffee shop downtown.", "For a podcast episode,",
    "Speaking as a park ranger,", "For a school assembly,", "As a customer support agent,",
]
_SYNONYMS = {
    "write": "compose", "compose": "write", "create": "make", "short": "brief", "funny": "humorous",
    "explain": "describe", "list": "name", "generate": "produce", "story": "tale", "detailed": "thorough",
    "give": "provide", "suggest": "propose", "simple": "easy", "ideas": "tips", "about": "on",
    "rewrite": "rephrase", "plan": "schedule", "compare": "contrast", "identify": "find",
}
_FILLERS = ["please", "briefly", "also", "really", "quickly", "carefully", "now", "some", "new"]
_PREFIXES = ["Please", "Can you", "I want you to", "Kindly", "Now"]
# fmt: on
CONTEXT_RATE = 0.12  # share of instructions with a context sentence before the task
CONSTRAINT_RATE = 0.3  # share with a constraint after it


def _topic(rng: random.Random) -> str:
    c = rng.choice
    k = rng.randrange(7)
    if k == 0:
        return f"{c(_T_ADJ)} {c(_T_NOUN)}"
    if k == 1:
        return f"the {c(_T_NOUN)} of {c(_T_PLACE)}"
    if k == 2:
        return f"{c(_T_ADJ)} {c(_T_NOUN)} in {c(_T_PLACE)}"
    if k == 3:
        return f"{c(_T_NOUN)} and {c(_T_ADJ)} {c(_T_NOUN)}"
    if k == 4:
        return f"how {c(_T_NOUN)} changed {c(_T_PLACE)}"
    if k == 5:
        return f"{c(_T_NOUN)} near {c(_T_ADJ)} {c(_T_NOUN)}"
    return c(_T_NOUN)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _person(rng: random.Random) -> str:
    role = rng.choice(_P_ROLE)
    who = _a(f"{rng.choice(_P_ADJ)} {role}" if rng.random() < 0.6 else role)
    return who + (f" from {rng.choice(_T_PLACE)}" if rng.random() < 0.2 else "")


def _goal(rng: random.Random) -> str:
    obj = rng.choice(_G_OBJ)
    if obj.startswith("a ") and rng.random() < 0.3:
        obj = _a(f"{rng.choice(_T_ADJ)} {obj[2:]}")
    return f"{rng.choice(_G_VERB)} {obj}"


def _p(rng: random.Random, *alternatives: str) -> str:
    """One of several phrasings of the fixed words of a template."""
    return rng.choice(alternatives)


# Templates with few free slots (arithmetic, myths, comparisons) collide under ROUGE-L more often.
_TEMPLATE_WEIGHTS = [1, 1, 0.7, 1, 1, 1, 1, 1, 0.5, 1, 0.25, 1, 0.7, 1, 0.5, 1]


def _core(rng: random.Random) -> str:
    """The task itself: one of many templates, each with paraphrased fixed words and free slots."""
    c, p = rng.choice, lambda *a: _p(rng, *a)
    k = rng.choices(range(16), weights=_TEMPLATE_WEIGHTS)[0]
    if k == 0:
        return (
            f"{c(_MAKE)} {p('a', 'one')} {c(_STYLE)} {c(_GENRE)} {p('about', 'on', 'describing', 'inspired by')}"
            f" {_topic(rng)} {p('for', 'aimed at', 'to share with')} {_person(rng)}"
        )
    if k == 1:
        return (
            f"{p('Explain', 'Describe', 'Teach', 'Clarify')} {c(_CONCEPTS)} to {_person(rng)}"
            f" {p('using', 'with the help of', 'by way of')} {_topic(rng)} {p('as an example', 'as a metaphor', '')}"
        )
    if k == 2:
        a, b = c(_LABELS)
        return (
            f"{p('Classify each', 'Label every', 'Sort each', 'Tag each')} {c(_ITEMS)} {p('about', 'on', 'mentioning')}"
            f" {_topic(rng)} {p('as', 'as either')} {a} or {b}"
        )
    if k == 3:
        return (
            f"{p('Translate', 'Render', 'Convert')} {p('this', 'the given', 'the following')} {c(_ITEMS)} into"
            f" {c(_LANGS)} for {_person(rng)} {p('and keep it', 'while staying', 'making it sound')} {c(_STYLE)}"
        )
    if k == 4:
        return (
            f"{p('Summarize', 'Condense', 'Recap', 'Boil down')} {p('the', 'this', 'a')} {c(_ITEMS)}"
            f" {p('on', 'about', 'covering')} {_topic(rng)} {p('in', 'into', 'using')} {c(_NUMS)} {c(_STYLE)} sentences"
        )
    if k == 5:
        return (
            f"{p('List', 'Brainstorm', 'Suggest', 'Name')} {c(_NUMS)} {c(_STYLE)}"
            f" {p('ideas', 'tips', 'ways', 'options')} for {_person(rng)}"
            f" who {p('wants', 'hopes', 'plans', 'needs')} to {_goal(rng)}"
        )
    if k == 6:
        return (
            f"{p('Rewrite', 'Rephrase', 'Edit', 'Revise')} {p('the', 'this', 'my')} {c(_ITEMS)} {p('about', 'on')}"
            f" {_topic(rng)} {p('so it sounds', 'to make it', 'so that it is')} {c(_STYLE)}"
        )
    if k == 7:
        return (
            f"{p('Suggest', 'Propose', 'Invent', 'Think of')} {c(_NUMS)} {p('names', 'titles', 'taglines')} for"
            f" {p('a', 'my', 'our')} {c(_STYLE)} {c(_GENRE)} {p('about', 'on', 'featuring')} {_topic(rng)}"
        )
    if k == 8:
        a, b = c(_PAIRS)
        return (
            f"{p('Compare', 'Contrast', 'Weigh')} {a} {p('with', 'and', 'against')} {b} for {_person(rng)},"
            f" {p('focusing on', 'in terms of', 'looking at')} {c(_ASPECTS)} and {c(_ASPECTS)}"
        )
    if k == 9:
        return (
            f"{p('Identify', 'Find', 'Point out', 'Describe')} the {c(_FEATURES)} {p('of', 'in')}"
            f" {p('this', 'the following', 'the given')} {c(_ITEMS)} {p('about', 'on')} {_topic(rng)}"
        )
    if k == 10:
        expr = c(_MATH).format(a=rng.randint(2, 999), b=rng.randint(2, 999), c=rng.randint(2, 99))
        return f"{p('Calculate', 'Compute', 'Work out', 'Find')} {expr} {p('', 'and show your work', 'step by step')}"
    if k == 11:
        return (
            f"{p('Create', 'Draft', 'Design', 'Outline')} a {c(_NUMS)} {p('week', 'day', 'month')}"
            f" {p('plan', 'schedule', 'roadmap')} {p('that helps', 'for', 'to help')} {_person(rng)} {_goal(rng)}"
        )
    if k == 12:
        return (
            f"{p('Write', 'Draft', 'Compose')} {p('an email', 'a short note', 'a message', 'a letter')} to"
            f" {c(_RECIPIENTS)} {c(_PURPOSES)} {p('about', 'regarding', 'concerning')} {_topic(rng)}"
        )
    if k == 13:
        return (
            f"{p('How can', 'In what ways can', 'What is the best way for')} {_person(rng)} {_goal(rng)}"
            f" {p('without giving up', 'while keeping', 'and still enjoy')} {_topic(rng)}?"
        )
    if k == 14:
        return (
            f"{p('What do most people get wrong about', 'What are common myths about', 'Why is it hard to grasp')}"
            f" {c(_CONCEPTS)} {p('and', 'in relation to', 'compared with')} {_topic(rng)} for {_person(rng)}?"
        )
    return (
        f"{p('Give', 'Tell', 'Share with', 'Offer')} {_person(rng)} {p('a', 'one', 'two')} {c(_STYLE)}"
        f" {p('facts', 'fact', 'stories', 'anecdotes')} about {_topic(rng)}"
    )


def _template(rng: random.Random) -> str:
    """One instruction: an optional context, the task, an optional constraint."""
    core = " ".join(_core(rng).split())
    context = rng.choice(_CONTEXTS) if rng.random() < CONTEXT_RATE else ""
    constraint = rng.choice(_CONSTRAINTS) if rng.random() < CONSTRAINT_RATE else ""
    end = "" if core.endswith("?") else constraint + "."
    text = f"{context} {core}{end}".strip()
    return text[0].upper() + text[1:]


def _mutate(text: str, rng: random.Random) -> str:
    """A near-duplicate of `text`: one to three small edits."""
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        i = rng.randrange(len(words))
        if op == 0:  # synonym
            bare = words[i].lower().strip(".,?")
            if bare in _SYNONYMS:
                words[i] = words[i].lower().replace(bare, _SYNONYMS[bare])
        elif op == 1 and len(words) > 5:  # drop a word
            del words[i]
        elif op == 2:  # insert a filler
            words.insert(i, rng.choice(_FILLERS))
        elif op == 3 and i + 1 < len(words):  # swap neighbours
            words[i], words[i + 1] = words[i + 1], words[i]
        elif op == 4:  # polite prefix
            words = rng.choice(_PREFIXES).split() + [words[0].lower()] + words[1:]
        else:  # case and punctuation only: the tokens do not change
            words[-1] = words[-1].rstrip(".?!") + rng.choice(["", ".", "!", " :)", "?"])
    return " ".join(words)


def make_synthetic_instructions(n: int, seed: int = 0) -> list[str]:
    """`n` instruction strings, about `DUPLICATE_RATE` of them near-duplicates of earlier ones."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < DUPLICATE_RATE:
            out.append(_mutate(rng.choice(out), rng))
        else:
            out.append(_template(rng))
    return out


def make_synthetic_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Records with `id`, `instruction`, `input`, `output` (for timing the `sift filter` command)."""
    rng = random.Random(seed + 1)
    return [
        {
            "id": f"syn-{i}",
            "instruction": inst,
            "input": "" if rng.random() < 0.6 else f"Example input number {i}.",
            "output": f"An example answer for task {i}.",
        }
        for i, inst in enumerate(make_synthetic_instructions(n, seed))
    ]
