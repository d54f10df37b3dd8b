"""Stage 06: temporal multiple-choice benchmarks for a base model and its adapters, side by side.

Reads the project's benchmark JSONL (as stage 02 writes), stage 01's T3 validation JSONL
(text only) and the published files of TempCompass, Video-MME, MLVU and LongVideoBench as
they ship (JSON, JSONL, Parquet), and asks each benchmark with the prompt lmms-eval builds
for it. Each video is decoded once per run, and the same frames go to the base model and to
every adapter. Scoring is `loglik` (the log-probability of each option's label, or of
yes/no, as the first reply token: deterministic, the default) or `generate` (a greedy
reply, from which the choice is read; replies naming no single option are counted as
unparsed). The raw scores or reply and the parsed answer of every item are kept.

Usage:
    python 06_eval.py --model M [--adapter t3=runs/03 --adapter tpo=runs/05]
        --bench runs/02/probe_bench.jsonl [--bench videomme=videomme.parquet --video-root DIR ...]
        [--num-frames 16] [--mode loglik|generate] [--prompt official|project] --out runs/06
        [--limit N] [--shard i/n]
    merge shards:  python 06_eval.py --merge runs/06-shard-* --out runs/06

Writes OUT/predictions.jsonl (appended as items are scored; --resume skips scored ones),
OUT/results.json (per model, benchmark and group: accuracy with its 95% interval, and the
paired difference from the base model with its interval and McNemar p-value) and
OUT/results.md (the same as tables, with the prompt of each benchmark's first item).
"""
import argparse
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from typing import TypedDict

import numpy as np
import torch
from tqdm import tqdm

FORMATS = ("auto", "jsonl", "t3", "tempcompass", "videomme", "mlvu", "longvideobench")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
# MLVU's headline (its paper, its repository and lmms-eval) is the mean over its tasks; results show it
# beside the pooled accuracy. Video-MME, LongVideoBench and TempCompass report pooled accuracy.
TASK_MEAN_FORMATS = ("mlvu",)
# The text lmms-eval adds around a published benchmark's question (its tasks' default prompts; TempCompass
# and the MLVU HF copy keep the options inside the question). MLVU's "Best option: (" primes the reply.
OFFICIAL = {
    "tempcompass_choice": "\nPlease directly give the best option:",
    "tempcompass_yes_no": "\nPlease answer yes or no:",
    "videomme_preamble": "Select the best answer to the following multiple-choice question based on the video and the "
                         "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.",
    "videomme_end": "\nAnswer with the option's letter from the given choices directly.",
    "mlvu_end": "\nOnly give the best option.\nBest option: (",
    "longvideobench_end": "Answer with the option's letter from the given choices directly.\n",
}
OPTION_WORD = r"(?:(?:Option|Sentence|Caption)\s+)"  # TempCompass caption matching: "Option 1:", "Sentence A:"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder or hub id (AutoModelForImageTextToText)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT adapter to evaluate beside the base model (repeatable)")
    p.add_argument("--bench", action="append", default=[], metavar="[NAME=]FILE",
                   help="a benchmark file: JSON, JSONL or Parquet (repeatable); NAME defaults to the file's stem")
    p.add_argument("--format", choices=FORMATS, default="auto", help="layout of every --bench (auto: by each record's fields)")
    p.add_argument("--video-root", help="folder of the published benchmarks' videos (default: beside the file)")
    p.add_argument("--num-frames", type=int, default=16, help="frames per video, uniform over the decodable ones")
    p.add_argument("--mode", choices=("loglik", "generate"), default="loglik")
    p.add_argument("--prompt", choices=("official", "project"), default="official",
                   help="official: each published benchmark's prompt as lmms-eval builds it (README lists them); "
                        "project: the lettered prompt of the project's own files for every benchmark")
    p.add_argument("--max-new-tokens", type=int, default=32, help="reply length in generate mode")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, help="first N items of each benchmark")
    p.add_argument("--shard", default="0/1", help="i/n: every n-th item starting at i")
    p.add_argument("--skip-missing", action="store_true", help="count and skip items whose video is missing or unreadable")
    p.add_argument("--resume", action="store_true", help="keep OUT/predictions.jsonl and skip what it already scored")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="join shard folders' predictions into --out and report")
    p.add_argument("--out", required=True)
    p.add_argument("--no-4bit", dest="four_bit", action="store_false")
    args = p.parse_args(argv)
    if not args.merge and not (args.model and args.bench):
        p.error("--model and --bench are required (unless --merge)")
    args.shard_index, args.shard_count = parse_shard(p, args.shard)
    require_positive(p, args, "num_frames", "batch_size", "limit", "max_new_tokens")
    args.adapters = []
    for spec in args.adapter:
        name, _, folder = spec.partition("=")
        if not folder or not name or name == "base":
            p.error(f"--adapter takes NAME=DIR with a NAME other than 'base', not {spec!r}")
        args.adapters.append((name, folder))
    if len({n for n, _ in args.adapters}) != len(args.adapters):
        p.error("--adapter names must differ")
    return args


# ---------------------------------------------------------------- benchmarks in

def load_records(path):
    """[(where, record)] from JSONL, a JSON list, a JSON object of lists or records, TempCompass's
    nested {video_id: {dim: [records]}} files, or Parquet."""
    if os.path.isfile(path) and is_parquet(path):
        return [(f"{path}: row {i}", r) for i, r in enumerate(read_parquet(path), 1)]
    check_input_file(path)
    if path.lower().endswith((".csv", ".tsv")):
        raise InputError(f"{path}: a CSV file; give the benchmark's JSON, JSONL or Parquet file")
    text = read_text(path)
    head = text[:4096].lstrip()
    if path.endswith(".jsonl") or not head.startswith(("[", "{")):
        return [(f"{path}:{n}", r) for n, r in read_jsonl(path)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if head.startswith("{"):  # a JSONL file without the .jsonl name
            return [(f"{path}:{n}", r) for n, r in read_jsonl(path)]
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) and v and all(isinstance(x, list) for x in v.values())
                                               for v in data.values()):
        return [(f"{path}: {video}/{dim}/{i}", {**r, "video_id": video, "dim": dim, "id": f"{video}/{dim}/{i}"})
                for video, dims in data.items() for dim, records in dims.items() for i, r in enumerate(records)
                if isinstance(r, dict)]
    if isinstance(data, dict):  # {"id": record} or {"split": [records]}
        values = list(data.values())
        data = [r for v in values for r in v] if all(isinstance(v, list) for v in values) else values
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path}: expected a list of JSON objects")
    return [(f"{path}: record {i}", r) for i, r in enumerate(data, 1)]


def is_parquet(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def read_parquet(path):
    """The rows of a Parquet file as dicts (Video-MME, LongVideoBench and TempCompass ship Parquet)."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise InputError(f"{path}: a Parquet file; reading it needs pyarrow (pip install pyarrow)") from None
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for damaged files
        raise InputError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None


def detect_format(record):
    keys = set(record)
    for fmt, needed in (("t3", {"conversations", "options"}), ("videomme", {"videoID"}), ("longvideobench", {"correct_choice"}),
                        ("mlvu", {"candidates"}), ("mlvu", {"video_name", "task_type"}), ("tempcompass", {"video_id", "dim"}),
                        ("jsonl", {"video", "options"})):
        if needed <= keys:
            return fmt
    return None


def field(record, where, key, kind=None):
    """record[key]; with `kind` str or list, an InputError unless it is a string / a list of strings."""
    if key not in record:
        raise InputError(f"{where}: missing {key!r}")
    value = record[key]
    if kind is str and not isinstance(value, str):
        raise InputError(f"{where}: {key!r} must be a string, not {json.dumps(value)[:40]}")
    if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise InputError(f"{where}: {key!r} must be a list of strings, not {json.dumps(value)[:40]}")
    return value


class UnscorableRecord(ValueError):
    """A record whose answer is not among its options: an error in the project's own files, a counted
    and reported skip in a published benchmark (MLVU's needle task ships two)."""


def strip_letters(options):
    """Option texts without "A. " / "(A) " prefixes, when every option carries its own letter."""
    pattern = re.compile(r"^\(?([A-J])[.):]\s*(.*)$", re.S)
    matches = [pattern.match(o.strip()) for o in options]
    if all(m and m[1] == LETTERS[i] for i, m in enumerate(matches)):
        return [m[2].strip() for m in matches]
    return [o.strip() for o in options]


def lettered(options, style="{letter}. {option}"):
    return [style.format(letter=LETTERS[i], option=o) for i, o in enumerate(options)]


def answer_index(answer, options, where, labels, by_index=False):
    """An answer given as its label ("B", "(B)", "B. text", "Caption B: text", "Option 2: text"), as an
    option's text, or (`by_index`: LongVideoBench) as a 0-based index -> the option's index."""
    if by_index and isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    if not isinstance(answer, str):
        raise UnscorableRecord(f"{where}: answer {answer!r} is not a letter or an option's text")
    text = answer.strip()
    label = re.match(rf"^\(?{OPTION_WORD}?([A-J1-9])(?:[.):]|$)", text)
    if label and label[1] in labels[:len(options)]:
        return labels.index(label[1])
    lowered = [o.lower() for o in options]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise UnscorableRecord(f"{where}: answer {answer!r} is not one of its {len(options)} options")


def split_inline_options(question, where):
    """Options kept in the question, one per line: TempCompass's "A. text", or in caption matching
    "Caption A: text", "Sentence A: text" or "Option 1: text"; MLVU's "(A) text" -> (question, labels, option texts)."""
    lines = question.strip().split("\n")
    pattern = re.compile(rf"^\(?{OPTION_WORD}?([A-J1-9])[.):]\s*(.+)$")
    matches = [pattern.match(line.strip()) for line in lines]
    first = next((i for i, m in enumerate(matches) if m and m[1] in "A1"), None)
    if first is None or not all(matches[first:]):
        raise InputError(f"{where}: no lettered or numbered options in the question")
    labels = [m[1] for m in matches[first:]]
    if labels != list((LETTERS if labels[0] == "A" else "123456789")[:len(labels)]):
        raise InputError(f"{where}: options are labelled {''.join(labels)}, not in order")
    return "\n".join(lines[:first]).strip(), labels, [m[2].strip() for m in matches[first:]]


def t3_item(record, where):
    turns = field(record, where, "conversations")
    if not (isinstance(turns, list) and turns and isinstance(turns[0], dict) and isinstance(turns[0].get("value"), str)):
        raise InputError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    human = turns[0]["value"]
    block = "\n" + "\n".join(field(record, where, "options", list))
    question = (human[:human.index(block)] if block in human else human).strip()
    options = strip_letters(record["options"])
    return {"video": None, "question": question, "options": options, "answer": field(record, where, "answer"),
            "groups": {"task_type": record.get("task", "t3")}}


def project_item(record, where):
    options = strip_letters(field(record, where, "options", list))
    return {"video": field(record, where, "video", str) or None, "question": field(record, where, "question", str),
            "options": options, "answer": field(record, where, "answer"), "groups": {"task_type": record.get("task_type", "all")}}


def tempcompass_item(record, where):
    text, answer = field(record, where, "question", str), str(field(record, where, "answer")).strip()
    if "mc_question" in record or text.startswith("You will be presented with a video and several pieces"):
        raise InputError(f"{where}: a TempCompass captioning record: lmms-eval scores those with a GPT judge; "
                         "give the multi-choice, yes_no or caption_matching file")
    groups = {"dim": str(field(record, where, "dim")), "task": "yes_no"}
    if answer.lower() in YES_NO:
        return {"video": str(field(record, where, "video_id")), "question": text, "options": list(YES_NO),
                "answer": answer.lower(), "groups": groups, "prompt": text + OFFICIAL["tempcompass_yes_no"]}
    question, labels, options = split_inline_options(text, where)
    groups["task"] = "caption_matching" if re.match(OPTION_WORD, answer) else "multi-choice"
    return {"video": str(field(record, where, "video_id")), "question": question, "options": options, "labels": labels,
            "answer": answer, "groups": groups,
            "prompt": text + OFFICIAL["tempcompass_choice"]}


def videomme_item(record, where):
    stored = field(record, where, "options", list)
    options = strip_letters(stored)
    lines = stored if options != [o.strip() for o in stored] else lettered(options)
    question = field(record, where, "question", str)
    return {"video": str(field(record, where, "videoID")), "question": question, "options": options,
            "answer": field(record, where, "answer"), "groups": {g: str(record.get(g, "all")) for g in ("duration", "domain", "task_type")},
            "prompt": "\n".join([OFFICIAL["videomme_preamble"], question, *lines, OFFICIAL["videomme_end"]])}


def mlvu_item(record, where):
    name = record.get("video") or field(record, where, "video_name", str)
    question = stored = field(record, where, "question", str)
    if "candidates" in record:
        candidates = field(record, where, "candidates")
        if not (isinstance(candidates, list) and all(isinstance(c, (str, int, float)) for c in candidates)):
            raise InputError(f"{where}: 'candidates' must be a list of option texts")
        options = [str(c) for c in candidates]
    else:  # the options are lines "(A) text" of the question, perhaps after "Question: ..." and "Options:"
        question, _, options = split_inline_options(question, where)
        question = re.sub(r"^Question:\s*|\s*\nOptions:$", "", question)
    # The dev set's HF copy already writes "(A) text" lines into the question; the repository's JSON does not.
    body = stored if re.search(r"^\(A\) ", stored, re.M) else "\n".join(
        [f"Question: {question}", "Options:", *lettered(options, "({letter}) {option}")])
    return {"video": str(name), "question": question, "options": options,
            "answer": field(record, where, "answer"),
            "groups": {"task_type": str(record.get("question_type", record.get("task_type", "all")))},
            "prompt": body + OFFICIAL["mlvu_end"]}


def longvideobench_item(record, where):
    if "candidates" in record:  # lvb_val.json
        options = [str(c) for c in field(record, where, "candidates")]
    else:  # the Parquet layout: option0..option4, "N/A" where unused
        options = [str(record[f"option{i}"]) for i in range(10) if record.get(f"option{i}") not in (None, "", "N/A")]
    question = field(record, where, "question", str)
    return {"video": field(record, where, "video_path", str), "question": question, "options": options,
            "answer": field(record, where, "correct_choice"), "answer_by_index": True,
            "groups": {"task_type": str(record.get("question_category", "all")),
                       "duration": str(record.get("duration_group", "all"))},
            "prompt": "\n".join([question, *lettered(options), OFFICIAL["longvideobench_end"]])}


ITEM_READERS = {"t3": t3_item, "jsonl": project_item, "tempcompass": tempcompass_item, "videomme": videomme_item,
                "mlvu": mlvu_item, "longvideobench": longvideobench_item}


class Item(TypedDict):
    """A benchmark question as every layout becomes it (to_item) and the scoring reads it."""
    id: str
    video: str  # the video file's path, or None for a text-only record (t3_val)
    question: str
    options: list  # option texts, without their letters
    labels: list  # the letter or number each option is answered with
    answer: int  # index of the right option
    answers: list  # indices of every option whose text is the answer's (MLVU repeats some)
    groups: dict  # task, duration, ...: the columns the accuracy is broken down by
    prompt: str  # what the model is asked
    where: str  # file:line, for messages (read_bench adds it)


def to_item(fmt, record, where, bench_dir, video_root, prompt_style, hint="") -> Item:
    """A benchmark record in any supported layout -> {id, video, question, options, labels, answer,
    answers, groups, prompt}: `prompt` is lmms-eval's for the published layouts (prompt_style "official")
    or the project's lettered prompt; `answers` are the options with the answer's text (MLVU repeats some)."""
    if fmt not in ITEM_READERS:
        raise InputError(f"{where}: not a benchmark record this stage reads (give --format)")
    item = ITEM_READERS[fmt](record, where)
    options = item["options"]
    if not 2 <= len(options) <= len(LETTERS):
        raise InputError(f"{where}: needs 2 to {len(LETTERS)} options, has {len(options)}")
    labels = item.pop("labels", None) or list(LETTERS[:len(options)])
    answer = answer_index(item["answer"], options, where, labels, item.pop("answer_by_index", False))
    official = item.pop("prompt", None)
    if prompt_style == "project" or official is None:
        item["prompt"], item["labels"] = choice_prompt(item["question"], options), list(LETTERS[:len(options)])
    else:
        item["prompt"], item["labels"] = official, labels
    item["answer"] = answer
    item["answers"] = [i for i, o in enumerate(options) if o.strip().lower() == options[answer].strip().lower()]
    if item["video"] is not None:
        try:
            item["video"] = (os.path.join(bench_dir, item["video"]) if fmt == "jsonl" else
                             find_video(video_root or bench_dir, item["video"], (hint, *item["groups"].values())))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    item["id"] = record_id(record, where)
    return item


def record_id(record, where):
    """The record's id as its layout names it (id, question_id or uid), else its place in the file
    (the line or item number that ends `where`)."""
    for key in ("id", "question_id", "uid"):
        if key in record:
            return str(record[key])
    return where.rsplit(" ", 1)[-1].rsplit(":", 1)[-1]


def find_video(folder, name, hints=()):
    """The video file `name` (a path, a file name, or a bare id) under `folder` or, as the published
    archives unpack, in a subfolder of it (videos/, data/, video/1_plotQA/ ...). Several files of that
    name: the one in a folder named like a hint (the benchmark file's stem, the record's task), else
    an InputError."""
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    base = os.path.basename(name)
    found = video_index(os.path.abspath(folder)).get(base if os.path.splitext(base)[1] else base + "\0stem", [])
    if len(found) > 1:
        hinted = [p for p in found if any(part == h or part.endswith("_" + h) for h in hints if h
                                          for part in os.path.relpath(os.path.dirname(p), folder).split(os.sep))]
        if len(hinted) != 1:
            shown = ", ".join(os.path.relpath(p, folder) for p in found[:3])
            raise InputError(f"{len(found)} videos named {base} under {folder} ({shown}); "
                             "give --video-root the folder of this benchmark's videos")
        found = hinted
    return found[0] if found else (path if os.path.splitext(base)[1].lower() in VIDEO_EXTENSIONS else path + ".mp4")


@functools.lru_cache(maxsize=None)
def video_index(folder, depth=3):
    """{file name: [paths], stem + NUL: [paths]} of the video files up to `depth` folders below
    `folder` (symbolic links followed: datasets are often linked in)."""
    index = {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        relative = os.path.relpath(root, folder)
        if relative != "." and relative.count(os.sep) + 1 >= depth:
            dirs[:] = []
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
                path = os.path.join(root, name)
                index.setdefault(name, []).append(path)
                index.setdefault(os.path.splitext(name)[0] + "\0stem", []).append(path)
    return index


def read_bench(spec, fmt, video_root, limit, prompt_style="official"):
    """(name, layout, items, unscorable) of one --bench [NAME=]FILE; the layout is the first record's
    (or `fmt`), and ids are made unique within the benchmark. A published benchmark's record whose
    answer is not among its options is warned about and counted; in the project's own files it is an
    error."""
    name, _, path = spec.rpartition("=") if "=" in spec and not os.path.exists(spec) else ("", "", spec)
    name = name or os.path.splitext(os.path.basename(path))[0]
    items, seen, unscorable = [], {}, 0
    records = load_records(path)
    record_format = fmt if fmt != "auto" else detect_format(records[0][1]) if records else None
    folder, stem = os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(path))[0]
    for where, record in records:
        try:
            item = to_item(record_format, record, where, folder, video_root, prompt_style, stem)
        except UnscorableRecord as e:
            if record_format in ("jsonl", "t3"):
                raise InputError(str(e)) from None
            tqdm.write(f"warning: skipping {e}", file=sys.stderr)
            unscorable += 1
            continue
        seen[item["id"]] = seen.get(item["id"], 0) + 1
        if seen[item["id"]] > 1:
            item["id"] += f"#{seen[item['id']]}"
        item["where"] = where
        items.append(item)
        if limit and len(items) == limit:
            break
    if not items:
        raise InputError(f"{path}: no records")
    return name, record_format, items, unscorable


def check_videos(items, skip_missing, video_root):
    """Items whose video exists; a missing one is an error, or counted with --skip-missing. If no
    video is found at all, the folder is wrong, not the videos: an error either way."""
    kept, missing = [], []
    for bench, item in items:
        (missing if item["video"] is not None and not os.path.isfile(item["video"]) else kept).append((bench, item))
    if not missing:
        return kept, missing
    videos = [item for _, item in items if item["video"] is not None]
    where = f"under {video_root}" if video_root else "beside the benchmark files (or give --video-root)"
    if len(missing) == len(videos):
        raise InputError(f"no video of the {len(videos)} named was found {where}; first: {missing[0][1]['video']}")
    if not skip_missing:
        first = missing[0][1]
        raise InputError(f"{first['where']}: video {first['video']} not found ({len(missing)} of {len(videos)} "
                         "videos are missing; pass --skip-missing to score without them)")
    for _, item in missing:
        tqdm.write(f"warning: skipping {item['where']}: video {item['video']} not found", file=sys.stderr)
    return kept, missing


# ---------------------------------------------------------------- models

def load_variants(args, device):
    """The model with every adapter loaded, and [(name, context that activates it)], base first."""
    model, processor = load_model(args.model, args.four_bit, device)
    variants = [("base", nullcontext)]
    if args.adapters:
        from peft import PeftModel
        for i, (name, folder) in enumerate(args.adapters):
            check_adapter_folder(folder)
            if i == 0:
                model = PeftModel.from_pretrained(model, folder, adapter_name=name)
            else:
                model.load_adapter(folder, adapter_name=name)
        variants = [("base", model.disable_adapter)]
        variants += [(name, lambda name=name: use_adapter(model, name)) for name, _ in args.adapters]
    model.eval()
    return model, processor, variants


@contextmanager
def use_adapter(model, name):
    model.set_adapter(name)
    yield


# ---------------------------------------------------------------- scoring

def batches(items, batch_size):
    """Consecutive items of one benchmark, all with video or all without, batch_size at a time."""
    batch = []
    for entry in items:
        if batch and (len(batch) == batch_size or (batch[0][0], batch[0][1]["video"] is None) != (entry[0], entry[1]["video"] is None)):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


def decode(batch, num_frames, skip_missing, processor):
    """Frames for each item of a batch (None for text-only items); unreadable videos, and videos the
    model's processor refuses, raise or are dropped."""
    kept, frames, bad = [], [], []
    for bench, item in batch:
        try:
            item_frames = None if item["video"] is None else sample_frames(item["video"], num_frames)
            check_video_input(processor, item_frames, item["video"])
            frames.append(item_frames)
            kept.append((bench, item))
        except InputError as e:
            if not skip_missing:
                raise InputError(f"{item['where']}: {e} (or pass --skip-missing)") from None
            tqdm.write(f"warning: skipping {item['where']}: {e}", file=sys.stderr)
            bad.append((bench, item))
    return kept, frames, bad


def score_batch(model, processor, batch, frames, args, device):
    """[(prediction index or None, raw)] for one model variant: raw is the scores or the reply."""
    requests = [(f, item["prompt"]) for f, (_, item) in zip(frames, batch)]
    if args.mode == "loglik":
        scores = choice_logprobs(model, processor, requests, [item["options"] for _, item in batch], device,
                                 [item["labels"] for _, item in batch])
        return [(max(range(len(s)), key=s.__getitem__), {"scores": s}) for s in scores]
    replies = choice_generate(model, processor, requests, device, args.max_new_tokens)
    return [(extract_choice(with_letters(r, item["labels"]), item["options"]), {"reply": r})
            for r, (_, item) in zip(replies, batch)]


def with_letters(reply, labels):
    """A reply with numbered labels ("Option 2", "(2)") read as letters, for options labelled 1, 2, ..."""
    if labels[0] != "1":
        return reply
    return re.sub(r"(?<![\w.,])([1-9])(?![\w,]|\.\d)", lambda m: LETTERS[int(m[1]) - 1] if m[1] in labels else m[0], reply)


def prediction_record(variant, bench, item, predicted, raw):
    record = {"model": variant, "bench": bench, "id": item["id"], "groups": item["groups"],
              "answer": LETTERS[item["answer"]], "prediction": None if predicted is None else LETTERS[predicted],
              "correct": predicted in item["answers"], **raw}
    if len(item["answers"]) > 1:  # options that repeat the answer's text (MLVU): any of them is right
        record["answers"] = [LETTERS[i] for i in item["answers"]]
    return record


# ---------------------------------------------------------------- results

def paired_difference(pairs, z=1.96):
    """Accuracy difference over the same items, from [(mine correct, base correct)]: the difference,
    its 95% interval (Wald with Agresti-Min's 0.5 added to each cell of the 2x2 table, which keeps its
    coverage near 95% at small n; within [-1, 1]) and the exact McNemar p-value (a binomial test on the
    items where the two disagree). Significant only when both say so: the interval excludes 0 and p <
    0.05 (with few items that changed, e.g. 5 gained and none lost, the interval can exclude 0 while
    p = 0.0625)."""
    n = len(pairs)
    gained = sum(m and not b for m, b in pairs)
    lost = sum(b and not m for m, b in pairs)
    g, l, m = gained + 0.5, lost + 0.5, n + 2
    difference = (g - l) / m
    half = z * math.sqrt(max(g + l - (g - l) ** 2 / m, 0.0)) / m
    discordant = gained + lost
    tail = sum(math.comb(discordant, k) for k in range(min(gained, lost) + 1)) / 2 ** discordant
    interval = [round(max(-1.0, difference - half), 4), round(min(1.0, difference + half), 4)]
    p_value = min(1.0, 2 * tail)
    return {"items": n, "gained": gained, "lost": lost, "difference": round((gained - lost) / n, 4) if n else 0.0,
            "interval": interval, "p_value": round(p_value, 4),
            "significant": (interval[0] > 0 or interval[1] < 0) and p_value < 0.05}


def score_cell(predictions, base=None):
    """{correct, total, accuracy, interval, unparsed} of predictions; with the base model's
    predictions by id, also `vs_base`: the paired difference over the items both scored."""
    correct = sum(bool(p["correct"]) for p in predictions)
    total = len(predictions)
    unparsed = sum(p["prediction"] is None for p in predictions)
    cell = {"correct": correct, "total": total, "accuracy": round(correct / total, 4) if total else 0.0,
            "interval": wilson_interval(correct, total), "unparsed": unparsed}
    if base is not None:
        cell["vs_base"] = paired_difference([(bool(p["correct"]), bool(base[p["id"]]["correct"]))
                                             for p in predictions if p["id"] in base])
    return cell


CALIBRATION_MIN_ITEMS = 20  # fewest items whose mean estimates a model's prior over letters


def calibrated(predictions):
    """The log-likelihood predictions made again by batch calibration (calibrated_choices): each model's
    prior over the option letters is estimated over the items of one task type (TempCompass: one task,
    which sets the reply's form: letters, caption numbers or yes/no) with the same number of options,
    or over all the benchmark's items with that many options where the task type has fewer than
    CALIBRATION_MIN_ITEMS. A gain that is only a shift in the favoured letter vanishes here. Left out:
    generated replies, and items of a benchmark with too few items to estimate a prior."""
    pools = {}
    for p in predictions:
        if p.get("scores"):
            key = (p["model"], p["bench"], len(p["scores"]))
            kind = p["groups"].get("task_type", p["groups"].get("task"))
            pools.setdefault(key, {}).setdefault(kind, []).append(p)
    remade = []
    for by_task in pools.values():
        everything = [p for pool in by_task.values() for p in pool]
        if len(everything) < CALIBRATION_MIN_ITEMS:
            continue
        pooled = calibrated_choices([p["scores"] for p in everything])  # the small task types' picks
        start = 0
        for pool in by_task.values():
            own = len(pool) >= CALIBRATION_MIN_ITEMS
            picks = calibrated_choices([p["scores"] for p in pool]) if own else pooled[start:start + len(pool)]
            start += len(pool)
            for p, pick in zip(pool, picks):
                letter = LETTERS[pick]
                remade.append({**p, "prediction": letter, "correct": letter in p.get("answers", [p["answer"]])})
    return remade


def group_order(value):
    """Durations in their natural order: numbers by value, then short < medium < long, then the rest by name."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, ("short", "medium", "long").index(value) if value in ("short", "medium", "long") else 3, value)


def task_mean(groups):
    """The mean of per-group accuracies (each group weighted alike) with a normal 95% interval; each
    group's variance from its Agresti-Coull proportion (2 successes and 2 failures added), so a group
    at 0% or 100% on few items still counts as uncertain."""
    cells = list(groups.values())
    mean = sum(c["accuracy"] for c in cells) / len(cells)
    adjusted = [((c["correct"] + 2) / (c["total"] + 4), c["total"] + 4) for c in cells]
    variance = sum(p * (1 - p) / n for p, n in adjusted) / len(cells) ** 2
    half = 1.96 * math.sqrt(variance)
    return {"accuracy": round(mean, 4), "interval": [round(max(0.0, mean - half), 4), round(min(1.0, mean + half), 4)],
            "groups": len(cells)}


def summarize(predictions, skipped, formats=None):
    """{model: {bench: cell + {skipped, by: {group: {value: cell}}}}}, base first; see score_cell.
    Benchmarks whose official headline averages over tasks (MLVU) also get `task_mean`."""
    scored = {}
    for p in predictions:
        scored.setdefault(p["model"], {}).setdefault(p["bench"], {})[p["id"]] = p
    results = {}
    for model in sorted(scored, key=lambda m: (m != "base", list(scored).index(m))):
        for bench, by_id in scored[model].items():
            base = scored.get("base", {}).get(bench) if model != "base" else None
            items = list(by_id.values())
            entry = {**score_cell(items, base), "skipped": skipped.get(bench, 0), "by": {}}
            for group in sorted({g for p in items for g in p["groups"]}):
                values = sorted({str(p["groups"][group]) for p in items if group in p["groups"]}, key=group_order)
                entry["by"][group] = {v: score_cell([p for p in items if str(p["groups"].get(group)) == v], base)
                                      for v in values}
            if (formats or {}).get(bench) in TASK_MEAN_FORMATS and len(entry["by"].get("task_type", {})) > 1:
                entry["task_mean"] = task_mean(entry["by"]["task_type"])
            results.setdefault(model, {})[bench] = entry
    return results


def format_cell(cell):
    """"52.3 [47.1, 57.4]" and, beside the base model, "+2.7 [-1.0, +6.4] p=0.21" (n.s.: not significant,
    see paired_difference)."""
    if cell is None:
        return "-"
    low, high = cell["interval"]
    text = f"{100 * cell['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    if "vs_base" in cell:
        d = cell["vs_base"]
        low, high = d["interval"]
        p = f"p={d['p_value']:.2g}" if d["p_value"] >= 1e-4 else "p<0.0001"
        text += (f"<br>{100 * d['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}], {p}"
                 + ("" if d["significant"] else " n.s."))
    return text


def results_table(results, recalibrated=None):
    """Markdown: models as rows; one table of benchmarks (then, given `recalibrated`, the same after batch
    calibration, see calibrated), then one per benchmark and grouping."""
    benches = list(dict.fromkeys(b for per_model in results.values() for b in per_model))
    first = {b: next(r[b] for r in results.values() if b in r) for b in benches}

    def table(columns, titles, pick, source=results):
        lines = ["| model | " + " | ".join(titles) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(format_cell(pick(source[m], c)) for c in columns) + " |" for m in source]
        return "\n".join(lines)

    parts = [table(benches, [f"{b} (n={first[b]['total']})" for b in benches], lambda r, b: r.get(b))]
    means = [b for b in benches if "task_mean" in first[b]]
    if means:
        parts.append("Mean over task types (each task weighted alike), beside the pooled accuracy above:\n\n" + table(
            means, [f"{b} ({first[b]['task_mean']['groups']} tasks)" for b in means], lambda r, b: r.get(b, {}).get("task_mean")))
    if recalibrated:
        names = list(dict.fromkeys(b for per_model in recalibrated.values() for b in per_model))
        totals = {b: next(r[b] for r in recalibrated.values() if b in r)["total"] for b in names}
        parts.append("With each model's prior over the option letters divided out (batch calibration: the prior is its "
                     "mean probability for each letter over the items of a task type; no answer is used). A difference "
                     "that holds here is in what the model tells apart, not in which letter it favours:\n\n" + table(
                         names, [f"{b} (n={totals[b]})" for b in names], lambda r, b: r.get(b), recalibrated))
    for bench in benches:
        for group, values in first[bench]["by"].items():
            if len(values) > 1:
                columns = [(group, v) for v in values]
                parts.append(f"**{bench}** by {group}\n\n" + table(
                    columns, [f"{v} (n={values[v]['total']})" for _, v in columns],
                    lambda r, c, bench=bench: r.get(bench, {}).get("by", {}).get(c[0], {}).get(c[1])))
    return "\n\n".join(parts)


def unparsed_lines(results):
    """One line per model and benchmark with replies that name no single option (generate mode)."""
    return [f"{model} on {bench}: {cell['unparsed']} of {cell['total']} replies name no single option "
            f"({100 * cell['unparsed'] / cell['total']:.1f}%), scored wrong"
            for model, benches in results.items() for bench, cell in benches.items() if cell["unparsed"]]


def write_results(out, predictions, skipped, meta):
    results = summarize(predictions, skipped, meta.get("formats"))
    recalibrated = summarize(calibrated(predictions), {}, meta.get("formats"))
    with atomic_write(os.path.join(out, "results.json")) as f:
        json.dump({"meta": meta, "results": results, "calibrated": recalibrated}, f, indent=1)
    table, unparsed = results_table(results, recalibrated), unparsed_lines(results)
    with atomic_write(os.path.join(out, "results.md")) as f:
        f.write("# Temporal benchmarks\n\n"
                "Accuracy in % with its 95% interval (Wilson), n items per column. Beside the base model: the "
                "difference from it on the same items, its 95% interval, and the exact McNemar p-value; "
                "n.s.: not significant (the interval includes 0, or p >= 0.05).\n"
                f"Scoring: {meta.get('mode', '?')}; prompts: {meta.get('prompt', '?')}; "
                f"frames per video: {meta.get('num_frames', '?')}.\n\n{table}\n"
                + ("\nUnparsed replies:\n\n" + "".join(f"- {line}\n" for line in unparsed) if unparsed else "")
                + "".join(f"\n{bench}: {n} records skipped, their answer not among their options\n"
                          for bench, n in meta.get("unscorable", {}).items())
                + "".join(f"\n{bench}: {n} items skipped (video missing or unreadable)\n"
                          for bench, n in skipped.items() if n)
                + (f"\n{len(meta['videos_with_decoder_errors'])} videos have frames that do not decode; the nearest "
                   "frames that do were shown (listed in results.json)\n" if meta.get("videos_with_decoder_errors") else "")
                + "".join(f"\nThe prompt of {bench}'s first item"
                          f"{'' if bench in meta.get('text_only', []) else ' (after the video)'}:\n\n```\n{prompt}\n```\n"
                          for bench, prompt in meta.get("example_prompts", {}).items()))
    for model, benches in results.items():
        for bench, cell in benches.items():
            if cell["unparsed"] == cell["total"]:
                tqdm.write(f"warning: no reply of {model} on {bench} names a single option: its accuracy only "
                           "says that (read the replies in predictions.jsonl)", file=sys.stderr)
    return table + ("\n\n" + "\n".join(unparsed) if unparsed else "")


def run_settings(args):
    """What must match for predictions to be resumed or merged: everything that changes a score."""
    return {"model": args.model, "adapters": dict(args.adapters), "four_bit": args.four_bit, "mode": args.mode,
            "prompt": args.prompt, "format": args.format, "num_frames": args.num_frames,
            "max_new_tokens": args.max_new_tokens if args.mode == "generate" else None,
            "benches": [os.path.abspath(spec.rpartition("=")[2] if "=" in spec and not os.path.exists(spec) else spec)
                        for spec in args.bench], "video_root": args.video_root, "limit": args.limit, "shard": args.shard}


def check_resume(out, settings):
    """InputError unless OUT's earlier run used the same settings (predictions of two settings must not mix)."""
    path = os.path.join(out, "settings.json")
    if not os.path.isfile(path):
        return
    before = json.loads(read_text(path))
    changed = [key for key in settings if before.get(key) != settings[key]]
    if changed:
        shown = "; ".join(f"{k} was {before.get(k)!r}, now {settings[k]!r}" for k in changed)
        raise InputError(f"{out}: scored with other settings ({shown}); resume with the same ones or use another --out")


def merge(args):
    """Join shard folders: every shard of one run, each finished, with the same settings, each item once."""
    predictions, skipped, meta, shards, settings = [], {}, {}, [], []
    for folder in args.merge:
        paths = [os.path.join(folder, n) for n in ("predictions.jsonl", "results.json", "settings.json")]
        for path in paths:
            if not os.path.isfile(path):
                raise InputError(f"{path}: missing; did this shard finish?")
        shard = json.loads(read_text(paths[1]))["meta"]
        shards.append(shard.get("shard", "0/1"))
        settings.append({k: v for k, v in json.loads(read_text(paths[2])).items() if k != "shard"})
        if settings[-1] != settings[0]:
            raise InputError(f"{folder}: scored with other settings than {args.merge[0]} (compare their settings.json)")
        predictions += read_log(paths[0])
        meta = {k: v for k, v in shard.items() if k not in ("shard", "seconds")}
        for bench, count in shard.get("skipped", {}).items():
            skipped[bench] = skipped.get(bench, 0) + count
    count = int(shards[0].split("/")[1])
    if sorted(shards) != sorted(f"{i}/{count}" for i in range(count)):
        raise InputError(f"--merge needs the shards 0/{count} ... {count - 1}/{count} once each; got {', '.join(shards)}")
    keys = [(p["model"], p["bench"], p["id"]) for p in predictions]
    if len(set(keys)) != len(keys):
        raise InputError("the shards score some items twice")
    make_out_dir(args.out)
    write_jsonl(os.path.join(args.out, "predictions.jsonl"), predictions)
    with atomic_write(os.path.join(args.out, "settings.json")) as f:
        json.dump(settings[0], f, indent=1)
    print(write_results(args.out, predictions, skipped, {**meta, "skipped": skipped, "merged": args.merge}))


def read_benches(args):
    """[(name, layout, items, unscorable)] of every --bench, and this shard's (bench name, item) pairs
    that have a video (or need none), and those that do not."""
    benches = [read_bench(spec, args.format, args.video_root, args.limit, args.prompt) for spec in args.bench]
    names = [name for name, *_ in benches]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"several --bench files are named {', '.join(twice)}; give each a name: --bench NAME=FILE")
    items = [(name, item) for name, _, bench_items, _ in benches for item in bench_items][args.shard_index::args.shard_count]
    items, missing = check_videos(items, args.skip_missing, args.video_root)
    return benches, items, missing


def start_predictions(args):
    """(predictions.jsonl path, the predictions already there): settings.json written, a resume checked."""
    make_out_dir(args.out)
    settings = run_settings(args)
    if args.resume:
        check_resume(args.out, settings)
    with atomic_write(os.path.join(args.out, "settings.json")) as f:
        json.dump(settings, f, indent=1)
    path = os.path.join(args.out, "predictions.jsonl")
    predictions = read_log(path) if args.resume else []
    write_jsonl(path, predictions)  # drops a torn last line, or starts afresh without --resume
    return path, predictions


def predict(model, processor, variants, todo, done, path, skipped, args, device):
    """Score every (bench, item) in `todo` with every variant not yet `done`, appending each batch's
    predictions to `path`; counts items without a readable video in `skipped`. The new predictions."""
    predictions = []
    bar = tqdm(total=len(todo), desc=f"eval ({len(variants)} models)", unit="item")
    for batch in batches(todo, args.batch_size):
        batch, frames, bad = decode(batch, args.num_frames, args.skip_missing, processor)  # once for every model
        for bench, _ in bad:
            skipped[bench] = skipped.get(bench, 0) + 1
        new = []
        for variant, active in variants:
            if batch:
                with active():
                    scored = score_batch(model, processor, batch, frames, args, device)
                new += [prediction_record(variant, bench, item, *s) for (bench, item), s in zip(batch, scored)
                        if (variant, bench, item["id"]) not in done]
        append_jsonl(path, new)
        predictions += new
        bar.update(len(batch) + len(bad))
    bar.close()
    return predictions


def run_meta(args, benches, skipped, seconds):
    """What results.json records about the run beside the accuracies."""
    return {"model": args.model, "adapters": dict(args.adapters), "benches": [s for s in args.bench], "mode": args.mode,
            "prompt": args.prompt, "formats": {name: layout for name, layout, _, _ in benches},
            "example_prompts": {name: bench_items[0]["prompt"] for name, _, bench_items, _ in benches},
            "text_only": [name for name, _, bench_items, _ in benches if bench_items[0]["video"] is None],
            "unscorable": {name: n for name, _, _, n in benches if n},
            "num_frames": args.num_frames, "shard": args.shard, "skipped": skipped,
            "videos_with_decoder_errors": sorted(decode_warnings), "seconds": round(seconds, 1)}


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    benches, items, missing = read_benches(args)
    path, predictions = start_predictions(args)
    device = pick_device()
    model, processor, variants = load_variants(args, device)
    done = {(p["model"], p["bench"], p["id"]) for p in predictions}
    todo = [(b, i) for b, i in items if any((v, b, i["id"]) not in done for v, _ in variants)]
    skipped = {}
    for bench, _ in missing:
        skipped[bench] = skipped.get(bench, 0) + 1
    began = time.perf_counter()
    predictions += predict(model, processor, variants, todo, done, path, skipped, args, device)
    meta = run_meta(args, benches, skipped, time.perf_counter() - began)
    print(write_results(args.out, predictions, skipped, meta))
    print(f"results in {args.out}/results.md and results.json; every answer in {path}"
          + (f"; skipped {sum(skipped.values())} items without a readable video" if skipped else "")
          + (f"; skipped {sum(meta['unscorable'].values())} records whose answer is not among their options"
             if meta["unscorable"] else "")
          + (f"; {len(decode_warnings)} videos had frames that do not decode (nearest frames shown instead)"
             if decode_warnings else ""))


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


def parse_shard(parser, shard):
    """(i, n) from a --shard value "i/n"; a usage error unless 0 <= i < n."""
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        parser.error(f"--shard must be i/n with 0 <= i < n, not {shard!r}")
    return index, count


def require_positive(parser, args, *names):
    """A usage error for any of these whole-number options that is given and below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, not {value}")


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


# ---- shared: model (loading a video LLM and its processor, chat encoding) ----
VISION_MODULES = ["model.visual", "model.vision_tower", "model.multi_modal_projector", "lm_head"]
TESTED_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")  # README: "Models"


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(path, four_bit=True, device=None, dtype=None):
    """(model, processor) for any AutoModelForImageTextToText checkpoint. 4-bit NF4 with double
    quantization on the language model only; bf16 compute on CUDA, float32 on the CPU (or `dtype`)."""
    import logging
    import warnings
    # Library notices a user cannot act on: bitsandbytes' hint to install an optional CPU kernel
    # package, and transformers' renames of gradient_checkpointing_* that peft still calls.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing(_enable)?` is deprecated", FutureWarning)
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
    device = device or pick_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=VISION_MODULES) if four_bit else None
    cached_only = check_model_path(path)
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=cached_only)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, quantization_config=quantization, device_map={"": device}, local_files_only=cached_only)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
    check_chat_template(processor, path)
    if hasattr(getattr(processor, "video_processor", None), "cap_pixels_per_frame"):
        processor.video_processor.cap_pixels_per_frame = True  # Qwen-VL: bound a video's pixels as qwen-vl-utils does
    if model.config.model_type not in TESTED_ARCHITECTURES:
        tqdm.write(f"warning: {path}: {model.config.model_type} is not among the architectures the stages are tested "
                   f"on ({', '.join(TESTED_ARCHITECTURES)}); check its prompts and numbers", file=sys.stderr)
    keep_4bit_layout(model)
    return model, processor


def check_adapter_folder(folder):
    """InputError unless `folder` holds a PEFT adapter."""
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise InputError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")


def check_chat_template(processor, path):
    """InputError unless the processor's chat template renders a user turn holding a video and a
    question: a base (not chat) checkpoint, whose template ignores chat messages, or a processor
    without videos fails here in one line instead of prompting the model with the wrong text."""
    question = "Which event happens first?"
    turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    try:
        text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    except Exception as e:
        raise InputError(f"{path}: its chat template cannot render a video question ({str(e).splitlines()[0][:150]})") from None
    video_token = getattr(processor, "video_token", None)
    if question not in text or not video_token or video_token not in text:
        raise InputError(f"{path}: its chat template does not render a chat turn with a video ({type(processor).__name__}); "
                         "give an instruction-tuned checkpoint that takes videos")


def check_model_path(path):
    """Fail in seconds, in one line, where transformers would retry the hub for minutes: a local path
    that does not exist, or a hub id with the hub out of reach and no cached copy. Returns whether
    to load from the cache only (a cached hub model while the hub is out of reach)."""
    if os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path.split("/")[0])
    if os.path.isfile(path):
        raise InputError(f"{path}: a file, not a model folder")
    if looks_local or os.path.exists(path):
        raise InputError(f"{path}: no such model folder")
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        model_info(path, timeout=10)
        return False
    except GatedRepoError:
        return False  # it exists; transformers says what access it needs
    except RepositoryNotFoundError:
        raise InputError(f"{path}: no such model folder, nor a model on the hub") from None
    except Exception:  # the hub is out of reach
        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return True
        raise InputError(f"{path}: no such model folder, and the hub is out of reach to download it") from None


def check_video_input(processor, frames, path):
    """InputError if the model's video processor refuses these frames (e.g. Qwen-VL's aspect-ratio
    limit of 200:1), so such a video is skipped like one that does not decode, not a crash mid-batch."""
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None or frames is None:
        return
    try:
        video_processor(videos=[frames], return_tensors="pt", **video_timing([frames]))
    except Exception as e:
        raise InputError(f"{path}: the model's video processor cannot take it ({str(e).splitlines()[0][:150]})") from None


def video_timing(videos):
    """Processor arguments for frames a stage chose: take them all (no resampling of the processor's
    own), and when each was shown, where every video is a Clip that knows (else processors assume
    24 fps: Qwen3-VL would then drop frames and write wrong timestamps)."""
    if not videos:
        return {}
    metadata = [getattr(video, "metadata", None) for video in videos]
    return {"do_sample_frames": False, **({"video_metadata": metadata} if None not in metadata else {})}


def keep_4bit_layout(model):
    """Keep every 4-bit layer in the one weight layout that all CPUs and GPUs share. On CPUs with
    AVX512-BF16, bitsandbytes repacks a layer for bf16 inference the first time it runs in eval
    mode without gradients; a later backward through it fails (so evaluating, then training,
    breaks) and its bf16 products differ from every other machine's."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
# ---- end shared: model ----


# ---- shared: frames (video decoding in a restartable subprocess) ----
# Decoding runs in a child process: a decoder that hangs (decord issue #373), crashes or leaks
# (#208) costs one video, never the run, and ffmpeg's per-packet complaints stay out of the console.
DECODE_TIMEOUT = float(os.environ.get("DECODE_TIMEOUT", 300))  # seconds per video before it is given up
DECODER_RESTART_EVERY = 500  # videos per decoding process
_decoder = {"process": None, "conn": None, "served": 0}
decode_warnings = {}  # video path -> what went wrong decoding it (each printed once)


class Clip(np.ndarray):
    """Decoded frames [T, H, W, 3] uint8 that remember when they were shown (`metadata`: the video's
    fps, the frame indices, its frame count), so a processor can tell the model real times:
    Qwen2.5-VL's rotary time ids and Qwen3-VL's timestamps in the text. A slice or copy forgets."""

    def __new__(cls, frames, fps, indices, total):
        clip = np.asarray(frames).view(cls)
        clip.metadata = {"fps": fps, "frames_indices": list(indices), "total_num_frames": total}
        return clip

    def __array_finalize__(self, obj):
        self.metadata = None


def sample_frames(path, num_frames, indices=None):
    """uint8 frames [T, H, W, 3]: `num_frames` spread uniformly over the video, or exactly `indices`."""
    return read_frames(path, num_frames, indices)[0]


def read_frames(path, num_frames=0, indices=None):
    """(frames [T, H, W, 3] uint8, a Clip where the video's fps is known; the frame index each shows).
    A frame that does not decode is replaced by the nearest one that does (a uniform pick is spread
    over the decodable frames instead), with a one-line warning per video; a video with no decodable
    frame, or one that takes over DECODE_TIMEOUT seconds, is an InputError. The same file always
    gives the same frames."""
    frames, shown, note, fps, total = _ask_decoder(path, ("frames", path, num_frames, indices))
    if note and path not in decode_warnings:
        decode_warnings[path] = note
        tqdm.write(f"warning: {path}: {note}", file=sys.stderr)
    return (Clip(frames, fps, shown, total) if fps else frames), shown


def uniform_indices(total, count):
    """`count` indices spread evenly over range(total), centred in equal bins."""
    return [min(total - 1, int((i + 0.5) * total / count)) for i in range(count)]


def _ask_decoder(path, request):
    """Send a request to the decoding process (forked on first use, and again after a kill or every
    DECODER_RESTART_EVERY videos) and wait at most DECODE_TIMEOUT seconds for its answer."""
    import multiprocessing
    state = _decoder
    if state["process"] is None or not state["process"].is_alive() or state["served"] >= DECODER_RESTART_EVERY:
        _stop_decoder()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the child never tokenizes: no fork warning
        context = multiprocessing.get_context("fork")
        state["conn"], child_end = context.Pipe()
        state["process"] = context.Process(target=_decoder_loop, args=(child_end,), daemon=True)
        state["process"].start()
        child_end.close()
        state["served"] = 0
    state["conn"].send(request)
    state["served"] += 1
    if not state["conn"].poll(DECODE_TIMEOUT):
        _stop_decoder()
        raise InputError(f"{path}: decoding took over {DECODE_TIMEOUT:.0f} s (set DECODE_TIMEOUT to wait longer)")
    try:
        status, value = state["conn"].recv()
    except (EOFError, OSError):
        _stop_decoder()
        raise InputError(f"{path}: the video decoder crashed on this file") from None
    if status == "error":
        raise InputError(f"{path}: {value}")
    return value


def _stop_decoder():
    if _decoder["process"] is not None:
        _decoder["process"].kill()
        _decoder["process"].join()
        _decoder["conn"].close()
    _decoder.update(process=None, conn=None)


def _decoder_loop(conn):
    """The decoding process: answers requests until the pipe closes; ffmpeg's stderr goes nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    while True:
        try:
            kind, path, num_frames, indices = conn.recv()
        except EOFError:
            return
        try:
            result = _decode(path, num_frames, indices) if kind == "frames" else _length(path)
            conn.send(("ok", result))
        except Exception as e:  # any decoder failure is this video's problem, reported in one line
            conn.send(("error", str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__))


def _decode(path, num_frames, indices):
    """(frames, indices shown, note, fps or None, frame count). decord reads exactly the asked frames
    of a healthy video; if it fails in any way, every frame is decoded in order with PyAV
    (deterministic, where decord's read-ahead makes the failures of a damaged file vary from run to run)."""
    pick = (lambda total: list(indices)) if indices is not None else (lambda total: uniform_indices(total, num_frames))
    try:
        import decord
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        wanted = pick(len(reader))
        if wanted and 0 <= min(wanted) and max(wanted) < len(reader):
            return reader.get_batch(wanted).asnumpy(), wanted, None, reader.get_avg_fps() or None, len(reader)
    except Exception:
        pass
    total, decodable = _decodable_frames(path)
    wanted = pick(total)
    if indices is not None and wanted and not 0 <= min(wanted) <= max(wanted) < total:
        raise ValueError(f"frame {max(wanted)} asked for, but the video has {total} frame{'s' * (total != 1)}")
    missing = sorted({i for i in wanted if i not in decodable})
    note = None
    if missing:
        ordered = sorted(decodable)
        if indices is None:
            wanted = [ordered[i] for i in uniform_indices(len(ordered), num_frames)]
            note = f"{len(ordered)} of {total} frames decode; sampling {num_frames} from those"
        else:
            wanted = [i if i in decodable else min(ordered, key=lambda d: (abs(d - i), d)) for i in wanted]
            note = f"{len(ordered)} of {total} frames decode; frames {missing[:8]} replaced by the nearest that decode"
    return _frames_at(path, wanted), wanted, note, _fps(path), total


def _fps(path):
    """The container's frame rate, or None where it does not say (the frames are used either way)."""
    import av
    try:
        with av.open(path) as container:
            rate = container.streams.video[0].average_rate
        return float(rate) if rate else None
    except Exception:
        return None


def _length(path):
    try:
        import decord
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        if len(reader) and reader.get_batch([len(reader) - 1]).shape[0] == 1:
            return len(reader)
    except Exception:
        pass
    total, decodable = _decodable_frames(path)
    if len(decodable) < total:
        raise ValueError(f"only {len(decodable)} of its {total} frames decode")
    return total


def _decodable_frames(path):
    """(frames the container lists, {index: pts} of those that decode)."""
    listed, decoded, _ = _walk_frames(path, set())
    total = max(listed["count"], len(listed["pts"]))
    index_of = {pts: i for i, pts in enumerate(sorted(listed["pts"]))}
    decodable = {index_of[pts]: pts for pts in decoded if pts in index_of}
    if not decodable:
        raise ValueError("no decodable frames")
    return total, decodable


def _frames_at(path, wanted):
    """The frames at container indices `wanted` (all decodable), in that order."""
    _, decodable = _decodable_frames(path)
    _, _, kept = _walk_frames(path, {decodable[i] for i in wanted})
    return np.stack([kept[decodable[i]] for i in wanted])


def _walk_frames(path, keep):
    """Decode every frame in order with PyAV, going on past errors: ({"pts": listed packet times,
    "count": the container's frame count}, decoded frame times, {time: RGB frame} for times in `keep`)."""
    import av
    listed, decoded, kept = {"pts": [], "count": 0}, set(), {}
    if not os.path.isfile(path):
        raise ValueError("is a directory, not a video" if os.path.isdir(path) else "no such file")
    if os.path.getsize(path) == 0:
        raise ValueError("cannot open video (an empty file)")
    try:
        container = av.open(path)
    except Exception as e:
        raise ValueError(f"cannot open video ({getattr(e, 'strerror', None) or str(e).splitlines()[0][:120]})") from None
    with container:
        if not container.streams.video:
            raise ValueError("cannot open video (no video stream)")
        stream = container.streams.video[0]
        listed["count"] = stream.frames
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except Exception:  # StopIteration, or a container cut short
                break
            if packet.pts is not None:
                listed["pts"].append(packet.pts)
            try:
                for frame in packet.decode():
                    decoded.add(frame.pts)
                    if frame.pts in keep and frame.pts not in kept:
                        kept[frame.pts] = frame.to_ndarray(format="rgb24")
            except Exception:  # a damaged packet: its frames are lost, the rest go on
                continue
    return listed, decoded, kept
# ---- end shared: frames ----


# ---- shared: logs (JSONL logs that survive a crash) ----
def read_log(path):
    """Records of an append-only JSONL log; a torn last line (a kill mid-write) is ignored."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def write_jsonl(path, records):
    """Replace `path` with these records, atomically."""
    with atomic_write(path) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def append_jsonl(path, records):
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
# ---- end shared: logs ----


# ---- shared: chat (batched chat prompts) ----
def chat_inputs(processor, requests, device):
    """Left-padded model inputs for requests [(frames or None, text)], ready for the reply.
    A batch must be all video or all text (processors pair videos with placeholders in order)."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": ([{"type": "video"}] if frames is not None else []) + [{"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False) for frames, text in requests]
    videos = [frames for frames, _ in requests if frames is not None] or None
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, videos=videos, padding=True, return_tensors="pt", **video_timing(videos)).to(device)
# ---- end shared: chat ----


# ---- shared: choice (multiple-choice prompts, scoring and answer parsing) ----
LETTERS = "ABCDEFGHIJ"
YES_NO = ("yes", "no")
# Words after which "A" (or "I") is still a letter, not the article (or the pronoun): "A or B", "A is right".
LETTER_FOLLOWERS = {"or", "and", "nor", "is", "was", "seems", "appears", "fits", "matches", "because", "since", "but",
                    "as", "vs", "versus", "best", "correctly", "then"}
# "The answer is b", "Option (C)", "I would choose B": a letter given as the answer.
STATED_ANSWER = (r"(?i:answer|option|choice|choose|pick|select|go with)(?:\s+(?i:is|would be|should be|will be))?"
                 r"\s*[:=]?\s*[\[(]?([A-Ja-j])(?=[\]).,:;!?]|\s*$|\s)")
YES_WORDS = {"yes", "yeah", "yep", "yup", "true"}
NO_WORDS = {"no", "nope", "nah", "false"}


def is_yes_no(options):
    return tuple(o.strip().lower() for o in options) == YES_NO


def choice_prompt(question, options):
    """The question with lettered options and the instruction lmms-eval uses (or a yes/no one)."""
    if is_yes_no(options):
        return f"{question}\nPlease answer yes or no."
    lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join([question, *lines, "Answer with the option's letter from the given choices directly."])


def reply_token_ids(tokenizer, options, labels=LETTERS):
    """Per option, the first token of each reply that picks it: its label (a letter), or yes/no in either case."""
    replies = [(w, w.capitalize()) for w in YES_NO] if is_yes_no(options) else [(L,) for L in labels[:len(options)]]
    return [sorted({tokenizer(r, add_special_tokens=False)["input_ids"][0] for r in variants}) for variants in replies]



@torch.no_grad()
def choice_logprobs(model, processor, requests, options, device, labels=None):
    """Per request, the log-probability of each option's reply as the first answer token (`labels`:
    per request, the options' labels when they are not A, B, C ...)."""
    inputs = chat_inputs(processor, requests, device)
    last = torch.log_softmax(model(**inputs, logits_to_keep=1).logits[:, -1].float(), -1)
    return [[round(float(torch.logsumexp(row[ids], 0)), 5) for ids in reply_token_ids(processor.tokenizer, opts, marks)]
            for row, opts, marks in zip(last, options, labels or [LETTERS] * len(options))]


def calibrated_choices(score_lists):
    """Batch calibration (Zhou et al., ICLR 2024): the option each item's scores (choice_logprobs; all
    items with the same number of options) pick once the model's prior over the option letters is
    divided out, that prior being its mean probability for each letter over these items. No answer is
    used: a model that tells the options apart keeps its picks, one that favours a letter is left with
    what it tells apart."""
    probabilities = [torch.softmax(torch.tensor(scores, dtype=torch.float64), 0) for scores in score_lists]
    prior = torch.stack(probabilities).mean(0)
    return [int(torch.argmax(p / prior)) for p in probabilities]


@torch.no_grad()
def choice_generate(model, processor, requests, device, max_new_tokens=32):
    """Greedy replies to requests [(frames or None, text)]."""
    inputs = chat_inputs(processor, requests, device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip()
            for row in output[:, inputs["input_ids"].shape[1]:]]


def extract_choice(reply, options):
    """Index of the option a free-form reply picks, or None when it picks none or several.
    Multiple choice: the letters the reply states as its answer ("B", "(c)", "b)", "The answer is b",
    "Option B"); else the letters it mentions ("... so (B) fits"), never the article "A"; else the one
    option whose whole text it quotes. Two or more different letters, or options, and no single one
    stated: None. Yes/no: the reply's first word, or a yes/no after a comma ("Based on the video, yes.")."""
    text = re.sub(r"[*_`#]+", "", reply).strip(" \t\n'\"“”‘’")
    if is_yes_no(options):
        return yes_no_choice(text.lower())
    valid = LETTERS[:len(options)]
    for letters in (stated_letters(text), mentioned_letters(text)):
        if letters:
            if len(letters) > 1 or not letters <= set(valid):
                return None
            chosen = valid.index(letters.pop())
            quoted = re.match(rf"\W*{valid[chosen]}[.):]\s*(.+?)[.!]?\s*(?:\n|$)", text)  # "B. <text of option A>"
            others = [o.strip().lower() for i, o in enumerate(options) if i != chosen]
            return None if quoted and quoted[1].strip().lower() in others else chosen
    named = [i for i, o in enumerate(options) if o.strip() and re.search(
        rf"(?<!\w){re.escape(o.strip().rstrip('.'))}(?!\w)", text, re.I)]
    named = [i for i in named if not any(j != i and options[i].strip().lower() in options[j].lower() for j in named)]
    return named[0] if len(named) == 1 else None


def is_letter_at(text, end):
    """Whether the single capital letter just before `end` names an option: "A" and "I" followed by
    another word are the article and the pronoun, unless the word joins options ("A or B")."""
    letter, word = text[end - 1], re.match(r"[ \t]+([A-Za-z]+)", text[end:])
    return not (letter in "AIai" and word and word[1].lower() not in LETTER_FOLLOWERS)


def stated_letters(text):
    """Upper-case letters of the options a reply states as its answer."""
    found = set()
    opening = re.match(r"[\[(]?([A-J])(?:[\]).:,;\-]|\s*$|\s*\n|(?=[ \t]))", text)
    if opening and is_letter_at(text, opening.end(1)) and not re.match(r"\W*(?:and|or|nor|vs)\b|\s*/", text[opening.end():]):
        found.add(opening[1])
    lower = re.fullmatch(r"[\[(]?([a-j])(?:[\]).:,]\s*.*|)", text, re.S)  # "b", "(c)", "c) the dog runs"
    if lower and (lower[1] != "a" or len(text) <= 3 or text[1] in ").:,]"):
        found.add(lower[1].upper())
    for m in re.finditer(STATED_ANSWER, text):
        if is_letter_at(text, m.end(1)):
            found.add(m[1].upper())
    return found


def mentioned_letters(text):
    """Upper-case letters a reply mentions as options: "(B)", "[c]", "B." or a standalone "B"."""
    found = {m[1].upper() for m in re.finditer(r"[\[(]([A-Ja-j])[\])]", text)}
    for m in re.finditer(r"(?<![\w'’-])([A-J])(?![\w'’-])", text):
        if is_letter_at(text, m.end(1)):
            found.add(m[1])
    return found


def yes_no_choice(text):
    """0 (yes), 1 (no) or None, from a lower-cased reply."""
    if re.search(r"\b(?:yes|no)\b\W*(?:and|or)\W*\b(?:yes|no)\b", text):
        return None
    first = re.match(r"\W*([a-z]+)(?:\W+([a-z]+))?", text)
    if first and first[1] in YES_WORDS:
        return 0
    if first and (first[1] in NO_WORDS or first[1] == "not" and first[2] in ("really", "at", "quite", "exactly")):
        return 1
    stated = {m[1] in NO_WORDS for m in re.finditer(r"(?:answer is|answer:|[,.;:!?]\s*)\W*(yes|no)\b", text)}
    return int(stated.pop()) if len(stated) == 1 else None
# ---- end shared: choice ----


# ---- shared: stats (Wilson intervals) ----
def wilson_interval(correct, total, z=1.96):
    """95% Wilson score interval of a proportion (sound for small n and for 0 or n successes)."""
    if total == 0:
        return [0.0, 1.0]
    p, spread = correct / total, z * z / total
    centre = (p + spread / 2) / (1 + spread)
    half = z * math.sqrt(p * (1 - p) / total + spread / (4 * total)) / (1 + spread)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]
# ---- end shared: stats ----


if __name__ == "__main__":
    run_main(main)
