"""Pretrain a small video LLM in the toy world: it learns to see and to talk, not to reason about time.

The toy world is stage 02's: coloured shapes on a plain background that appear, move, grow or
change light over 32 frames. This script writes a Qwen3-VL (or, with --arch, a LLaVA-OneVision)
of a few MB (the real classes, so every stage loads it with Auto*), trained from scratch in three
phases:

  1. language:  the language model alone, on frame-by-frame descriptions of toy videos (plain
                language modelling), order-free questions about them in the chat format, and
                restating a description frame by frame. Half the descriptions number their lines
                ("Frame 2: a red circle on the left"), half start them with the frame's time as
                Qwen3-VL writes it before a frame's visual tokens ("<0.8 seconds> a red circle ...");
  2. vision:    the vision tower alone learns to write each frame as its caption: the frame's 16
                visual tokens are pulled toward the language model's embeddings of the caption's
                words, in order. This is the toy's stand-in for what real video LLMs get from
                pretraining at scale, visual tokens that the language model reads as it reads
                words; it is what lets a skill learned from captions work on frames;
  3. instruct:  the language model's layers (not its word embeddings, not the tower) on a mix:
                frame captions, order-free questions about videos (which object is in it, which
                of some objects appears, what shape), videos told frame by frame, and the text
                of phase 1.

No example asks anything whose answer depends on order or change: the model sees and answers,
but has never been taught to reason about time. Stage 02 shows this (probes on its visual
encodings far above chance, its answers near chance), and stages 01 + 03 (T3) then teach time
from text alone. It also writes captions.jsonl: the world's single-frame captions, which stage
01 strings together into text temporal tasks.

At the end it checks that the model sees: it asks stage 02's order-free control question ("Which
object is in the video?") about 100 new videos, prints the share it gets right and records it in
pretrain.json (the shipped model, seed 1: 100%).

Usage: python toy_world/pretrain.py OUT_DIR [--seed 1] [--arch qwen3_vl] [--hidden 128] [--layers 4] [--steps 500,1000,900]
"""
import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FRAMES = 8  # frames a video example shows, as run_all.sh's stages do
FPS = 8  # stage 02's videos play at 8 fps: a frame's time in seconds is its index / FPS
SIDES = ((0.4, "on the left"), (0.6, "in the middle"), (1.01, "on the right"))
SIGHT_CHECK_VIDEOS = 100  # new control videos the finished model is asked about
SIGHT_CHECK_BAR = 0.8  # share of them it must name the object in to count as seeing well
NARRATE = "Describe the video frame by frame."
HEADER = "The following describes a video, one frame per line, in the order the frames appear."
WORLD_SCENES = 500  # new scenes per aspect planned for t3_world's text; the 4250 its words tell: 1.2 passes at 400 x 16
TOLD_SCENES_SEED = 7_000_001  # told_scenes plans under seed + this, apart from 02's own plans at seed
STAMPED_SHARE = 0.5  # share of descriptions whose lines start with the frame's time, as Qwen3-VL's video text does


def load(relative, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROBE = load("02_probe.py", "probe")
TINY = load("tests/tiny_model.py", "tiny_model")
COLOURS = list(PROBE.COLOURS)
SHAPES = [s for split in ("train", "test") for s in PROBE.SHAPES[split]]
BACKGROUNDS = [b for split in ("train", "test") for b in PROBE.BACKGROUNDS[split]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=1, help="1 made the shipped model")
    p.add_argument("--arch", default="qwen3_vl", choices=("qwen3_vl", "llava_onevision"),
                   help="qwen3_vl (the shipped model): each frame's 16 tokens after its time in the text "
                        "(\"<0.2 seconds>\"); llava_onevision: each frame's 16 tokens after the last, with no times")
    p.add_argument("--hidden", type=int, default=128, help="language model width (a multiple of 16)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--steps", default="500,1000,900", help="optimizer steps of the three phases (language, vision, instruct)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    if len(args.steps) != 3 or min(args.steps) < 0:
        p.error("--steps takes three counts, e.g. 500,1000,900")
    return args


# ---------------------------------------------------------------- the world, in pictures and words

def random_scene(rng):
    """(frame states, shape, background) of a video of any of stage 02's kinds, label at random."""
    aspect = rng.choice(list(PROBE.ASPECTS))
    _, options, build = PROBE.ASPECTS[aspect]
    states = build(int(rng.integers(len(options))), rng, PROBE.RENDERED_FRAMES)
    return states, str(rng.choice(SHAPES)), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]


def random_frame(rng):
    """One frame state with one or two objects of different colours, anywhere."""
    colours = rng.permutation(COLOURS)[:int(rng.integers(1, 3))]
    objects = [PROBE.still(str(c), float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.2, 0.8)),
                           float(rng.choice([0.08, 0.14, 0.24]))) for c in colours]
    return {"objects": objects, "light": float(rng.uniform(0.5, 1.0))}


def caption(state, shape):
    """A frame in the world's words: "a large red triangle on the left and a blue triangle in the middle"."""
    def words(o):
        size = "small " if o["size"] < 0.1 else "large " if o["size"] > 0.2 else ""
        side = next(name for bound, name in SIDES if o["x"] < bound)
        return f"a {size}{o['colour']} {shape} {side}"
    return " and ".join(words(o) for o in sorted(state["objects"], key=lambda o: o["x"])) or "nothing"


def shown(states):
    """The frames a model is shown of a video (NUM_FRAMES, spread evenly, as the stages pick them)."""
    return [states[t] for t in PROBE.uniform_indices(len(states), NUM_FRAMES)]


def clip(frames):
    """Rendered frames that know when they were shown, so that Qwen3-VL's processor writes their times."""
    return PROBE.Clip(frames, FPS, PROBE.uniform_indices(PROBE.RENDERED_FRAMES, len(frames)), PROBE.RENDERED_FRAMES)


def frame_lines(frames, shape):
    """One caption per frame, numbered: "Frame 1: a red circle on the left"."""
    return "\n".join(f"Frame {n}: {caption(f, shape)}" for n, f in enumerate(frames, 1))


def stamped_lines(frames, shape):
    """One caption per frame after its time, as Qwen3-VL's processor writes it before the frame's
    visual tokens: "<0.2 seconds> a red circle on the left"."""
    times = PROBE.uniform_indices(PROBE.RENDERED_FRAMES, len(frames))
    return "\n".join(f"<{t / FPS:.1f} seconds> {caption(f, shape)}" for t, f in zip(times, frames))


def description(frames, shape, rng):
    """A video told in words, its lines numbered or (STAMPED_SHARE of them) stamped with their times."""
    lines = stamped_lines if rng.random() < STAMPED_SHARE else frame_lines
    return HEADER + "\n" + lines(frames, shape)


def world_captions():
    """Every single-object caption and a sample of two-object ones: stage 01's caption pool."""
    rng = random.Random(0)
    captions = set()
    for shape in SHAPES:
        for colour in COLOURS:
            for size in (0.08, 0.14, 0.24):
                for x, _ in ((0.2, 0), (0.5, 0), (0.8, 0)):
                    captions.add(caption({"objects": [PROBE.still(colour, x, 0.5, size)]}, shape))
        for _ in range(60):
            a, b = rng.sample(COLOURS, 2)
            xa, xb = sorted(rng.sample([0.2, 0.5, 0.8], 2))
            captions.add(caption({"objects": [PROBE.still(a, xa, 0.5), PROBE.still(b, xb, 0.5)]}, shape))
    return sorted(captions)


# ---------------------------------------------------------------- order-free questions

def appearing_colours(frames):
    return sorted({o["colour"] for f in frames for o in f["objects"]}, key=COLOURS.index)


def order_free_question(rng, frames, shape):
    """(question, options, answer index) about the frames taken as a set: any order of them has the same
    answer. Options name an object as "the red object" or in caption words ("a red triangle"), so both
    read as colours."""
    present = appearing_colours(frames)
    absent = [c for c in COLOURS if c not in present]
    kind = rng.choice(["which", "one_of", "shape"] if absent else ["shape"])
    name = (lambda c: f"the {c} object") if rng.random() < 0.5 else (lambda c: f"a {c} {shape}")
    if kind == "which" and len(present) == 1:
        return "Which object is in the video?", [name(c) for c in COLOURS], COLOURS.index(present[0])
    if kind in ("which", "one_of"):
        options = [str(rng.choice(present))] + list(rng.permutation(absent)[:int(rng.integers(1, len(absent) + 1))])
        order = rng.permutation(len(options))
        return "Which of these objects appears in the video?", [name(options[i]) for i in order], int(np.argmax(order == 0))
    return "What shape are the objects?", [f"{s}s" for s in SHAPES], SHAPES.index(shape)


def write_video_instructions(out_dir, count, seed):
    """Order-free questions about `count` fresh toy videos, of the kinds the toy was pretrained on, as
    stage 03's conversation records with their mp4s under out_dir (mix.jsonl): the video instruction
    data T3 mixes into its text, so that training on text does not cost the model its sight. Returns
    the JSONL's path."""
    rng = np.random.default_rng([seed, 7])
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    records = []
    for i in tqdm(range(count), desc="instruction videos", unit="video", mininterval=2):
        states, shape, background = random_scene(rng)
        question, options, answer = order_free_question(rng, states, shape)
        relative = os.path.join("videos", f"mix-{i:05d}.mp4")
        PROBE.write_video(os.path.join(out_dir, relative), PROBE.render(states, shape, background))
        records.append({"id": f"mix-{i:05d}", "video": relative, "conversations": [
            {"from": "human", "value": "<video>\n" + PROBE.choice_prompt(question, options)},
            {"from": "gpt", "value": PROBE.LETTERS[answer]}]})
    path = os.path.join(out_dir, "mix.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)
    return path


# ---------------------------------------------------------------- stage 02's questions, told in text

def told_records(probe_videos, split, control=False):
    """02's question about each video of `split` (from its videos.jsonl, or as `retold` gives them), the
    frames told in text (the video's "description"), as stage 01 writes a multiple-choice record: the
    prompt 02 gives its text-only LLM, the options and the answer's letter. Only the temporal aspects,
    or with `control` only the order-free ones, or with control=None both."""
    records = []
    for video in probe_videos:
        if video["split"] != split or control is not None and (video["aspect"] in PROBE.CONTROLS) != control:
            continue
        prompt = PROBE.TEXT_PREFIX.format(description=video["description"]) + PROBE.choice_prompt(video["question"], video["options"])
        answer = PROBE.LETTERS[video["label"]]
        records.append({"id": f"words-{video['id']}", "task": video["aspect"], "answer": answer,
                        "options": [f"{PROBE.LETTERS[i]}. {o}" for i, o in enumerate(video["options"])],
                        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
    return records


def retold(probe_videos, lines, num_videos, seed, num_frames=NUM_FRAMES):
    """02's videos with the `num_frames` frames the stages sample told by `lines` (frame_lines or
    stamped_lines: the toy's caption words) instead of 02's coordinates: the same questions and
    answers, in other words. Scenes are rebuilt from 02's plans, so `num_videos` and `seed` must be
    the ones 02 ran with (and `num_frames` its --num-frames): each rebuilt scene must give 02's own
    description of the video, or this stops."""
    plans = {p["id"]: p for p in PROBE.plan_videos(sorted({v["aspect"] for v in probe_videos}), num_videos, seed)}
    shown_at = PROBE.uniform_indices(PROBE.RENDERED_FRAMES, num_frames)  # as 02 picks the frames it describes
    out = []
    for video in probe_videos:
        states, shape, _ = PROBE.build_scene(plans[video["id"]]) if video["id"] in plans else (None, None, None)
        if states is None or PROBE.describe(states, shape, shown_at) != video["description"]:
            sys.exit(f"error: video {video['id']} is not stage 02's at --num-videos {num_videos} --seed {seed} "
                     f"--num-frames {num_frames}: give the settings 02 ran with")
        out.append({**video, "description": lines([states[t] for t in shown_at], shape)})
    return out


def told_scenes(aspects, per_aspect, seed, num_frames=NUM_FRAMES):
    """Stage 02's questions about `per_aspect` new scenes of each aspect, planned as 02 plans its
    training videos but under a seed of their own (so never one of 02's videos) and never rendered:
    each told in stamped lines, as records like told_records'. Text to train on need not come from
    videos anyone rendered, so there can be as much of it as the steps take. A scene whose words would
    be the same had its answer been another is left out: the toy's words have no light and no up or
    down, so a scene that gets brighter is told as one that gets darker, and trained on it would only
    teach a guess. A text told with two answers among these scenes is left out too (from few frames,
    two objects can first be shown in the same one)."""
    shown_at = PROBE.uniform_indices(PROBE.RENDERED_FRAMES, num_frames)
    plans = PROBE.plan_videos(sorted(aspects), per_aspect, TOLD_SCENES_SEED + seed)  # the same records in any order
    scenes = []
    for number, plan in enumerate(plans):
        # the training split's shapes and backgrounds
        plan = {**plan, "id": f"told-{plan['aspect']}-{number:05d}", "split": "train"}
        question, options, _ = PROBE.ASPECTS[plan["aspect"]]
        description = told_in_words(plan, shown_at)
        # the same seed makes the same draws, so the scene built for another answer differs only in that
        if any(told_in_words({**plan, "label": other}, shown_at) == description
               for other in range(len(options)) if other != plan["label"]):
            continue
        scenes.append({**plan, "question": question, "options": options, "description": description})
    answers = {}
    for scene in scenes:
        answers.setdefault((scene["aspect"], scene["description"]), set()).add(scene["label"])
    return told_records([s for s in scenes if len(answers[s["aspect"], s["description"]]) == 1], "train", control=None)


def told_in_words(plan, shown_at):
    """A planned scene's frames at `shown_at` in stamped lines of the toy's words."""
    states, shape, _ = PROBE.build_scene(plan)
    return stamped_lines([states[t] for t in shown_at], shape)


def given_questions(probe_videos, folder=""):
    """02's training videos as stage 04's video list (paths under `folder`, relative to the list's own
    folder), each with 02's question, options and answer: 04 asks the question and only audits its pairs
    against the answer."""
    return [{"id": v["id"], "video": os.path.join(folder, v["video"]), "question": v["question"], "options": v["options"],
             "answer": PROBE.LETTERS[v["label"]]} for v in probe_videos if v["split"] == "train"]


def write_jsonl(path, records):
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(f"{path}.tmp", path)


def write_world_questions(probe_dir, seed, num_frames=NUM_FRAMES, per_aspect=WORLD_SCENES):
    """The toy world's own temporal questions, written beside the videos.jsonl of 02 run into `probe_dir`:
    world_text.jsonl, for a T3 adapter, the questions 02 asked about `per_aspect` new scenes of each of
    its temporal aspects whose words tell their answer, in text only, each frame a line of the toy's caption
    words after its time as Qwen3-VL writes it ("<0.8 seconds> a red circle on the left"), never one of
    02's videos (told_scenes);
    and tpo_videos.jsonl, stage 04's video list: 02's training videos with their questions. Returns the
    two paths."""
    if not str(per_aspect).isdigit() or int(per_aspect) < 1:
        sys.exit(f"error: WORLD_SCENES must be a whole number of scenes per aspect, 1 or more, not {per_aspect!r}")
    videos = [json.loads(line) for line in open(os.path.join(probe_dir, "videos.jsonl"))]
    aspects = {v["aspect"] for v in videos} - set(PROBE.CONTROLS)
    text, listing = os.path.join(probe_dir, "world_text.jsonl"), os.path.join(probe_dir, "tpo_videos.jsonl")
    write_jsonl(text, told_scenes(aspects, int(per_aspect), int(seed), int(num_frames)))
    write_jsonl(listing, given_questions(videos))
    return text, listing


# ---------------------------------------------------------------- examples as token ids

class Encoder:
    """Token ids and labels (-100 where no loss) for the three kinds of example."""

    def __init__(self, processor):
        self.processor, self.tokenizer = processor, processor.tokenizer

    def text(self, text):
        ids = self.tokenizer(text + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}

    def chat(self, prompt, answer, image=None, video=None):
        part = [{"type": "image"}] if image is not None else [{"type": "video"}] if video is not None else []
        messages = [{"role": "user", "content": part + [{"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=None if image is None else [image],
                                videos=None if video is None else [video], return_tensors="pt",
                                **(PROBE.video_timing([video]) if video is not None else {}))
        prompt_ids = inputs.pop("input_ids")[0]
        inputs.pop("attention_mask")
        answer_ids = torch.tensor(self.tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        example = {"input_ids": torch.cat([prompt_ids, answer_ids]),
                   "labels": torch.cat([torch.full_like(prompt_ids, -100), answer_ids])}
        if "mm_token_type_ids" in inputs:  # which tokens are image or video ones (M-RoPE needs it)
            example["mm_token_type_ids"] = torch.cat([inputs.pop("mm_token_type_ids")[0], torch.zeros_like(answer_ids)])
        return {**example, **inputs}


def description_example(encoder, rng):
    """A video's frame-by-frame description, as plain text to model."""
    states, shape, _ = random_scene(rng)
    return encoder.text(description(shown(states), shape, rng))


def text_question_example(encoder, rng):
    """An order-free question about a description, in the chat format."""
    states, shape, _ = random_scene(rng)
    question, options, answer = order_free_question(rng, states, shape)  # about all frames: each lasts a third or more
    prompt = description(shown(states), shape, rng) + "\n\n" + PROBE.choice_prompt(question, options)
    return encoder.chat(prompt, PROBE.LETTERS[answer])


def restate_example(encoder, rng):
    """A description, and asked to tell it frame by frame: its lines again, stamped. Restating one
    wording in the other ties the two ways the world writes a frame's place in time."""
    states, shape, _ = random_scene(rng)
    frames = shown(states)
    return encoder.chat(description(frames, shape, rng) + "\n\n" + NARRATE, stamped_lines(frames, shape))


def caption_example(encoder, rng):
    """A single frame and its caption."""
    state, shape = random_frame(rng), str(rng.choice(SHAPES))
    image = PROBE.render([state], shape, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])[0]
    return encoder.chat("Describe the image.", caption(state, shape), image=image)


def video_question_example(encoder, rng):
    """An order-free question about a video of any of the world's kinds."""
    states, shape, background = random_scene(rng)
    question, options, answer = order_free_question(rng, states, shape)
    frames = clip(PROBE.render(shown(states), shape, background))
    return encoder.chat(PROBE.choice_prompt(question, options), PROBE.LETTERS[answer], video=frames)


def narration_example(encoder, rng):
    """A video, told frame by frame: what each frame shows, after its time (copying, in order)."""
    states, shape, background = random_scene(rng)
    frames = shown(states)
    return encoder.chat(NARRATE, stamped_lines(frames, shape), video=clip(PROBE.render(frames, shape, background)))


def collate(examples, pad_id):
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id), "labels": torch.full((len(examples), width), -100),
             "attention_mask": torch.zeros((len(examples), width), dtype=torch.long)}
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n], batch["labels"][row, :n], batch["attention_mask"][row, :n] = e["input_ids"], e["labels"], 1
        if "mm_token_type_ids" in e:
            batch.setdefault("mm_token_type_ids", torch.zeros((len(examples), width), dtype=torch.long))[row, :n] = e["mm_token_type_ids"]
    for key in examples[0].keys() - batch.keys() - {"mm_token_type_ids"}:  # pixels and their grids or sizes
        batch[key] = torch.cat([e[key] for e in examples])
    return batch


# ---------------------------------------------------------------- training

def caption_ids(tokenizer, state, shape, length, filler):
    """The frame's caption as token ids, padded with `filler` to `length` (a frame's visual tokens)."""
    ids = tokenizer(" " + caption(state, shape), add_special_tokens=False)["input_ids"][:length]
    return ids + [filler] * (length - len(ids))


def train_vision(model, processor, steps, args, seed):
    """Phase 2: the vision tower learns to write each frame as its caption: the frame's i-th visual
    token is pulled toward the language model's (frozen) embedding of the caption's i-th word, the
    tokens past the caption toward that of ".". The language model then reads a frame as it reads
    its caption, and a skill it learns from captions can work on frames: this is the toy's stand-in
    for the alignment of vision and language that real video LLMs get from pretraining at scale."""
    if not steps:
        return
    embeddings = model.get_input_embeddings().weight.detach()
    scale = embeddings.pow(2).sum(1).mean()  # loss 1: as far off as a word embedding is from 0
    filler = processor.tokenizer.convert_tokens_to_ids(".")
    rng = np.random.default_rng(seed)

    def loss(_):
        scenes = [(shown(states), shape, background) for states, shape, background in
                  (random_scene(rng) for _ in range(args.batch_size))]
        videos = [clip(PROBE.render(frames, shape, background)) for frames, shape, background in scenes]
        tokens = PROBE.video_tokens(model, processor, videos, model.device)  # [videos, frames, tokens, width]
        targets = torch.tensor([[caption_ids(processor.tokenizer, f, shape, tokens.shape[2], filler) for f in frames]
                                for frames, shape, _ in scenes])
        return (tokens - embeddings[targets]).pow(2).sum(-1).mean() / scale
    optimize(train_only(model, vision_modules(model)), steps, args, loss, "2 vision")


def vision_modules(model):
    """What turns pixels into visual tokens: Qwen2-VL's tower (its merger included), or LLaVA-OneVision's
    SigLIP tower and projector."""
    if hasattr(model.model, "visual"):
        return [model.model.visual]
    return [model.model.vision_tower, model.model.multi_modal_projector]


def train_phase(model, encoder, kinds, steps, args, trainable, name, seed):
    """`steps` AdamW steps on fresh batches of examples, each batch one of `kinds` in turn."""
    if not steps:
        return
    params = train_only(model, trainable)
    rng = np.random.default_rng(seed)
    pad = model.config.text_config.pad_token_id if hasattr(model.config, "text_config") else model.config.pad_token_id
    model.train()
    optimize(params, steps, args, lambda step: model(**collate([kinds[step % len(kinds)](encoder, rng)
                                                                for _ in range(args.batch_size)], pad)).loss, name)
    model.eval()


def train_only(model, modules):
    """Freeze the model but `modules`, and return their parameters, each once (a tied head is the embeddings)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list({id(p): p for module in modules for p in module.parameters()}.values())
    for p in params:
        p.requires_grad_(True)
    return params


def optimize(params, steps, args, loss_at, name):
    """`steps` AdamW steps on `params`, each on the loss `loss_at(step)` returns: 30 warm-up steps, then
    a cosine decay; gradients clipped at norm 1."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    bar = tqdm(range(steps), desc=name, unit="step", mininterval=2)
    for step in bar:
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


@torch.no_grad()
def sight_check(model, processor, seed, count=SIGHT_CHECK_VIDEOS):
    """Share of `count` new videos of stage 02's order-free control ("Which object is in the video?",
    one object throughout) that the model answers right (its letter's log-probability highest): one
    that has learned to see is near 100%, one that has not near chance (25%)."""
    question, options, build = PROBE.ASPECTS["appearance"]
    rng = np.random.default_rng([seed, 99])
    right = 0
    for _ in tqdm(range(count), desc="sight check", unit="video", mininterval=2):
        label = int(rng.integers(len(options)))
        states, shape = build(label, rng, PROBE.RENDERED_FRAMES), str(rng.choice(SHAPES))
        frames = clip(PROBE.render(shown(states), shape, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]))
        scores = PROBE.choice_logprobs(model, processor, [(frames, PROBE.choice_prompt(question, options))], [options], model.device)[0]
        right += int(np.argmax(scores) == label)
    return right / count


def build_model(args):
    corpus = TINY.synthesize_corpus(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    corpus += [description(shown(states), shape, rng) for states, shape, _ in (random_scene(rng) for _ in range(3000))]
    corpus += world_captions()
    corpus += [PROBE.ASPECTS[a][0] + " " + " ".join(PROBE.ASPECTS[a][1]) for a in PROBE.ASPECTS] * 50
    tokenizer, template = TINY.train_tokenizer("qwen2_vl" if args.arch == "qwen3_vl" else args.arch, corpus, args.vocab_size)
    # frames at the world's own 64 pixels in 8-pixel patches, merged or pooled 2 x 2: 16 tokens per
    # frame, room for its caption (13 words at most)
    if args.arch == "llava_onevision":
        model, processor = TINY.build_llava_onevision(tokenizer, template, args.hidden, args.layers, side=PROBE.FRAME_SIDE, patch=8)
    else:
        model, processor = TINY.build_qwen3_vl(tokenizer, template, args.hidden, args.layers, side=PROBE.FRAME_SIDE, patch=8,
                                               vision_depth=4, vision_width=64)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def main(argv=None):
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    start = time.time()
    model, processor = build_model(args)
    encoder = Encoder(processor)
    language = model.model.language_model
    train_phase(model, encoder, [description_example, text_question_example, restate_example], args.steps[0], args,
                [language, model.lm_head], "1 language", args.seed + 1)
    train_vision(model, processor, args.steps[1], args, args.seed)
    # the word embeddings (tied to the output head) and the tower stay as they are: a frame goes on
    # being written as its caption's words
    train_phase(model, encoder, [caption_example, video_question_example, narration_example, text_question_example,
                                 video_question_example, description_example, restate_example], args.steps[2], args,
                [language.layers, language.norm], "3 instruct", args.seed + 2)
    sight = sight_check(model, processor, args.seed)

    def write(tmp):
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "captions.jsonl"), "w") as f:
            for i, c in enumerate(world_captions()):
                f.write(json.dumps({"id": f"toy-{i:04d}", "caption": c}) + "\n")
        with open(os.path.join(tmp, "pretrain.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k != "out_dir"}
                      | {"seconds": round(time.time() - start), "sight_check": sight}, f, indent=1)
    TINY.write_atomically(args.out_dir, write)
    print(f"wrote the toy-world model to {args.out_dir} in {time.time() - start:.0f} s; it names the object in {sight:.0%} "
          f"of {SIGHT_CHECK_VIDEOS} new videos of stage 02's control" + ("" if sight >= SIGHT_CHECK_BAR else
          f" (under {SIGHT_CHECK_BAR:.0%}: it has not learned to see well; another --seed or more --steps may)"))


if __name__ == "__main__":
    sys.exit(main())
