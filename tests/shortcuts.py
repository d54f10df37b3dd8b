"""Options-only solvers: they see a multiple-choice record's options and nothing else (not the
question, not the events). On honest data none of them beats chance (1 in 4); one that does has
found a tell in how the distractors were built. Used by tests/test_synthesize.py and
bench/bench_shortcuts.py."""
import difflib
import itertools
import random
import re

LETTERS = "ABCDEFGH"


def option_texts(record):
    return [o.split(". ", 1)[1] if o[1:3] == ". " else o for o in record["options"]]


def similarity(a, b):
    return difflib.SequenceMatcher(None, a.lower().split(), b.lower().split()).ratio()


def most_similar(options):
    return [sum(similarity(o, p) for p in options if p is not o) for o in options]


def least_similar(options):
    return [-s for s in most_similar(options)]


def numbers(text):
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]


def middle_value(options):
    """The option whose numbers sit in the middle of the others' (their rank is closest to the centre)."""
    keys = [tuple(numbers(o)) for o in options]
    if not all(keys):
        return [0.0] * len(options)
    order = sorted(range(len(options)), key=lambda i: keys[i])
    centre = (len(options) - 1) / 2
    return [-abs(order.index(i) - centre) for i in range(len(options))]


def neighbour_richest(options):
    """The option with the most others at the smallest gap between any two options' numbers."""
    keys = [numbers(o) for o in options]
    if not all(keys):
        return [0.0] * len(options)
    first = [k[0] for k in keys]
    gaps = [abs(a - b) for a, b in itertools.combinations(first, 2) if a != b]
    if not gaps:
        return [0.0] * len(options)
    smallest = min(gaps)
    return [sum(abs(first[i] - first[j]) <= smallest + 1e-9 for j in range(len(options)) if j != i) for i in range(len(options))]


def one_swap_away(options):
    """The option with the most others one adjacent swap away (orderings of labelled items)."""
    sequences = [re.findall(r"\(([a-z])\)", o) for o in options]
    if not all(len(s) >= 2 for s in sequences):
        return [0.0] * len(options)
    def adjacent_swap(a, b):
        diff = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
        return len(a) == len(b) and len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    return [sum(adjacent_swap(s, t) for t in sequences if t is not s) for s in sequences]


def longest(options):
    return [len(o) for o in options]


def shortest(options):
    return [-len(o) for o in options]


def most_shared_words(options):
    """The option whose words appear most in the other options (the 'centre' of the set)."""
    words = [set(re.findall(r"[a-z0-9.]+", o.lower())) for o in options]
    return [sum(len(w & v) for v in words if v is not w) for w in words]


SOLVERS = {"most_similar": most_similar, "least_similar": least_similar, "middle_value": middle_value,
           "neighbour_richest": neighbour_richest, "one_swap_away": one_swap_away, "longest": longest,
           "shortest": shortest, "most_shared_words": most_shared_words}


def solve(solver, record, rng):
    """The letter the solver picks: its best-scoring option, ties broken at random."""
    options = option_texts(record)
    scores = SOLVERS[solver](options)
    best = max(scores)
    return LETTERS[rng.choice([i for i, s in enumerate(scores) if s == best])]


def accuracy_by_family(records, seed=0):
    """{family: {solver: (correct, total)}} over multiple-choice records."""
    rng = random.Random(seed)
    table = {}
    for record in records:
        row = table.setdefault(record["task"], {s: [0, 0] for s in SOLVERS})
        for solver in SOLVERS:
            row[solver][0] += solve(solver, record, rng) == record["answer"]
            row[solver][1] += 1
    return table
