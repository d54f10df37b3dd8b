"""Stage 01: every family's answer re-derived from its own prompt, determinism, no leakage, bad input."""
import collections
import json
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


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    out = tmp_path_factory.mktemp("t3")
    result = run_synthesize(out, "--num-train", "1300", "--num-val", "520", "--seed", "3")
    assert result.returncode == 0, result.stderr
    read = lambda name: [json.loads(line) for line in open(out / name, encoding="utf-8")]
    return out, read("t3_train.jsonl"), read("t3_val.jsonl")


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
    caps = [f"A {c} dog number {i} runs across a {p} park." for i, (c, p) in
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
    assert synth.load_caption_file(str(tmp_path / name)) == caps
    out = tmp_path / "out"
    result = run_synthesize(out, "--captions", str(tmp_path / name), "--num-train", "40", "--num-val", "10",
                            "--scales", "1x", "--val-fraction", "0.3")
    assert result.returncode == 0, result.stderr
    used = {c for line in open(out / "t3_train.jsonl") for _, c in parse_prompt(json.loads(line)["conversations"][0]["value"])[0]}
    assert used and all("dog number" in c for c in used)


def test_long_captions_are_cut_to_first_sentence():
    long = "A dog runs. " + " ".join(["word"] * 80)
    assert synth.clean_caption(long, 40) == "A dog runs."
    assert synth.clean_caption("<image>\n a  cat   sits", 40) == "A cat sits."


@pytest.mark.parametrize("content,expect", [
    (None, "no such file"),
    ("", "empty file"),
    ('{"id": 1, "caption": "a dog"}\n{"id": 2, "caption": "a cat"}\n{"id": 3, "caption": broken}\n', ":3: not valid JSON"),
    ('{"id": 1, "caption": "a dog"}\n{"id": 2, "text": "a cat"}\n', ":2: record has no non-empty 'caption'"),
    ('[{"id": "1", "conversations": [{"from": "human", "value": "hi"}]}]', "record 0 has no gpt turn"),
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
