"""Stage 01: synthesize T3 temporal-reasoning tasks in pure text from image captions.

Each caption stands for one moment of an imagined video; a sample strings several
captions together in time order (a "video in words") and asks a temporal question
about it: order, attribute change, temporal referring, temporal grounding, restoring
a shuffled order, and Seq2Time-style position tasks. Training records are free-form
or multiple choice; validation records are always multiple choice, with balanced
answer letters and captions never seen in training.

Usage:
    python 01_synthesize.py --out runs/01 [--captions FILE ...] [--num-train 20000]
        [--num-val 1000] [--seed 0] [--tasks all] [--scales 1x 2x 4x 8x]

Writes OUT/t3_train.jsonl, OUT/t3_val.jsonl and OUT/stats.json.
"""
import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import re
import statistics
import sys
import tempfile
from contextlib import contextmanager

from tqdm import tqdm

TASKS = [
    "order",
    "attribute",
    "refer_begin_end",
    "refer_anchor",
    "refer_time2event",
    "refer_event2time",
    "grounding",
    "order_shuffle_phrase",
    "order_shuffle_prefix",
    "order_shuffle_sentence",
    "seq_index_grounding",
    "seq_indexed_caption",
    "seq_adjacent",
]
SCALES = {"1x": 1, "2x": 2, "4x": 4, "8x": 8}
EVENTS_PER_SCALE = (4, 5)  # a 1x sample has 4-5 events, an 8x one 32-40
NUM_OPTIONS = 4
LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--captions", nargs="+", default=[], metavar="FILE",
                   help="caption files: JSONL {id, caption}, a LLaVA-style JSON list (first gpt turn "
                        "is the caption) or COCO captions_*.json; default: built-in seeded captions")
    p.add_argument("--num-train", type=int, default=20000, help="training records (default 20000)")
    p.add_argument("--num-val", type=int, default=1000, help="multiple-choice validation records (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=["all"], help=f"task families, or 'all': {', '.join(TASKS)}")
    p.add_argument("--scales", nargs="+", default=list(SCALES), help="event-count scales (1x is about 4 events)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of captions held out for validation")
    p.add_argument("--mc-fraction", type=float, default=0.5, help="share of training records asked as multiple choice")
    p.add_argument("--positions", choices=["relative", "index"], default="relative",
                   help="how Seq2Time tasks write a position: relative i/L to 4 digits, or the image index")
    p.add_argument("--max-caption-words", type=int, default=40, help="longer captions are cut to their first sentence")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (output is the same for any number)")
    args = p.parse_args(argv)
    args.tasks = _split_list(args.tasks, TASKS, "task", p)
    args.scales = _split_list(args.scales, list(SCALES), "scale", p)
    if args.num_train < 0 or args.num_val < 0 or args.num_train + args.num_val == 0:
        p.error("--num-train and --num-val must be >= 0 and not both 0")
    if not 0 < args.val_fraction < 1:
        p.error("--val-fraction must be between 0 and 1")
    return args


def _split_list(values, allowed, what, parser):
    items = [v for value in values for v in value.split(",") if v]
    if items == ["all"]:
        return list(allowed)
    for item in items:
        if item not in allowed:
            parser.error(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------- captions in

def load_caption_file(path):
    """[(caption, source)] from JSONL {id, caption}, a JSON list of {id, caption}, a LLaVA conversation
    list (the first gpt turn is the caption) or COCO captions_*.json. `source` names what the caption
    describes (COCO's image_id, a record's image or id), so that captions of one image share a split."""
    text = read_text(path)
    if not text.strip():
        raise InputError(f"{path}: empty file, no captions")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        whole = None  # JSONL: several objects, each checked line by line below
    if isinstance(whole, list):
        captions = _list_captions(path, whole)
    elif isinstance(whole, dict) and "annotations" in whole:
        captions = _coco_captions(path, whole)
    elif isinstance(whole, dict) and ("images" in whole or "info" in whole):
        raise InputError(f"{path}: a JSON object without an 'annotations' list (expected COCO captions_*.json)")
    else:  # JSONL, or one JSON object on one line: checked as JSONL records
        captions = []
        for number, record in read_jsonl(path):
            caption = record.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise InputError(f"{path}:{number}: record has no non-empty 'caption' string")
            captions.append((caption, _source(record, f"{path}:{number}")))
    if not captions:
        raise InputError(f"{path}: no captions found")
    return captions


def _source(record, fallback):
    for key in ("image", "image_id", "id"):
        if isinstance(record.get(key), (str, int)) and not isinstance(record.get(key), bool):
            return f"{key}:{record[key]}"
    return fallback


def _list_captions(path, data):
    """A JSON list of {id, caption} records, or of LLaVA conversations whose first gpt turn is the caption."""
    captions = []
    for i, record in enumerate(data):
        if isinstance(record, dict) and isinstance(record.get("caption"), str) and record["caption"].strip():
            captions.append((record["caption"], _source(record, f"{path}:{i}")))
            continue
        turns = record.get("conversations") if isinstance(record, dict) else None
        gpt = [t.get("value") for t in turns or [] if isinstance(t, dict) and t.get("from") == "gpt"]
        if not gpt or not isinstance(gpt[0], str) or not gpt[0].strip():
            raise InputError(f"{path}: record {i} has neither a 'caption' nor a gpt turn with the caption (LLaVA conversation form)")
        captions.append((gpt[0], _source(record, f"{path}:{i}")))
    return captions


def _coco_captions(path, data):
    annotations = data.get("annotations")
    if not isinstance(annotations, list):
        raise InputError(f"{path}: a JSON object without an 'annotations' list (expected COCO captions_*.json)")
    captions = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise InputError(f"{path}: annotation {i} has no 'caption' string")
        captions.append((ann["caption"], f"image_id:{ann['image_id']}" if "image_id" in ann else f"{path}:{i}"))
    return captions


ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Prof", "Mt", "vs", "etc", "e.g", "i.e", "approx", "No")


def first_sentence(text):
    """Text up to the first sentence end that is not an abbreviation's full stop ("Mr.", "St.", "e.g.")."""
    for m in re.finditer(r"[.!?](?=\s+\S)", text):
        word = re.search(r"([A-Za-z.]+)$", text[:m.start()])
        if m.group(0) == "." and word and word.group(1).rstrip(".") in ABBREVIATIONS:
            continue
        return text[:m.end()]
    return text


def clean_caption(text, max_words):
    """One line, no image tokens, ending with a full stop. A caption over max_words words keeps its
    first sentence (long LLaVA-ReCap paragraphs describe one image in many), and that sentence is
    cut at max_words words if it is still longer. Junk ("!", "Ok.", "A.") comes back empty."""
    text = re.sub(r"<image>|<video>", " ", text)
    text = " ".join(text.split())
    if len(text.split()) > max_words:
        text = " ".join(first_sentence(text).split()[:max_words])
    text = text.rstrip(" ,;:")
    if text and text[-1] not in ".!?":
        text += "."
    if len(re.findall(r"[A-Za-z]+", text)) < 3:
        return ""
    return text[:1].upper() + text[1:]


# Attribute words an attribute-change task can swap; a caption with one of them
# yields a scene whose colour / size / state / count changes over time.
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "grey", "pink"]
SIZES = ["tiny", "small", "large", "huge"]
STATE_PAIRS = [("open", "closed"), ("empty", "full"), ("wet", "dry"), ("clean", "dirty")]
COUNTS = ["two", "three", "four", "five", "six"]
ASPECT_NAMES = {"colour": "colour", "size": "size", "state": "state", "count": "number"}
ATTRIBUTE_WORDS = {w: "colour" for w in COLOURS} | {w: "size" for w in SIZES} | \
    {w: "state" for pair in STATE_PAIRS for w in pair} | {w: "count" for w in COUNTS}
ATTRIBUTE_RE = re.compile(r"\b(" + "|".join(sorted(ATTRIBUTE_WORDS, key=len, reverse=True)) + r")\b", re.IGNORECASE)

SUBJECTS = [  # (singular, plural, kind, colourable, state pair or None)
    ("dog", "dogs", "animal", True, None), ("cat", "cats", "animal", True, None),
    ("horse", "horses", "animal", True, None), ("bird", "birds", "animal", True, None),
    ("rabbit", "rabbits", "animal", True, None), ("duck", "ducks", "animal", True, None),
    ("man", "men", "person", False, None), ("woman", "women", "person", False, None),
    ("child", "children", "person", False, None), ("cyclist", "cyclists", "person", False, None),
    ("chef", "chefs", "person", False, None), ("runner", "runners", "person", False, None),
    ("car", "cars", "vehicle", True, None), ("bus", "buses", "vehicle", True, None),
    ("truck", "trucks", "vehicle", True, None), ("boat", "boats", "boat", True, None),
    ("kite", "kites", "flying", True, None), ("balloon", "balloons", "flying", True, None),
    ("box", "boxes", "object", True, ("open", "closed")), ("umbrella", "umbrellas", "object", True, ("open", "closed")),
    ("bucket", "buckets", "object", True, ("empty", "full")), ("cup", "cups", "object", True, ("empty", "full")),
    ("towel", "towels", "object", True, ("wet", "dry")), ("shirt", "shirts", "object", True, ("clean", "dirty")),
    ("window", "windows", "object", False, ("open", "closed")), ("ball", "balls", "object", True, None),
]
ACTIONS = {
    "animal": ["runs across", "sleeps in", "walks through", "rests near a fence in", "plays in", "sits quietly in"],
    "person": ["walks through", "stands in", "reads a book in", "waves from", "takes photos in", "jogs along"],
    "vehicle": ["drives along", "is parked in", "turns a corner in", "waits at a light in", "slows down in"],
    "boat": ["floats on", "drifts across", "is tied up at", "sails past"],
    "flying": ["flies above", "drifts over", "rises above", "hangs in the air over"],
    "object": ["lies in", "sits on a table in", "is left in", "stands by the wall in"],
}
PLACES = {
    "animal": ["a snowy park", "a grassy field", "a farm yard", "a sunny garden", "a forest path", "a quiet meadow"],
    "person": ["a busy market", "a city square", "a train station", "a library", "a quiet beach", "a crowded mall"],
    "vehicle": ["a busy street", "a parking lot", "a mountain road", "a narrow alley", "a gas station"],
    "boat": ["a calm lake", "a harbour", "a river bend", "a wooden pier"],
    "flying": ["a quiet beach", "a grassy hill", "a city square", "a wheat field"],
    "object": ["a kitchen", "a garage", "a classroom", "a hotel room", "a garden shed", "an office"],
}
CLOTHES = ["coat", "hat", "jacket", "scarf", "dress", "helmet"]


def builtin_captions(seed, count):
    """Varied, seeded captions built from subjects, attributes, actions and places."""
    rng = random.Random(f"captions:{seed}")
    captions = dict()
    while len(captions) < count:
        captions[_builtin_caption(rng)] = None
    return list(captions)


def _builtin_caption(rng):
    singular, plural, kind, colourable, states = rng.choice(SUBJECTS)
    words = []
    many = rng.random() < 0.25
    if states and rng.random() < 0.5:
        words.append(rng.choice(states))
    if kind != "person" and rng.random() < 0.4:
        words.insert(0, rng.choice(SIZES))
    if colourable and rng.random() < 0.7:
        words.append(rng.choice(COLOURS))
    words.append(plural if many else singular)
    action = rng.choice(ACTIONS[kind])
    if many:
        verb, _, rest = action.partition(" ")
        action = ("are" if verb == "is" else "lie" if verb == "lies" else verb[:-1]) + " " + rest
    subject = " ".join(words)
    if kind == "person" and rng.random() < 0.6:
        colour = rng.choice(COLOURS)
        subject += f" in {'an' if colour[0] in 'aeiou' else 'a'} {colour} {rng.choice(CLOTHES)}"
    determiner = rng.choice(COUNTS) if many else ("an" if subject[0] in "aeiou" else "a")
    return clean_caption(f"{determiner} {subject} {action} {rng.choice(PLACES[kind])}", 1000)


def attribute_key(caption):
    """A caption with its attribute words (and the a/an before them) masked."""
    return re.sub(r"\ban #", "a #", ATTRIBUTE_RE.sub("#", caption.lower()))


def near_duplicate_key(caption):
    """What is left of a caption without case, spacing, punctuation and attribute words: "A cat." and
    "a  cat ." and "A black cat." share it."""
    return " ".join(re.findall(r"[a-z0-9#]+", attribute_key(caption)))


def split_captions(captions, val_fraction):
    """Disjoint train/val pools from [(caption, source)]. Captions of one source (a COCO image, a
    record) and captions that are near-duplicates of each other (same key) are joined into one
    group, and a group goes to one split by a hash of its first caption's key: no validation
    caption, nor a variant of it, nor another caption of its image, is seen in training."""
    parent = {}
    def root(node):
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node
    for caption, source in captions:
        a, b = root(("source", source)), root(("key", near_duplicate_key(caption)))
        if a != b:
            parent[max(a, b)] = min(a, b)
    train, val = [], []
    for caption, source in captions:
        group = root(("key", near_duplicate_key(caption)))
        bucket = int.from_bytes(hashlib.sha256(repr(group).encode()).digest()[:8], "big") / 2**64
        (val if bucket < val_fraction else train).append(caption)
    return train, val


# ---------------------------------------------------------------- task builders
# Each builder gets (rng, pool, n) and returns a Sample: the frame lines, the question,
# the correct answer text and at least three plausible wrong answers from the same sample.

class Sample:
    def __init__(self, header, frames, question, answer, distractors):
        self.header, self.frames, self.question = header, frames, question
        self.answer = answer
        self.distractors = [d for d in dict.fromkeys(distractors) if d != answer]


HEADERS = [
    "The following describes a video, one frame per line, in the order the frames appear.",
    "Here is a video told in words. Each line is one frame, in time order.",
    "You are watching a video. Its frames are described below from first to last.",
]
TIMED_HEADER = " Each line starts with the time of the frame in seconds."
SEQ_HEADER = ("The following images form a sequence that plays like a video. Each line gives an image's "
              "{what} and a description of it.")


def frame_lines(events):
    return [f"Frame {i}: {e}" for i, e in enumerate(events, 1)]


def timed_lines(events, step):
    return [f"{fmt_time(i * step)}: {e}" for i, e in enumerate(events)]


def fmt_time(seconds):
    return f"{seconds:.1f}s"


def quote(caption):
    return '"' + caption.rstrip(".") + '"'


def window_pick(rng, count):
    """(asked index, the NUM_OPTIONS consecutive indices shown as options) over range(count): the
    answer's rank inside the window is uniform and the window's start independent of it, so the
    options (neighbouring times or positions, the most confusable ones) never give the answer away
    by where it sits among them, as "the one in the middle" would."""
    start = rng.randrange(count - NUM_OPTIONS + 1)
    window = list(range(start, start + NUM_OPTIONS))
    return window[rng.randrange(NUM_OPTIONS)], window


def pick_distractors(rng, candidates, k=NUM_OPTIONS - 1, prefer=()):
    """Preferred (most confusable) candidates first, then random others."""
    prefer = [c for c in prefer if c in candidates]
    rest = [c for c in candidates if c not in prefer]
    rng.shuffle(rest)
    return (prefer + rest)[:k]


def build_order(rng, pool, n):
    events = rng.sample(pool, n)
    header = rng.choice(HEADERS)
    kind = rng.choice(["first", "last", "before", "after", "three"])
    if kind == "three":
        chosen = sorted(rng.sample(range(n), 3))
        shown = rng.sample(chosen, 3)  # any order, the right one included: no answer is ruled out by the listing
        labels = {idx: f"({'abc'[i]})" for i, idx in enumerate(shown)}
        listing = " ".join(f"{labels[idx]} {events[idx]}" for idx in shown)
        question = f"In what order do these events happen? {listing}"
        perms = [", ".join(labels[i] for i in p) for p in itertools.permutations(chosen)]
        return Sample(header, frame_lines(events), question, perms[0], rng.sample(perms[1:], NUM_OPTIONS - 1))
    if kind in ("before", "after"):
        j = rng.randrange(1, n - 1) if n > 2 else 1
        earlier, later = events[:j], events[j + 1:]
        right, wrong = (earlier, later) if kind == "before" else (later, earlier)
        if right and len(wrong) >= NUM_OPTIONS - 1:
            question = f"Which of these events happens {kind} {quote(events[j])}?"
            return Sample(header, frame_lines(events), question, rng.choice(right), pick_distractors(rng, wrong))
        kind = "first" if kind == "before" else "last"
    answer = events[0] if kind == "first" else events[-1]
    question = f"Which event happens {kind} in the video?"
    others = [e for e in events if e != answer]
    near = events[1:2] if kind == "first" else events[-2:-1]
    return Sample(header, frame_lines(events), question, answer, pick_distractors(rng, others, prefer=near))


# Words that end a noun phrase (or are no noun): the noun an attribute question names must be the
# one word between the attribute and one of these, so "a red fire hydrant", "a red shiny car" or
# "a black and white photo" give no question rather than "the colour of the fire / shiny / and".
FUNCTION_WORDS = set("""a an the and or but of with without in on at to from by for into onto over under near
    next behind beside between through across along around against up down off out about above below after
    before during while as that which who whose is are was were be been being has have had its their his her
    this these those some very there here it they he she them""".split())
VERB_WORDS = set("""is are sits sit stands stand runs run walks walk lies lie rests rest plays play reads waves
    takes take jogs drives drive turns turn waits wait slows floats float drifts drift sails sail flies fly
    rises rise hangs hang looks look holds hold rides ride eats eat sleeps sleep waiting parked sitting
    standing""".split())


def find_attribute(caption):
    """(match, category, noun) for the first attribute word of a caption that can be swapped safely:
    not part of "black and white", and followed (after any other attribute words) by a single noun
    that ends its phrase; None when no attribute qualifies."""
    tokens = [(m.group(0), m.start(), m.end()) for m in re.finditer(r"[A-Za-z]+|[^\sA-Za-z]", caption)]
    words = [t[0].lower() for t in tokens]
    for match in ATTRIBUTE_RE.finditer(caption):
        i = next(k for k, t in enumerate(tokens) if t[1] == match.start())
        paired = (i >= 2 and words[i - 1] in ("and", "or") and words[i - 2] in ATTRIBUTE_WORDS) or \
                 (i + 2 < len(words) and words[i + 1] in ("and", "or") and words[i + 2] in ATTRIBUTE_WORDS)
        j = i + 1
        while j < len(words) and words[j] in ATTRIBUTE_WORDS:
            j += 1
        noun = words[j] if j < len(words) else ""
        after = words[j + 1] if j + 1 < len(words) else "."
        ends_phrase = not after.isalpha() or after in FUNCTION_WORDS or after in VERB_WORDS or \
            after.endswith(("ing", "ed")) or (after.endswith("s") and not noun.endswith("s"))
        if (not paired and noun.isalpha() and len(noun) > 2 and noun not in FUNCTION_WORDS | VERB_WORDS
                and not noun.endswith(("ing", "ly")) and ends_phrase):
            return match, ATTRIBUTE_WORDS[match.group(1).lower()], noun
    return None


def swap_attribute(caption, match, value):
    """The caption with its attribute word replaced, an "a"/"an" before it agreeing with the new word."""
    before, after = caption[:match.start()], caption[match.end():]
    article = "an" if value[0] in "aeiou" else "a"
    before = re.sub(r"\b(a|an)(\s+)$", lambda m: (article.capitalize() if m.group(1)[0].isupper() else article) + m.group(2),
                    before, flags=re.IGNORECASE)
    word = value.capitalize() if match.group(1)[0].isupper() else value
    return before + word + after


def attribute_values(category, current):
    if category == "state":
        return list(next(p for p in STATE_PAIRS if current in p))
    return {"colour": COLOURS, "size": SIZES, "count": COUNTS}[category]


def describe_change(states):
    if len(set(states)) == 1:
        return f"It stays {states[0]}."
    text = f"It changes from {states[0]} to {states[1]}"
    return text + "".join(f", then to {s}" for s in states[2:]) + "."


def trajectories(values):
    """Every way the attribute can go over the video with these values: stay at one, change once,
    or (with three values) change twice, each value at most once."""
    return [list(p) for k in range(1, min(3, len(values)) + 1) for p in itertools.permutations(values, k)]


def build_attribute(rng, pool, n, attribute_pool):
    """The subject's attribute follows one of the possible trajectories over a value set (the
    caption's own value and two others; a state's two values), drawn uniformly; the distractors are
    three other trajectories, drawn uniformly from the rest. So the options are a uniform draw
    around the answer: no word or form makes the answer stand out among them."""
    caption = rng.choice(attribute_pool)
    match, category, noun = find_attribute(caption)
    current = match.group(1).lower()
    values = attribute_values(category, current)
    if len(values) > 2:
        values = [current] + rng.sample([v for v in values if v != current], 2)
    candidates = trajectories(values)
    states = rng.choice(candidates)
    k = len(states)
    subject_frames = max(k, n // 2)
    # split the subject's appearances into k consecutive runs, one per state
    cuts = sorted(rng.sample(range(1, subject_frames), k - 1))
    runs = [b - a for a, b in zip([0] + cuts, cuts + [subject_frames])]
    subject = [swap_attribute(caption, match, s) for s, r in zip(states, runs) for _ in range(r)]
    key, others = attribute_key(caption), []
    for _ in range(50 * n):  # no other frame may look like the subject; bounded, for captions that barely vary
        if len(others) == n - subject_frames:
            break
        other = rng.choice(pool)
        if other not in others and attribute_key(other) != key:
            others.append(other)
    else:
        return None
    slots = sorted(rng.sample(range(n), subject_frames))
    events, it_subject, it_other = [], iter(subject), iter(others)
    for i in range(n):
        events.append(next(it_subject) if i in slots else next(it_other))
    subject = noun if category == "count" else f"the {noun}"
    question = f"How does the {ASPECT_NAMES[category]} of {subject} change over the video?"
    wrong = rng.sample([describe_change(c) for c in candidates if c != states], NUM_OPTIONS - 1)
    return Sample(rng.choice(HEADERS), frame_lines(events), question, describe_change(states), wrong)


def build_refer_begin_end(rng, pool, n):
    events = rng.sample(pool, n)
    where = rng.choice(["beginning", "end"] + (["middle"] if n % 2 else []))
    index = {"beginning": 0, "end": n - 1, "middle": n // 2}[where]
    question = f"What happens at the {where} of the video?"
    others = [e for i, e in enumerate(events) if i != index]
    near = [events[i] for i in (index - 1, index + 1) if 0 <= i < n]
    return Sample(rng.choice(HEADERS), frame_lines(events), question, events[index], pick_distractors(rng, others, prefer=near[:1]))


def build_refer_anchor(rng, pool, n):
    events = rng.sample(pool, n)
    anchor = rng.randrange(1, n - 1)
    direction = rng.choice(["before", "after"])
    target = anchor - 1 if direction == "before" else anchor + 1
    mirror = anchor + 1 if direction == "before" else anchor - 1
    question = f"What happens right {direction} {quote(events[anchor])}?"
    others = [e for i, e in enumerate(events) if i not in (target, anchor)]
    return Sample(rng.choice(HEADERS), frame_lines(events), question, events[target], pick_distractors(rng, others, prefer=[events[mirror]]))


def build_refer_time(rng, pool, n, to_event):
    events = rng.sample(pool, n)
    step = rng.choice([1.0, 2.0, 3.0, 5.0])
    header = rng.choice(HEADERS) + TIMED_HEADER
    index = rng.randrange(n)
    near = [i for i in (index - 1, index + 1) if 0 <= i < n]
    others = [i for i in range(n) if i != index]
    if to_event:
        question = f"What is happening at {fmt_time(index * step)}?"
        wrong = pick_distractors(rng, [events[i] for i in others], prefer=[events[i] for i in near])
        return Sample(header, timed_lines(events, step), question, events[index], wrong)
    index, window = window_pick(rng, n)
    question = f"At what time does {quote(events[index])} happen?"
    at = [f"At {fmt_time(i * step)}." for i in range(n)]
    return Sample(header, timed_lines(events, step), question, at[index], [at[i] for i in window if i != index])


def build_grounding(rng, pool, n):
    """Events last 2-3 frames each; the answer is the span of one event's frames."""
    events = rng.sample(pool, n)
    step = rng.choice([0.5, 1.0, 2.0])
    spans, frames = [], []
    for event in events:
        start = len(frames)
        frames += [event] * rng.choice([2, 3])
        spans.append(f"From {fmt_time(start * step)} to {fmt_time((len(frames) - 1) * step)}.")
    index, window = window_pick(rng, n)
    question = f"During which time span does {quote(events[index])} happen?"
    wrong = [spans[i] for i in window if i != index]
    return Sample(rng.choice(HEADERS) + TIMED_HEADER, timed_lines(frames, step), question, spans[index], wrong)


def shuffle_item(caption, level, words_used):
    """The text shown for one event: the whole sentence, its first words, or a phrase from inside."""
    words = caption.rstrip(".").split()
    if level == "sentence" or len(words) <= words_used:
        return caption.rstrip(".")
    if level == "prefix":
        return " ".join(words[:words_used]) + " ..."
    start = min(len(words) - words_used, max(1, len(words) // 3))
    return "... " + " ".join(words[start:start + words_used]) + " ..."


def build_order_shuffle(rng, pool, n, level):
    events = rng.sample(pool, n)
    k = min(n, 8)
    chosen = sorted(rng.sample(range(n), k))
    for words_used in (3, 4, 5, 7, 10, 1000):  # shortest items that each point at exactly one frame
        items = [shuffle_item(events[i], level, words_used) for i in chosen]
        if all(sum(item.strip(". ") in e for e in events) == 1 for item in items):
            break
    else:
        return None
    shown = rng.sample(range(k), k)  # any order, the right one included
    labels = {pos: f"({LETTERS[i].lower()})" for i, pos in enumerate(shown)}
    listing = "\n".join(f"{labels[pos]} {items[pos]}" for pos in shown)
    what = {"sentence": "events", "prefix": "beginnings of event descriptions", "phrase": "phrases from event descriptions"}[level]
    question = f"These {what} are listed in some order. Put them in the order they happen in the video.\n{listing}"
    orders = [", ".join(labels[p] for p in order) for order in swap_square(rng, k)]
    return Sample(rng.choice(HEADERS), frame_lines(events), question, orders[0], orders[1:])


def swap_square(rng, k):
    """Four orders of range(k), the true one first: the corners of a square whose sides are two
    disjoint swaps of neighbouring items. Each order is one such swap from two others (the most
    confusable wrong orders) and two swaps from the third, the truth included, so no order stands
    out in the set (a star of single swaps around the truth would point at it)."""
    a, b = rng.sample([(i, j) for i in range(k - 1) for j in range(i + 2, k - 1)], 1)[0]
    def swapped(order, at):
        order = order[:]
        order[at], order[at + 1] = order[at + 1], order[at]
        return order
    truth = list(range(k))
    return [truth, swapped(truth, a), swapped(truth, b), swapped(swapped(truth, a), b)]


def build_seq(rng, pool, n, kind, positions):
    events = rng.sample(pool, n)
    if positions == "relative":
        names = [f"{i / n:.4f}" for i in range(n)]
        header = SEQ_HEADER.format(what="relative position (0 is the start, 1 the end)")
        noun = "relative position"
    else:
        names = [str(i + 1) for i in range(n)]
        header = SEQ_HEADER.format(what="index")
        noun = "index"
    lines = [f"Image at {noun} {name}: {e}" for name, e in zip(names, events)]
    index = rng.randrange(n)
    near = [i for i in (index - 1, index + 1) if 0 <= i < n]
    if kind == "seq_index_grounding":
        index, window = window_pick(rng, n)
        question = f"What is the {noun} of the image that shows {quote(events[index])}?"
        return Sample(header, lines, question, names[index], [names[i] for i in window if i != index])
    if kind == "seq_indexed_caption":
        question = f"Describe the image at {noun} {names[index]}."
        wrong = pick_distractors(rng, [events[i] for i in range(n) if i != index], prefer=[events[i] for i in near])
        return Sample(header, lines, question, events[index], wrong)
    anchor = rng.randrange(1, n - 1)
    direction = rng.choice(["after", "before"])
    target, mirror = (anchor + 1, anchor - 1) if direction == "after" else (anchor - 1, anchor + 1)
    question = f"Which image comes right {direction} the one that shows {quote(events[anchor])}?"
    others = [events[i] for i in range(n) if i not in (anchor, target)]
    return Sample(header, lines, question, events[target], pick_distractors(rng, others, prefer=[events[mirror]]))


def build_sample(task, rng, pool, attribute_pool, n, positions):
    if task == "order":
        return build_order(rng, pool, n)
    if task == "attribute":
        return build_attribute(rng, pool, n, attribute_pool)
    if task == "refer_begin_end":
        return build_refer_begin_end(rng, pool, n)
    if task == "refer_anchor":
        return build_refer_anchor(rng, pool, n)
    if task in ("refer_time2event", "refer_event2time"):
        return build_refer_time(rng, pool, n, to_event=task == "refer_time2event")
    if task == "grounding":
        return build_grounding(rng, pool, n)
    if task.startswith("order_shuffle_"):
        return build_order_shuffle(rng, pool, n, task.rsplit("_", 1)[1])
    return build_seq(rng, pool, n, task, positions)


# ---------------------------------------------------------------- records out

def make_record(job):
    """One record from its job tuple and the run's settings and caption pools (module globals, set in
    each worker by _init_worker); the same job always gives the same record, so any worker count gives
    the same file."""
    split, index, task, scale, letter, as_choice = job
    rng = random.Random(f"{CONFIG['seed']}:{split}:{index}")
    pool, attribute_pool = POOLS[split]
    for _ in range(100):
        n = rng.randint(EVENTS_PER_SCALE[0] * SCALES[scale], EVENTS_PER_SCALE[1] * SCALES[scale])
        sample = build_sample(task, rng, pool, attribute_pool, n, CONFIG["positions"])
        if sample is not None and len(sample.distractors) >= NUM_OPTIONS - 1:
            break
    else:
        raise InputError(f"cannot build '{task}' records at scale {scale}: too few {split} captions that differ in more "
                         f"than their colour, size, state or count words (a sample needs {n} distinct events); give "
                         f"more varied captions, smaller --scales, or drop the task")
    video = sample.header + "\n" + "\n".join(sample.frames)
    record = {"id": f"t3-{split}-{index:07d}", "task": task, "scale": scale}
    if not as_choice:
        human, gpt = f"{video}\n\n{sample.question}", sample.answer
    else:
        options = rng.sample(sample.distractors[:NUM_OPTIONS - 1], NUM_OPTIONS - 1)
        if letter is None:
            letter = rng.randrange(NUM_OPTIONS)
        options.insert(letter, sample.answer)
        options = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
        human = f"{video}\n\n{sample.question}\n" + "\n".join(options) + f"\n{MC_INSTRUCTION}"
        gpt = LETTERS[letter]
        record["options"], record["answer"] = options, LETTERS[letter]
    record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return json.dumps(record, ensure_ascii=False) + "\n", len(human)


CONFIG, POOLS = {}, {}


def _init_worker(config, pools):
    CONFIG.update(config)
    POOLS.update(pools)


def plan_jobs(split, count, tasks, scales, seed, mc_fraction):
    """Task and scale round-robin (every family and scale equally often); validation letters
    are an exactly balanced, seeded shuffle."""
    combos = list(itertools.product(tasks, scales))
    rng = random.Random(f"{seed}:{split}:plan")
    letters = [i % NUM_OPTIONS for i in range(count)]
    rng.shuffle(letters)
    jobs = []
    for i in range(count):
        task, scale = combos[i % len(combos)]
        if split == "val":
            jobs.append((split, i, task, scale, letters[i], True))
        else:
            jobs.append((split, i, task, scale, None, rng.random() < mc_fraction))
    return jobs


def write_split(path, jobs, workers, config, pools, desc):
    stats = {}
    with atomic_write(path) as f:
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers, _init_worker, (config, pools)) as pool:
                lines = pool.imap(make_record, jobs, chunksize=256)
                _write_lines(f, lines, jobs, stats, desc)
        else:
            _init_worker(config, pools)
            _write_lines(f, map(make_record, jobs), jobs, stats, desc)
    return stats


def _write_lines(f, lines, jobs, stats, desc):
    for job, (line, prompt_chars) in tqdm(zip(jobs, lines), total=len(jobs), desc=desc, unit="rec", mininterval=1):
        f.write(line)
        _, _, task, scale, _, _ = job
        stats.setdefault(task, {}).setdefault(scale, []).append(prompt_chars)


def summarize(stats):
    out = {}
    for task, scales in stats.items():
        out[task] = {}
        for scale, chars in sorted(scales.items(), key=lambda kv: SCALES[kv[0]]):
            out[task][scale] = {"count": len(chars), "prompt_chars_mean": round(statistics.fmean(chars), 1),
                                "prompt_chars_max": max(chars)}
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.captions:
        captions = [c for path in args.captions for c in load_caption_file(path)]
        source = args.captions
    else:
        captions = [(c, f"built-in:{i}") for i, c in enumerate(builtin_captions(args.seed, 20000))]
        source = "built-in"
    cleaned = {}  # caption -> its first source; junk and repeats dropped
    for caption, origin in captions:
        caption = clean_caption(caption, args.max_caption_words)
        if caption:
            cleaned.setdefault(caption, origin)
    train_pool, val_pool = split_captions(list(cleaned.items()), args.val_fraction)
    need = EVENTS_PER_SCALE[1] * max(SCALES[s] for s in args.scales) + 1
    for name, pool, count in (("training", train_pool, args.num_train), ("validation", val_pool, args.num_val)):
        if count and len(pool) < need:
            raise InputError(f"{', '.join(args.captions) or 'captions'}: only {len(pool)} distinct captions for {name}; "
                             f"scale {max(args.scales, key=SCALES.get)} needs {need} (give more captions or smaller --scales)")
    pools = {}
    for split, pool in (("train", train_pool), ("val", val_pool)):
        attribute_pool = [c for c in pool if find_attribute(c)]
        if "attribute" in args.tasks and not attribute_pool and (args.num_train if split == "train" else args.num_val):
            raise InputError(f"no {split} caption has a colour, size, state or count word to change; "
                             "drop the 'attribute' task or give such captions")
        pools[split] = (pool, attribute_pool)
    config = {"seed": args.seed, "positions": args.positions}
    make_out_dir(args.out)
    stats = {"source": source, "seed": args.seed, "captions": {"train": len(train_pool), "val": len(val_pool)}}
    for split, count in (("train", args.num_train), ("val", args.num_val)):
        jobs = plan_jobs(split, count, args.tasks, args.scales, args.seed, args.mc_fraction)
        path = os.path.join(args.out, f"t3_{split}.jsonl")
        stats[split] = summarize(write_split(path, jobs, args.workers, config, pools, desc=f"t3_{split}"))
    with atomic_write(os.path.join(args.out, "stats.json")) as f:
        json.dump(stats, f, indent=2)
    print(f"wrote {args.num_train} training and {args.num_val} validation records to {args.out}")


# ---- shared: io (user input, JSONL, atomic writes) ----
class InputError(Exception):
    """Bad user input; run_main prints it as one line and exits with status 2."""


def read_jsonl(path):
    """Yield (line_number, record) for every non-blank line; InputError names file and line."""
    check_input_file(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object")
            yield number, record


def read_text(path):
    """A whole text file (UTF-8; a byte-order mark is allowed); InputError names the first line that is not UTF-8."""
    check_input_file(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text") from None


def check_input_file(path):
    """InputError unless `path` is a file this project can read as text (not a folder, gzip or Parquet)."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        raise InputError(f"{path}: gzip-compressed; decompress it first (gunzip -k {path})")
    if magic == b"PAR1":
        raise InputError(f"{path}: a Parquet file; give the JSON or JSONL form of it")
    if b"\x00" in magic:
        raise InputError(f"{path}: not UTF-8 text (NUL bytes: UTF-16 or binary); save it as UTF-8")


def make_out_dir(path):
    """Create the output folder (and its parents); InputError if `path` is an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: exists and is not a folder; --out takes a folder")
    os.makedirs(path, exist_ok=True)
    return path


@contextmanager
def atomic_write(path, mode="w"):
    """Write to a temp file beside `path` and rename it into place only on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run_main(main, argv=None):
    """Run main(argv); turn InputError into one line on stderr and exit status 2."""
    try:
        main(argv)
    except InputError as e:
        for bar in list(getattr(tqdm, "_instances", [])):  # end progress bars first: the error is the last line
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
# ---- end shared: io ----


if __name__ == "__main__":
    run_main(main)
