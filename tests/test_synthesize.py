"""Stage 01: every family's answer re-derived from its own prompt, determinism, no leakage, bad input."""
import collections
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, load_stage

synth = load_stage("01_synthesize.py")
SCRIPT = os.path.join(REPO, "01_synthesize.py")


def run_synthesize(out, *args):
    return subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], capture_output=True, text=True)


def read_records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    out = tmp_path_factory.mktemp("t3")
    result = run_synthesize(out, "--num-train", "1300", "--num-val", "520", "--seed", "3")
    assert result.returncode == 0, result.stderr
    return out, read_records(out / "t3_train.jsonl"), read_records(out / "t3_val.jsonl")


# ---- an independent reader of the prompts: parses the text, knows nothing of the builders ----

def parse_prompt(text):
    """(frames [(time_or_position, caption)], question text)"""
    video, _, question = text.partition("\n\n")
    frames = []
    for line in video.split("\n")[1:]:
        m = re.match(r"(?:Frame (\d+)|([\d.]+)s|Image at (?:relative position|index) ([\d.]+)): (.*)$", line)
        assert m, line
        frames.append((m.group(1) or m.group(2) or m.group(3), m.group(4)))
    return frames, question


def answer_text(record):
    gpt = record["conversations"][1]["value"]
    if "options" in record:
        assert gpt == record["answer"]
        return next(o[3:] for o in record["options"] if o.startswith(record["answer"] + ". "))
    return gpt


def index_of(frames, quoted):
    return next(i for i, (_, c) in enumerate(frames) if c.rstrip(".") == quoted)


def quoted_event(question):
    return re.search(r'"([^"]+)"', question).group(1)


def expected_answer(record):
    """Derive the answer from the frames and the question alone."""
    task = record["task"]
    frames, question = parse_prompt(record["conversations"][0]["value"])
    captions = [c for _, c in frames]
    first_line = question.split("\n")[0]
    if task == "order":
        if "happens first" in first_line:
            return captions[0]
        if "happens last" in first_line:
            return captions[-1]
        if "In what order" in first_line:
            items = re.findall(r"\((\w)\) (.*?)(?= \(\w\) |$)", first_line.split("? ", 1)[1])
            return ", ".join(f"({label})" for label, text in sorted(items, key=lambda it: captions.index(it[1])))
        anchor = index_of(frames, quoted_event(first_line))
        answer = answer_text(record)
        position = captions.index(answer)
        assert position < anchor if " before " in first_line else position > anchor
        return answer
    if task == "attribute":
        aspect, noun = re.match(r"How does the (\w+) of (?:the )?(\w+) change", first_line).groups()
        category = {v: k for k, v in synth.ASPECT_NAMES.items()}[aspect]
        words = [w for w, c in synth.ATTRIBUTE_WORDS.items() if c == category]
        keyed = collections.Counter(synth.attribute_key(c) for c in captions)
        subject_key = max((k for k in keyed if noun in k), key=keyed.get)
        states = []
        for caption in captions:
            if synth.attribute_key(caption) == subject_key:
                value = next(w for w in re.findall(r"[a-z]+", caption.lower()) if w in words)
                if not states or states[-1] != value:
                    states.append(value)
        if len(states) == 1:
            return f"It stays {states[0]}."
        return "It changes from " + states[0] + " to " + states[1] + "".join(f", then to {s}" for s in states[2:]) + "."
    if task == "refer_begin_end":
        where = re.search(r"at the (\w+) of", first_line).group(1)
        return {"beginning": captions[0], "end": captions[-1], "middle": captions[len(captions) // 2]}[where]
    if task == "refer_anchor" or task == "seq_adjacent":
        anchor = index_of(frames, quoted_event(first_line))
        return captions[anchor - 1 if "right before" in first_line else anchor + 1]
    if task == "refer_time2event":
        time = re.search(r"at ([\d.]+)s\?", first_line).group(1)
        return next(c for t, c in frames if t == time)
    if task == "refer_event2time":
        return f"At {frames[index_of(frames, quoted_event(first_line))][0]}s."
    if task == "grounding":
        times = [t for t, c in frames if c.rstrip(".") == quoted_event(first_line)]
        return f"From {times[0]}s to {times[-1]}s."
    if task.startswith("order_shuffle_"):
        items = re.findall(r"^\((\w)\) (.*)$", question, re.MULTILINE)
        def position(text):
            core = text.replace("...", "").strip()
            hits = [i for i, c in enumerate(captions) if core in c]
            assert len(hits) == 1, (core, hits)
            return hits[0]
        return ", ".join(f"({label})" for label, text in sorted(items, key=lambda it: position(it[1])))
    if task == "seq_index_grounding":
        return frames[index_of(frames, quoted_event(first_line))][0]
    if task == "seq_indexed_caption":
        position = re.search(r"(?:position|index) ([\d.]+)\.", first_line).group(1)
        return next(c for p, c in frames if p == position)
    raise AssertionError(f"unknown task {task}")


def test_every_family_and_scale_present(synthesized):
    out, train, val = synthesized
    for records in (train, val):
        assert {r["task"] for r in records} == set(synth.TASKS)
        assert {r["scale"] for r in records} == set(synth.SCALES)
    stats = json.load(open(out / "stats.json"))
    assert set(stats["train"]) == set(synth.TASKS)
    assert sum(s["count"] for task in stats["val"].values() for s in task.values()) == len(val)


@pytest.mark.parametrize("split", ["train", "val"])
def test_answers_are_correct(synthesized, split):
    records = synthesized[1] if split == "train" else synthesized[2]
    checked = collections.Counter()
    for record in records:
        assert answer_text(record) == expected_answer(record), record["id"]
        checked[record["task"]] += 1
    assert set(checked) == set(synth.TASKS)


def test_event_counts_follow_scale(synthesized):
    for record in synthesized[2]:
        frames, _ = parse_prompt(record["conversations"][0]["value"])
        events = len(dict.fromkeys(c for _, c in frames)) if record["task"] == "grounding" else len(frames)
        scale = synth.SCALES[record["scale"]]
        if record["task"] != "attribute":  # attribute repeats its subject in several frames
            assert 4 * scale <= events <= 5 * scale, (record["id"], events)


def test_validation_is_balanced_multiple_choice_with_in_sample_distractors(synthesized):
    val = synthesized[2]
    letters = collections.Counter(r["answer"] for r in val)
    assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 1
    for record in val:
        assert [o[:3] for o in record["options"]] == ["A. ", "B. ", "C. ", "D. "]
        texts = [o[3:] for o in record["options"]]
        assert len(set(texts)) == 4
        if record["task"] in ("order", "refer_begin_end", "refer_anchor", "refer_time2event",
                              "seq_indexed_caption", "seq_adjacent") and "(a)" not in texts[0]:
            frames, _ = parse_prompt(record["conversations"][0]["value"])
            assert set(texts) <= {c for _, c in frames}, record["id"]


def test_no_validation_caption_in_training(synthesized):
    _, train, val = synthesized
    mask = synth.attribute_key
    train_keys = {mask(c) for r in train for _, c in parse_prompt(r["conversations"][0]["value"])[0]}
    val_keys = {mask(c) for r in val for _, c in parse_prompt(r["conversations"][0]["value"])[0]}
    assert val_keys and train_keys and not (val_keys & train_keys)


def test_training_mixes_free_form_and_multiple_choice(synthesized):
    train = synthesized[1]
    share = sum("options" in r for r in train) / len(train)
    assert 0.4 < share < 0.6


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, workers, seed in ((a, "1", "5"), (b, "2", "5"), (c, "2", "6")):
        assert run_synthesize(out, "--num-train", "300", "--num-val", "60", "--seed", seed, "--workers", workers).returncode == 0
    for name in ("t3_train.jsonl", "t3_val.jsonl", "stats.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "t3_train.jsonl").read_bytes() != (c / "t3_train.jsonl").read_bytes()


def write_caption_formats(folder, count=120):
    caps = [f"A {c} dog runs across a {p} park by gate {i}." for i, (c, p) in
            enumerate(zip(synth.COLOURS * 20, ["sunny", "snowy", "quiet"] * 50)) if i < count]
    (folder / "caps.jsonl").write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in enumerate(caps)))
    llava = [{"id": str(i), "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": c}]}
             for i, c in enumerate(caps)]
    (folder / "llava.json").write_text(json.dumps(llava, indent=1))
    coco = {"images": [], "annotations": [{"image_id": i, "id": i, "caption": c} for i, c in enumerate(caps)]}
    (folder / "captions_train2017.json").write_text(json.dumps(coco))
    return caps


@pytest.mark.parametrize("name", ["caps.jsonl", "llava.json", "captions_train2017.json"])
def test_caption_formats(tmp_path, name):
    caps = write_caption_formats(tmp_path)
    assert [c for c, _ in synth.load_caption_file(str(tmp_path / name))] == caps
    out = tmp_path / "out"
    result = run_synthesize(out, "--captions", str(tmp_path / name), "--num-train", "40", "--num-val", "10",
                            "--scales", "1x", "--val-fraction", "0.3")
    assert result.returncode == 0, result.stderr
    used = {c for line in open(out / "t3_train.jsonl") for _, c in parse_prompt(json.loads(line)["conversations"][0]["value"])[0]}
    assert used and all("by gate" in c for c in used)


def test_long_captions_are_cut_to_first_sentence():
    long = "A dog runs. " + " ".join(["word"] * 80)
    assert synth.clean_caption(long, 40) == "A dog runs."
    assert synth.clean_caption("<image>\n a  cat   sits", 40) == "A cat sits."


@pytest.mark.parametrize("content,expect", [
    (None, "no such file"),
    ("", "empty file"),
    ('{"id": 1, "caption": "a dog"}\n{"id": 2, "caption": "a cat"}\n{"id": 3, "caption": broken}\n', ":3: not valid JSON"),
    ('{"id": 1, "caption": "a dog"}\n{"id": 2, "text": "a cat"}\n', ":2: record has no non-empty 'caption'"),
    ('[{"id": "1", "conversations": [{"from": "human", "value": "hi"}]}]', "record 0 has neither a 'caption' nor a gpt turn"),
    ('{"images": []}', "without an 'annotations' list"),
])
def test_bad_caption_file_one_line_no_output(tmp_path, content, expect):
    path = tmp_path / "captions.jsonl"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    result = run_synthesize(out, "--captions", str(path), "--num-train", "10", "--num-val", "5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and expect in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_too_few_captions_is_a_clear_error(tmp_path):
    caps = write_caption_formats(tmp_path, count=20)
    result = run_synthesize(tmp_path / "out", "--captions", str(tmp_path / "caps.jsonl"), "--num-train", "10", "--num-val", "5")
    assert result.returncode == 2 and "distinct captions" in result.stderr and len(caps) == 20


# ---- no answer can be read off the options, and no tell in open-ended records ----

@pytest.fixture(scope="module")
def many_val_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("shortcuts")
    result = run_synthesize(out, "--num-train", "2600", "--num-val", "6500", "--seed", "4")
    assert result.returncode == 0, result.stderr
    return read_records(out / "t3_val.jsonl"), read_records(out / "t3_train.jsonl")


def test_no_family_can_be_answered_from_its_options_alone(many_val_records):
    """Solvers that see only the four options (never the question or the events): the one most or
    least like the others, the middle or neighbour-richest number, the order most others are one swap
    from, the longest, the shortest, the one sharing most words. Each must stay within 8 points of
    chance (25%) in every family, on 500 records per family."""
    from shortcuts import accuracy_by_family
    table = accuracy_by_family(many_val_records[0])
    assert set(table) == set(synth.TASKS)
    for family, row in table.items():
        for solver, (correct, total) in row.items():
            assert total >= 500 and abs(correct / total - 0.25) <= 0.08, (family, solver, correct / total)


def test_open_ended_orders_are_not_given_away_by_their_listing():
    """Restoring an order: the items are listed in a uniformly random order, so the right order is
    sometimes the listed one, as often as chance says (a model must not learn that it never is)."""
    import random
    pool = synth.builtin_captions(0, 400)
    for build, k in ((lambda rng: synth.build_order_shuffle(rng, pool, 4, "sentence"), 4),
                     (lambda rng: synth.build_order(rng, pool, 4), 3)):
        answers = [build(random.Random(i)) for i in range(3000)]
        answers = [a.answer for a in answers if a is not None and a.answer.count("(") == k]
        in_listed_order = sum(re.findall(r"\(([a-h])\)", a) == sorted(re.findall(r"\(([a-h])\)", a)) for a in answers)
        expected = len(answers) / math.factorial(k)
        assert len(answers) > 400 and abs(in_listed_order - expected) < 4 * expected ** 0.5 + 1, (k, in_listed_order, expected)


# ---- fluent English on captions as users have them ----

# no noun: function words, adjectives and verbs seen after attribute words in real captions
FUNCTION_OR_ATTRIBUTE = set("""and or of the a an with in on at to by for from is are shiny fluffy wooden old
    sits runs walks lies stands parked sleeping""".split()) | set(synth.ATTRIBUTE_WORDS)


def check_english(records):
    """a/an agree with the word after them when it is an attribute word; an attribute question names a
    real noun; "black and white" is never turned into another colour pair."""
    for record in records:
        text = record["conversations"][0]["value"] + "\n" + record["conversations"][1]["value"]
        for article, word in re.findall(r"\b([Aa]n?) ([A-Za-z]+)", text):
            if word.lower() in synth.ATTRIBUTE_WORDS:
                assert (article.lower() == "an") == (word[0].lower() in "aeiou"), (article, word, record["id"])
        question = re.search(r"How does the \w+ of (?:the )?(\w+) change", text)
        if question:
            assert question.group(1).lower() not in FUNCTION_OR_ATTRIBUTE and question.group(1).isalpha(), question.group(0)
        for first, second in re.findall(r"\b(\w+) and (\w+) (?:photo|picture|image)", text, re.IGNORECASE):
            if {first.lower(), second.lower()} & set(synth.COLOURS):
                assert (first.lower(), second.lower()) == ("black", "white"), (first, second, record["id"])


@pytest.mark.parametrize("style", ["built-in", "coco", "recap"])
def test_language_is_fluent_on_every_record(tmp_path, style):
    from captions_in_the_wild import COCO_STYLE, RECAP_STYLE
    extra = []
    if style == "coco":
        coco = {"images": [{"id": i} for i in COCO_STYLE],
                "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c} for i, caps in COCO_STYLE.items()
                                for k, c in enumerate(caps)]}
        (tmp_path / "captions_train2017.json").write_text(json.dumps(coco))
        extra = ["--captions", str(tmp_path / "captions_train2017.json"), "--val-fraction", "0.3", "--scales", "1x"]
    elif style == "recap":
        recap = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                                                    {"from": "gpt", "value": text}]}
                 for i, text in enumerate(RECAP_STYLE * 3)]
        coco_lines = [{"id": f"c{i}-{k}", "caption": c} for i, caps in COCO_STYLE.items() for k, c in enumerate(caps)]
        (tmp_path / "recap.json").write_text(json.dumps(recap + [dict(l, conversations=[
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": l["caption"]}]) for l in coco_lines]))
        extra = ["--captions", str(tmp_path / "recap.json"), "--val-fraction", "0.3", "--scales", "1x"]
    result = run_synthesize(tmp_path / "out", "--num-train", "1300", "--num-val", "260", "--seed", "2", *extra)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for name in ("t3_train.jsonl", "t3_val.jsonl") for line in open(tmp_path / "out" / name)]
    check_english(records)
    assert sum(r["task"] == "attribute" for r in records) >= 100


def test_attribute_swaps_keep_articles_and_skip_unsafe_nouns():
    caption = "An orange cat sleeping on a blue couch."
    match, category, noun = synth.find_attribute(caption)
    assert (match.group(1), category, noun) == ("orange", "colour", "cat")
    assert synth.swap_attribute(caption, match, "red") == "A red cat sleeping on a blue couch."
    assert synth.swap_attribute("A red cat naps.", synth.find_attribute("A red cat naps.")[0], "orange") == "An orange cat naps."
    for unsafe in ("A black and white photo of a street sign.", "A red fire hydrant on the sidewalk.",
                   "A red shiny car in a garage.", "A large and heavy box."):
        found = synth.find_attribute(unsafe)
        assert found is None or found[2] not in ("and", "fire", "shiny", "heavy", "white", "photo"), (unsafe, found)


# ---- no hang, an honest split, captions cleaned as users expect ----

def test_captions_that_barely_vary_end_in_seconds_with_one_line(tmp_path):
    sizes, colours = ["tiny", "small", "large", "huge"], synth.COLOURS
    caps = [f"A {s} {c} car drives along a busy street." for s in sizes for c in colours]
    (tmp_path / "cars.jsonl").write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in enumerate(caps)))
    result = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "out"), "--captions", str(tmp_path / "cars.jsonl"),
                             "--tasks", "attribute", "--scales", "1x", "--num-train", "20", "--num-val", "0"],
                            capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: cannot build 'attribute' records at scale 1x")
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "out"))


def test_coco_split_keeps_each_image_and_its_near_duplicates_on_one_side():
    from captions_in_the_wild import COCO_STYLE
    captions = []
    for image, caps in COCO_STYLE.items():
        for k, caption in enumerate(caps):
            captions += [(synth.clean_caption(caption, 40), f"image_id:{image}")]
            captions += [(synth.clean_caption(caption.rstrip(".") + " .", 40), f"image_id:{image + 1000}")]  # a near-duplicate
    captions = list(dict((c, s) for c, s in reversed(captions)).items())[::-1]
    train, val = synth.split_captions(captions, 0.3)
    assert train and val and set(train).isdisjoint(val)
    side = {c: "train" for c in train} | {c: "val" for c in val}
    for image, caps in COCO_STYLE.items():
        assert len({side[synth.clean_caption(c, 40)] for c in caps}) == 1, image
    keys = lambda pool: {synth.near_duplicate_key(c) for c in pool}
    assert keys(train).isdisjoint(keys(val))


def test_caption_cleaning():
    assert synth.clean_caption("!", 40) == "" and synth.clean_caption("Ok.", 40) == "" and synth.clean_caption("A.", 40) == ""
    long = "Mr. Smith walks his dog along St. James Street in the rain. " + "More words follow here. " * 10
    assert synth.clean_caption(long, 20) == "Mr. Smith walks his dog along St. James Street in the rain."
    endless = "A " + "very " * 60 + "long caption"
    assert len(synth.clean_caption(endless, 40).split()) == 40


def test_plain_json_list_and_a_jsonl_line_without_caption(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"id": i, "caption": f"A dog runs past gate {i}."} for i in range(3)]))
    assert [c for c, _ in synth.load_caption_file(str(tmp_path / "list.json"))][1] == "A dog runs past gate 1."
    (tmp_path / "one.jsonl").write_text(json.dumps({"id": 1, "text": "a dog"}) + "\n")
    with pytest.raises(synth.InputError, match="one.jsonl:1: record has no non-empty 'caption' string"):
        synth.load_caption_file(str(tmp_path / "one.jsonl"))
