"""Stage 04: temporal preference pairs that the model builds for itself (TPO).

Localized pairs: the model captions a short segment from that segment's frames, writes a
question only that segment answers, and answers it twice: from the segment's frames
(chosen) and from frames that miss the segment (rejected): the rest of the video
("irrelevant") or a random sparse subset of it ("incomplete"). Comprehensive pairs: a
question about the whole video, answered from dense frames (chosen) and from sparsely
downsampled frames (rejected). Cheap rules, then the model as a judge, filter the pairs.

Usage:
    python 04_build_pairs.py --model M [--adapter DIR] --videos DIR_OR_JSONL --out runs/04
        [--num-pairs 1000] [--ratio 5:5] [--num-frames 16] [--sparse-frames 4]
        [--negatives irrelevant,incomplete] [--shard i/n] [--resume]
    merge shards:  cat runs/04-shard-*/pairs.jsonl > runs/04-merged/pairs.jsonl

A video list (JSONL) may give a whole-video question for the comprehensive pairs, and with it
`options`: the question is then asked as multiple choice (lettered options, as stage 06 asks),
and an answer that picks no option drops the attempt. Its `answer`, if given, is never used to
make or keep a pair: stats.json audits the kept pairs against it (how often the chosen answer,
and the rejected one, is right).

Writes OUT/pairs.jsonl (appended as pairs are made), OUT/attempts.jsonl (every attempt
and why it was dropped; --resume skips finished ones) and OUT/stats.json. Each pair's
`video` is relative to OUT, so shard folders and the merged folder must be siblings.
"""
import argparse
import difflib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import TypedDict

import numpy as np
import torch
from tqdm import tqdm

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv")
CAPTION_PROMPT = "Describe what happens in this video clip in one sentence."
QUESTION_PROMPT = ('Here is a description of a short moment in a video: "{caption}"\n'
                   "Write one question about this moment that can only be answered by watching it. "
                   "Reply with the question only.")
WHOLE_VIDEO_CAPTION_PROMPT = "Describe everything that happens in this video, from beginning to end, in order."
WHOLE_VIDEO_QUESTION_PROMPT = ('Here is a description of a whole video: "{caption}"\n'
                               "Write one question about how the events of the whole video unfold over time, one "
                               "that needs the entire video to answer. Reply with the question only.")
WHOLE_VIDEO_QUESTIONS = [  # fallbacks when the model writes no usable question (counted in stats.json)
    "What happens in this video, from beginning to end?",
    "Describe the events of this video in the order they happen.",
    "How does the scene change over the course of the video?",
    "What is the sequence of actions in this video?",
]
JUDGE_PREFERENCE = ("Question: {question}\n{context}Answer A: {first}\nAnswer B: {second}\n"
                    "Which answer is more accurate and more specific? Reply with A or B.")
JUDGE_ANSWERABLE = ('Description of a video moment: "{caption}"\nQuestion: {question}\n'
                    "Can the question be answered from this description? Reply yes or no.")
DROP_RULES = ["unreadable_video", "empty", "not_an_option", "identical", "near_identical", "truncated", "judge_prefers_rejected",
              "unanswerable", "surplus"]


class Video(TypedDict, total=False):
    """A video to make pairs from (list_videos); `frames` is added once it is measured (usable_videos)."""
    id: str
    path: str
    caption: str  # optional, from a JSONL list
    question: str  # optional: a whole-video question to ask instead of one the model writes
    options: list  # optional, with a question: asked as multiple choice
    answer: int  # optional, with options: the right option's index, only to audit the pairs
    frames: int


class Attempt(TypedDict, total=False):
    """One try at a preference pair, as it passes through the phases: planned (plan_attempt), then
    captioned, questioned and answered (write_questions, answer_and_filter), then filtered (dropped_by
    and the judge's margins). Later phases add their keys."""
    slot: int
    id: str  # "{video id}:{kind}:{slot}"
    kind: str  # "localized" or "comprehensive"
    video: Video
    negative: str  # how the rejected answer's frames were chosen: "irrelevant" or "incomplete"
    frames: dict  # frame indices per view: train, chosen, rejected (and the localized segment)
    segment: list  # [start, end) frames of a localized attempt's moment
    question: str  # None until written
    fallback_question: str  # a comprehensive attempt's template question
    question_source: str  # "generated", "template" or "given"
    judge_order: bool  # whether the judge sees the chosen answer first
    caption: str
    chosen: str
    rejected: str
    choices: dict  # for a multiple-choice question: the option index each answer picks (None: no option)
    truncated: bool
    dropped_by: str  # the rule that dropped it, or None if kept
    judge_margin: float
    answerable_margin: float


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or hub id (AutoModelForImageTextToText)")
    p.add_argument("--adapter", help="a PEFT adapter to apply (e.g. the T3 adapter of stage 03)")
    p.add_argument("--videos", required=True, help="a folder (searched recursively) or a JSONL of {id, video[, caption, "
                   "question[, options[, answer]]]}: a question given is asked for the comprehensive pairs, as multiple "
                   "choice if it has options, and the caption, describing the whole video, is what the judge reads "
                   "of it; an answer only audits the pairs (stats.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-pairs", type=int, default=1000, help="pairs to keep (in this shard)")
    p.add_argument("--ratio", default="5:5", help="localized:comprehensive pairs (default 5:5)")
    p.add_argument("--num-frames", type=int, default=16, help="dense frames: the whole video, and a segment")
    p.add_argument("--sparse-frames", type=int, default=4, help="frames of a sparse (incomplete) view")
    p.add_argument("--segment-fraction", type=float, default=0.25, help="length of a localized segment, as a share of the video")
    p.add_argument("--negatives", default="irrelevant,incomplete", help="rejected views for localized pairs")
    p.add_argument("--max-attempts", type=float, default=4.0, help="give up after this many attempts per wanted pair")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: seeded sampling")
    p.add_argument("--batch-size", type=int, default=4, help="attempts generated together")
    p.add_argument("--near-identical", type=float, default=0.9, help="drop pairs whose answers are this similar (0-1)")
    p.add_argument("--no-judge", dest="judge", action="store_false", help="keep the cheap rules only")
    p.add_argument("--shard", default="0/1", help="i/n: take every n-th video starting at i")
    p.add_argument("--resume", action="store_true", help="continue OUT/attempts.jsonl, skipping finished attempts")
    p.add_argument("--no-4bit", dest="four_bit", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    require_positive(p, args, "num_pairs", "num_frames", "sparse_frames", "max_new_tokens", "batch_size")
    try:
        local, comprehensive = (float(x) for x in args.ratio.split(":"))
    except ValueError:
        p.error(f"--ratio must look like 5:5, not {args.ratio!r}")
    if not (0 <= local < math.inf and 0 <= comprehensive < math.inf and local + comprehensive > 0):
        p.error(f"--ratio must look like 5:5, not {args.ratio!r}")
    args.local_share = local / (local + comprehensive)
    args.negatives = [n for n in args.negatives.split(",") if n]
    if not args.negatives or set(args.negatives) - {"irrelevant", "incomplete"}:
        p.error("--negatives takes irrelevant and/or incomplete")
    args.shard_index, args.shard_count = parse_shard(p, args.shard)
    if args.sparse_frames < 1 or args.num_frames < 2 or args.sparse_frames >= args.num_frames:
        p.error("need 1 <= --sparse-frames < --num-frames")
    return args


# ---------------------------------------------------------------- videos in

def list_videos(source) -> list[Video]:
    """[{id, path, caption?, question?, options?, answer?}] from a folder (recursively) or a JSONL, sorted by id."""
    if os.path.isdir(source):
        videos = [{"id": os.path.relpath(os.path.join(root, name), source), "path": os.path.abspath(os.path.join(root, name))}
                  for root, _, files in os.walk(source) for name in files if name.lower().endswith(VIDEO_EXTENSIONS)]
        if not videos:
            raise InputError(f"{source}: no video files ({' '.join(VIDEO_EXTENSIONS)})")
    elif os.path.isfile(source):
        videos, first_line = [], {}
        for number, record in read_jsonl(source):
            if not isinstance(record.get("id"), (str, int)) or not isinstance(record.get("video"), str):
                raise InputError(f"{source}:{number}: record needs 'id' and a 'video' path")
            if str(record["id"]) in first_line:
                raise InputError(f"{source}:{number}: id {str(record['id'])!r} is already on line {first_line[str(record['id'])]}")
            first_line[str(record["id"])] = number
            path = os.path.join(os.path.dirname(os.path.abspath(source)), record["video"])
            videos.append({"id": str(record["id"]), "path": path,
                           **{k: record[k] for k in ("caption", "question") if isinstance(record.get(k), str)},
                           **multiple_choice(record, f"{source}:{number}")})
        if not videos:
            raise InputError(f"{source}: no records")
    else:
        raise InputError(f"{source}: no such folder or file")
    return sorted(videos, key=lambda v: v["id"])


def multiple_choice(record, where):
    """{options, answer?} of a video list record whose question has options; {} without options."""
    options, answer = record.get("options"), record.get("answer")
    if isinstance(record.get("question"), str) and not record["question"].strip():
        raise InputError(f"{where}: 'question' is empty")
    if options is None:
        if answer is not None:
            raise InputError(f"{where}: 'answer' needs 'options'")
        return {}
    if not isinstance(record.get("question"), str):
        raise InputError(f"{where}: 'options' need a 'question' (a string)")
    if not (isinstance(options, list) and 2 <= len(options) <= len(LETTERS)
            and all(isinstance(o, str) and o.strip() for o in options)):
        raise InputError(f"{where}: 'options' must be a list of 2 to {len(LETTERS)} non-empty strings")
    texts = [o.strip().lower() for o in options]
    if len(set(texts)) < len(texts):  # the audit could not tell which of two alike options an answer picks
        raise InputError(f"{where}: two options are the same")
    if answer is None:
        return {"options": options}
    letters = LETTERS[:len(options)]
    as_letter = letters.find(answer.strip().upper()) if isinstance(answer, str) and len(answer.strip()) == 1 else -1
    as_text = texts.index(answer.strip().lower()) if isinstance(answer, str) and answer.strip().lower() in texts else -1
    if as_letter >= 0 and as_text >= 0 and as_letter != as_text:
        raise InputError(f"{where}: 'answer' {answer!r} is option {letters[as_letter]}'s letter and option "
                         f"{letters[as_text]}'s text; give the letter of the one meant")
    if max(as_letter, as_text) < 0:
        raise InputError(f"{where}: 'answer' must be one of the letters {', '.join(letters)} or an option's text, "
                         f"not {answer!r}")
    return {"options": options, "answer": max(as_letter, as_text)}


def usable_videos(videos, min_frames, show):
    """Videos whose frames decode, with their real frame count; one warning line per bad one."""
    usable, bad = [], []
    for video in tqdm(videos, desc="probe videos", unit="video", disable=not show):
        try:
            total = video_length(video["path"])
            if total < min_frames:
                raise InputError(f"{video['path']}: only {total} decodable frames, need {min_frames}")
            usable.append(dict(video, frames=total))
        except InputError as e:
            tqdm.write(f"warning: skipping {e}", file=sys.stderr)
            bad.append(video["id"])
    return usable, bad


# ---------------------------------------------------------------- attempts: which frames each answer sees

def slot_kind(slot, local_share):
    """Localized or comprehensive, interleaved evenly at the asked ratio along consecutive slots."""
    return "localized" if int((slot + 1) * local_share) > int(slot * local_share) else "comprehensive"


def slot_plan(slot, num_videos, local_share, seed):
    """(video index, kind) of an attempt slot. Slots visit every video once per round (in a seeded
    order each round); each video's own rounds interleave the kinds at the asked ratio from a seeded
    phase, so every video gives both kinds in proportion, whatever the number of videos."""
    round_, position = divmod(slot, num_videos)
    order = list(range(num_videos))
    random.Random(f"{seed}:round:{round_}").shuffle(order)
    video = order[position]
    phase = random.Random(f"{seed}:phase:{video}").randrange(1 << 16)
    return video, slot_kind(round_ + phase, local_share)


def jittered_indices(total, count, rng):
    """`count` frame indices, one drawn uniformly inside each of `count` equal bins of range(total)."""
    return [min(total - 1, int((i + rng.random()) * total / count)) for i in range(count)]


def plan_attempt(slot, video, kind, args, retry=0) -> Attempt:
    """Everything random about one attempt, from (seed, slot, retry) alone: which frames each answer
    sees (jittered, so attempts on one video differ) and, for a comprehensive attempt, its fallback question."""
    rng = random.Random(f"{args.seed}:{slot}" + (f":{retry}" if retry else ""))
    total, dense = video["frames"], args.num_frames
    attempt: Attempt = {"slot": slot, "kind": kind, "video": video}
    train = jittered_indices(total, dense, rng)
    if kind == "comprehensive":
        sparse = jittered_indices(total, args.sparse_frames, rng)
        fallback = rng.choice(WHOLE_VIDEO_QUESTIONS)
        given = video.get("question")
        if given and video.get("options"):
            given = choice_prompt(given, video["options"])
        if given and video.get("caption"):  # no caption is written for a given question: the judge reads this one
            attempt["caption"] = video["caption"]
        attempt.update(negative="incomplete", question=given, fallback_question=fallback,
                       question_source="given" if given else None,
                       frames={"train": train, "chosen": train, "rejected": sparse})
    else:
        length = max(2, round(total * args.segment_fraction))
        start = rng.randrange(0, total - length + 1)
        segment = [start, start + length]  # frames [start, end)
        inside = [start + i for i in jittered_indices(length, min(length, dense), rng)]
        outside = [i for i in range(total) if not start <= i < start + length]
        negative = rng.choice(args.negatives)
        if negative == "irrelevant":
            rejected = [outside[i] for i in jittered_indices(len(outside), min(len(outside), dense), rng)]
        else:
            rejected = sorted(rng.sample(outside, min(len(outside), args.sparse_frames)))
        if not any(start <= i < start + length for i in train):  # the training view must show the segment
            train[min(range(dense), key=lambda k: abs(train[k] - (start + length // 2)))] = start + length // 2
            train.sort()
        attempt.update(negative=negative, segment=segment, question=None, question_source="generated",
                       frames={"train": train, "chosen": inside, "rejected": rejected, "segment": segment})
    attempt["id"] = f"{video['id']}:{kind}:{slot}"
    attempt["judge_order"] = rng.random() < 0.5  # whether the chosen answer is shown to the judge first
    return attempt


def fresh_attempt(slot, video, kind, args, taken):
    """plan_attempt, drawn again (up to 20 times) until the frames it shows are new for this video, so
    no two attempts share their inputs; None when the video has no new view left. Every slot is planned
    in order, attempted or not, so a resumed run plans exactly as the first."""
    for retry in range(20):
        attempt = plan_attempt(slot, video, kind, args, retry)
        key = (video["id"], kind, json.dumps(attempt["frames"], sort_keys=True))
        if key not in taken:
            taken.add(key)
            return attempt
    return None


# ---------------------------------------------------------------- the model, batched

def batched(requests, batch_size):
    """Groups of request indices with the same number of frames (some processors stack videos)."""
    by_shape = {}
    for i, (frames, _) in enumerate(requests):
        by_shape.setdefault(None if frames is None else len(frames), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start:start + batch_size]


@torch.no_grad()
def generate(model, processor, requests, args, device):
    """[(text, truncated)] for requests [(frames or None, prompt)], batched: greedy, or plain sampling at
    --temperature (the checkpoint's own top-k/top-p filters, e.g. Qwen2-VL's top_k=1, would make it greedy)."""
    results = [None] * len(requests)
    stops = stop_token_ids(model, processor.tokenizer)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 1.0} if args.temperature > 0 \
        else {"do_sample": False}
    for indices in batched(requests, args.batch_size):
        inputs = chat_inputs(processor, [requests[i] for i in indices], device)
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling)
        for i, row in zip(indices, output[:, inputs["input_ids"].shape[1]:].tolist()):
            end = next((n for n, token in enumerate(row) if token in stops), None)
            results[i] = (processor.tokenizer.decode(row[:end], skip_special_tokens=True).strip(), end is None)
    return results


def stop_token_ids(model, tokenizer):
    """Every token that ends a reply: the tokenizer's end of turn and the checkpoint's generation
    stops (Qwen-VL stops at <|im_end|> and at <|endoftext|>)."""
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [] if stops is None else [stops]
    return set(stops) | {tokenizer.eos_token_id}


@torch.no_grad()
def judge_logprobs(model, processor, requests, choices, args, device):
    """For each request (frames or None, prompt), the log-probability of each choice's first token as the reply."""
    ids = [processor.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    scores = [None] * len(requests)
    for indices in batched(requests, args.batch_size):
        inputs = chat_inputs(processor, [requests[i] for i in indices], device)
        last = torch.log_softmax(model(**inputs).logits[:, -1].float(), -1)[:, ids]
        for i, row in zip(indices, last.tolist()):
            scores[i] = row
    return scores


def hash_seed(*parts):
    return int.from_bytes(random.Random(":".join(map(str, parts))).randbytes(4), "big")


def similarity(a, b):
    return difflib.SequenceMatcher(None, a.lower().split(), b.lower().split()).ratio()


def run_attempts(model, processor, attempts: list[Attempt], args, device) -> list[Attempt]:
    """Generate captions, questions and both answers for a group of attempts, then filter them.
    Returns the attempts, each with `dropped_by`: the rule that dropped it, or None if kept."""
    frames_of = {}
    for a in attempts:  # decode first; a frame that fails to decode is replaced: record what was shown
        try:
            for which in ("chosen", "rejected"):
                frames_of[a["id"], which], a["frames"][which] = read_frames(a["video"]["path"], 0, a["frames"][which])
                check_video_input(processor, frames_of[a["id"], which], a["video"]["path"])
        except InputError as e:
            tqdm.write(f"warning: dropping attempt {a['id']}: {e}", file=sys.stderr)
            a["dropped_by"] = "unreadable_video"
    readable = [a for a in attempts if a.get("dropped_by") != "unreadable_video"]
    answer_and_filter(model, processor, readable, frames_of, args, device)
    return attempts


def write_questions(model, processor, attempts: list[Attempt], frames, args, device):
    """The model captions what each attempt's chosen frames show (a localized segment, or the whole
    video densely) and writes a question from that caption: about the moment, or about the course of
    the whole video. A comprehensive attempt whose question comes out empty or cut off takes its
    planned template question instead (counted as `template`); one with a question given in the
    video list keeps it."""
    to_write = [a for a in attempts if a["question"] is None]
    local = lambda a: a["kind"] == "localized"
    captions = generate(model, processor, [(frames(a, "chosen"), CAPTION_PROMPT if local(a) else WHOLE_VIDEO_CAPTION_PROMPT)
                                           for a in to_write], args, device)
    for a, caption_and_cut in zip(to_write, captions):  # a caption only feeds the question and the judge:
        a["caption"], a["truncated"] = caption_and_cut[0], False  # cut short, it is still a description
    questions = generate(model, processor, [(None, (QUESTION_PROMPT if local(a) else WHOLE_VIDEO_QUESTION_PROMPT).format(
        caption=a["caption"])) for a in to_write], args, device)
    for a, (question, cut) in zip(to_write, questions):
        if local(a):
            a["question"], a["truncated"] = question, a["truncated"] or cut
        elif question.strip() and not cut:
            a["question"], a["question_source"] = question, "generated"
        else:
            a["question"], a["question_source"] = a["fallback_question"], "template"


def answer_and_filter(model, processor, attempts: list[Attempt], frames_of, args, device):
    """Captions, questions and both answers from the decoded frames, then the rules and the judge."""
    frames = lambda a, which: frames_of[a["id"], which]
    write_questions(model, processor, attempts, frames, args, device)
    asked = [a for a in attempts if a["question"].strip()]
    answers = generate(model, processor, [(frames(a, side), a["question"]) for a in asked for side in ("chosen", "rejected")],
                       args, device)
    for n, a in enumerate(asked):
        (a["chosen"], chosen_cut), (a["rejected"], rejected_cut) = answers[2 * n], answers[2 * n + 1]
        a["truncated"] = a.get("truncated", False) or chosen_cut or rejected_cut
    for a in attempts:  # cheap rules first
        a.setdefault("truncated", False)
        options = a["video"].get("options") if a["question_source"] == "given" else None
        if options and a.get("chosen") and a.get("rejected"):
            a["choices"] = {side: extract_choice(a[side], options) for side in ("chosen", "rejected")}
        if not a["question"].strip() or not a.get("chosen") or not a.get("rejected") or (a["kind"] == "localized" and not a["caption"]):
            a["dropped_by"] = "empty"
        elif options and None in a["choices"].values():  # e.g. a letter past the options: a lesson in format, not time
            a["dropped_by"] = "not_an_option"
        elif a["chosen"] == a["rejected"] or options and a["choices"]["chosen"] == a["choices"]["rejected"]:
            a["dropped_by"] = "identical"
        elif similarity(a["chosen"], a["rejected"]) >= args.near_identical:
            a["dropped_by"] = "near_identical"
        elif a["truncated"]:
            a["dropped_by"] = "truncated"
        else:
            a["dropped_by"] = None
    judged = [a for a in attempts if a["dropped_by"] is None]
    if args.judge and judged:
        requests = []
        for a in judged:  # a localized pair is judged on its moment's frames and caption; a comprehensive one on text
            first, second = (a["chosen"], a["rejected"]) if a["judge_order"] else (a["rejected"], a["chosen"])
            context = f'Description of the {"moment" if a["kind"] == "localized" else "video"}: "{a["caption"]}"\n' \
                if a.get("caption") else ""
            prompt = JUDGE_PREFERENCE.format(question=a["question"], context=context, first=first, second=second)
            requests.append((frames(a, "chosen") if a["kind"] == "localized" else None, prompt))
        for a, (score_a, score_b) in zip(judged, judge_logprobs(model, processor, requests, ["A", "B"], args, device)):
            a["judge_margin"] = (score_a - score_b) if a["judge_order"] else (score_b - score_a)
            if a["judge_margin"] < 0:
                a["dropped_by"] = "judge_prefers_rejected"
        local_judged = [a for a in judged if a["kind"] == "localized" and a["dropped_by"] is None]
        requests = [(None, JUDGE_ANSWERABLE.format(caption=a["caption"], question=a["question"])) for a in local_judged]
        for a, (yes, no) in zip(local_judged, judge_logprobs(model, processor, requests, ["yes", "no"], args, device)):
            a["answerable_margin"] = yes - no
            if yes < no:
                a["dropped_by"] = "unanswerable"


def pair_record(a: Attempt, out_dir):
    """The line of pairs.jsonl for a kept attempt (the format stage 05 reads)."""
    record = {"id": a["id"], "video": os.path.relpath(a["video"]["path"], os.path.abspath(out_dir)),
              "prompt": a["question"], "chosen": a["chosen"], "rejected": a["rejected"],
              "kind": a["kind"], "negative": a["negative"], "frames": a["frames"],
              "num_video_frames": a["video"]["frames"], "question": a["question"],
              "question_source": a["question_source"]}
    if a.get("caption"):
        record["caption"] = a["caption"]
    if "choices" in a:  # a multiple-choice question: the options and the letters the answers pick
        record["options"] = a["video"]["options"]
        record["choices"] = {side: LETTERS[i] for side, i in a["choices"].items()}
        if "answer" in a["video"]:  # given with the video, never used to make or keep the pair
            record["answer"] = LETTERS[a["video"]["answer"]]
    for key in ("judge_margin", "answerable_margin"):
        if key in a:
            record[key] = round(a[key], 4)
    return record


# ---------------------------------------------------------------- logs that survive a kill

def restore(out_dir):
    """Finished attempts and kept pairs from an earlier run, made consistent with each other:
    a pair counts only if its attempt is logged, and a kept attempt only if its pair is there."""
    pairs = {p["id"]: p for p in read_log(os.path.join(out_dir, "pairs.jsonl"))}
    attempts = [a for a in read_log(os.path.join(out_dir, "attempts.jsonl")) if a["kept"] is False or a["id"] in pairs]
    kept = {a["id"] for a in attempts if a["kept"]}
    return attempts, [p for pid, p in pairs.items() if pid in kept]


def answers_right(a: Attempt):
    """{"right": {chosen, rejected}}: whether each answer picks the video's given answer; {} when none is given."""
    if "choices" not in a or "answer" not in a["video"]:
        return {}
    return {"right": {side: choice == a["video"]["answer"] for side, choice in a["choices"].items()}}


def audit(kept):
    """How often the kept pairs' chosen and rejected answers are right, where the video list gave answers,
    with 95% intervals that count each video's pairs as one cluster (see interval_over_videos)."""
    audited = [a for a in kept if "right" in a]
    if not audited:
        return None
    by_video = {}
    for a in audited:
        by_video.setdefault(a.get("video") or a["id"], []).append(a)
    checked = {"pairs": len(audited), "videos": len(by_video)}
    for side in ("chosen", "rejected"):
        groups = [[a["right"][side] for a in pairs] for pairs in by_video.values()]
        right = sum(map(sum, groups))
        checked[side] = {"right": right, "accuracy": round(right / len(audited), 4), "interval": interval_over_videos(groups)}
    return checked


def interval_over_videos(groups):
    """95% interval of the share right over [[right?] per pair of one video]: pairs of one video share its
    question and often its chosen answer, so they are not independent. Wilson's interval at the effective
    sample size, the pairs divided by the design effect (the between-video variance of the share over the
    binomial one, at least 1); with every answer right or every one wrong, the videos count as the sample."""
    n, right = sum(map(len, groups)), sum(map(sum, groups))
    share = right / n
    if 0 < share < 1 and len(groups) > 1:
        between = len(groups) / (len(groups) - 1) * sum((sum(g) - share * len(g)) ** 2 for g in groups) / n ** 2
        effective = n / max(1.0, between / (share * (1 - share) / n))
    else:
        effective = len(groups)
    return wilson_interval(share * effective, effective)


def write_stats(out_dir, attempts, bad_videos, targets, seconds, made, exhausted=0):
    kept = [a for a in attempts if a["kept"]]
    kinds = ("localized", "comprehensive")
    whole = [a for a in attempts if a["kind"] == "comprehensive"]
    stats = {"attempts": len(attempts), "kept": len(kept), "targets": targets,
             "kept_by_kind": {k: sum(a["kind"] == k for a in kept) for k in kinds},
             "kept_by_negative": {n: sum(a["negative"] == n for a in kept) for n in ("irrelevant", "incomplete")},
             "kept_by_video": {v: {k: sum(a["kind"] == k for a in kept if a.get("video") == v) for k in kinds}
                               for v in sorted({a.get("video") for a in kept if a.get("video")})},
             "comprehensive_questions": {q: {"attempts": sum(a.get("question_source") == q for a in whole),
                                             "kept": sum(a.get("question_source") == q and a["kept"] for a in whole)}
                                         for q in ("generated", "template", "given")},
             "dropped_by": {rule: sum(a["dropped_by"] == rule for a in attempts) for rule in DROP_RULES},
             "dropped_by_kind": {k: {rule: sum(a["dropped_by"] == rule for a in attempts if a["kind"] == k)
                                     for rule in DROP_RULES} for k in kinds},
             "slots_without_a_new_view": exhausted,
             "skipped_videos": len(bad_videos), "skipped_video_ids": bad_videos,
             "seconds_this_run": round(seconds, 1), "pairs_made_this_run": made,
             "pairs_per_hour_this_run": round(made * 3600 / seconds, 1) if seconds > 0 else None}
    checked = audit(kept)
    if checked:
        stats["audit_against_given_answers"] = checked
    with atomic_write(os.path.join(out_dir, "stats.json")) as f:
        json.dump(stats, f, indent=2)
    return stats


# ---------------------------------------------------------------- the run

def open_logs(args):
    """(attempts.jsonl path, pairs.jsonl path, attempts logged so far, pairs kept so far) in --out;
    a resumed run first cuts both logs back to what they agree on."""
    make_out_dir(args.out)
    attempts_path, pairs_path = os.path.join(args.out, "attempts.jsonl"), os.path.join(args.out, "pairs.jsonl")
    if not args.resume and os.path.exists(attempts_path):
        raise InputError(f"{args.out}: already holds attempts.jsonl; pass --resume to continue or choose another --out")
    done, pairs = restore(args.out) if args.resume else ([], [])
    if args.resume:  # otherwise both logs are created with the first attempts, so a failed start leaves none
        write_jsonl(attempts_path, done)
        write_jsonl(pairs_path, pairs)
    return attempts_path, pairs_path, done, pairs


def next_group(slot, max_slots, usable, args, taken, finished, kept, targets):
    """The attempts of the slot group starting at `slot` that are still wanted, and how many slots
    found no fresh attempt. Groups are fixed runs of --batch-size slots, so a resume regroups alike."""
    group, exhausted = [], 0
    for s in range(slot, min(max_slots, slot + args.batch_size)):
        index, kind = slot_plan(s, len(usable), args.local_share, args.seed)
        attempt = fresh_attempt(s, usable[index], kind, args, taken)
        if s not in finished and kept[kind] < targets[kind]:
            if attempt is None:
                exhausted += 1
            else:
                group.append(attempt)
    return group, exhausted


def keep_results(results, kept, targets, out_dir):
    """(pair records, attempt log lines) of a finished group; counts kept pairs in `kept` and drops
    those past their kind's target as surplus."""
    new_pairs, logged = [], []
    for a in results:
        keep = a["dropped_by"] is None and kept[a["kind"]] < targets[a["kind"]]
        if a["dropped_by"] is None and not keep:
            a["dropped_by"] = "surplus"  # passed every filter, but its group already filled the kind's target
        kept[a["kind"]] += keep
        logged.append({"slot": a["slot"], "id": a["id"], "video": a["video"]["id"], "kind": a["kind"],
                       "negative": a["negative"], "question_source": a.get("question_source"),
                       "kept": keep, "dropped_by": a["dropped_by"], **answers_right(a)})
        if keep:
            new_pairs.append(pair_record(a, out_dir))
    return new_pairs, logged


def report_shortfall(stats, args):
    """One warning with what was kept of each kind, what dropped the most, and what to try."""
    top = sorted(((n, rule) for rule, n in stats["dropped_by"].items() if n), reverse=True)[:3]
    hints = ["more videos", f"a larger --max-attempts (now {args.max_attempts:g})"]
    if stats["dropped_by"]["identical"] + stats["dropped_by"]["near_identical"] and args.temperature == 0:
        hints.append("--temperature 0.7 (greedy answers from two views are often the same)")
    if stats["dropped_by"]["not_an_option"]:
        hints.append("a model or adapter that answers multiple choice with an option's letter")
    if stats["dropped_by"]["truncated"]:
        hints.append(f"a larger --max-new-tokens (now {args.max_new_tokens})")
    if stats["dropped_by"]["judge_prefers_rejected"] + stats["dropped_by"]["unanswerable"]:
        hints.append("--no-judge, if the model is too weak to judge")
    tqdm.write(f"warning: kept {stats['kept']} of the {args.num_pairs} pairs asked for "
               f"({stats['kept_by_kind']['localized']} localized of {stats['targets']['localized']}, "
               f"{stats['kept_by_kind']['comprehensive']} comprehensive of {stats['targets']['comprehensive']}); "
               f"most dropped by {', '.join(f'{rule} ({n})' for n, rule in top)}; try {', '.join(hints)}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    videos = list_videos(args.videos)[args.shard_index::args.shard_count]
    if not videos:
        raise InputError(f"{args.videos}: no videos in shard {args.shard}")
    check_model_path(args.model)  # before measuring every video: a mistyped --model fails in seconds
    attempts_path, pairs_path, done, pairs = open_logs(args)
    usable, bad = usable_videos(videos, min_frames=max(8, args.sparse_frames + 4), show=True)
    if not usable:
        raise InputError(f"{args.videos}: no readable videos ({len(bad)} skipped)")
    device = pick_device()
    model, processor = load_for_inference(args.model, args.adapter, args.four_bit, device)

    local_target = round(args.num_pairs * args.local_share)
    targets = {"localized": local_target, "comprehensive": args.num_pairs - local_target}
    kept = {k: sum(a["kept"] and a["kind"] == k for a in done) for k in targets}
    finished, max_slots = {a["slot"] for a in done}, int(args.max_attempts * args.num_pairs)
    began = time.perf_counter()
    bar = tqdm(total=args.num_pairs, initial=sum(kept.values()), desc="pairs kept", unit="pair")
    slot, taken, exhausted = 0, set(), 0
    while slot < max_slots and any(kept[k] < targets[k] for k in targets):
        group, none_left = next_group(slot, max_slots, usable, args, taken, finished, kept, targets)
        slot, exhausted = slot + args.batch_size, exhausted + none_left
        if not group:
            continue
        torch.manual_seed(hash_seed(args.seed, slot))  # sampling depends only on the seed and the group
        new_pairs, logged = keep_results(run_attempts(model, processor, group, args, device), kept, targets, args.out)
        append_jsonl(pairs_path, new_pairs)  # pairs first: an unlogged pair is dropped on resume
        append_jsonl(attempts_path, logged)
        done += logged
        bar.update(len(new_pairs))
        bar.set_postfix(tried=len(done))
    bar.close()
    made = sum(kept.values()) - len(pairs)
    stats = write_stats(args.out, done, bad, targets, time.perf_counter() - began, made, exhausted)
    print(f"kept {stats['kept']} of {stats['attempts']} attempts ({stats['kept_by_kind']}); dropped {stats['dropped_by']}; "
          f"pairs in {pairs_path}")
    if "audit_against_given_answers" in stats:
        checked = stats["audit_against_given_answers"]
        rate = lambda side: f"{100 * checked[side]['accuracy']:.1f}% [{100 * checked[side]['interval'][0]:.1f}, " \
                            f"{100 * checked[side]['interval'][1]:.1f}]"
        print(f"against the answers given with the videos ({checked['pairs']} pairs, {checked['videos']} videos): "
              f"the chosen answer is right "
              f"{rate('chosen')}, the rejected one {rate('rejected')}")
    if stats["kept"] == 0:
        raise InputError(f"{args.out}: no pair survived the filters ({stats['dropped_by']})")
    if stats["kept"] < args.num_pairs:
        report_shortfall(stats, args)


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


def load_for_inference(path, adapter, four_bit, device):
    """(model in eval mode, processor), with the PEFT adapter in the folder `adapter` applied if given."""
    model, processor = load_model(path, four_bit, device)
    if adapter:
        from peft import PeftModel
        check_adapter_folder(adapter)
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), processor


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


def video_length(path):
    """Number of frames of a video whose every frame decodes; InputError naming what is wrong otherwise."""
    return _ask_decoder(path, ("length", path, 0, None))


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
