"""Stage 02: where is the temporal bottleneck, the vision encoder or the language model?

Renders synthetic probe videos (coloured shapes that appear, move, grow or change light),
one family per aspect, with a frame-by-frame text description made from the same
scene state. Then, per aspect, three accuracies on the test split:
  (i)   probes (linear, and a small GRU over frames) trained on the model's own visual
        encodings, pooled per frame: does the vision side carry the temporal signal?
  (ii)  the language model answering from the text description alone;
  (iii) the video LLM answering from the video.
Probes >> text LLM means the language model, not the vision encoder, is the bottleneck.
An order-free control (which object is in the video, answerable from any frame) tells whether
the video LLM sees the objects at all; it is reported apart from the temporal aspects.
Train and test videos differ in shapes and background colours, so a probe cannot win by
remembering appearance.

Usage:
    python 02_probe.py --model M [--adapter DIR] --out runs/02 [--num-videos 150] [--num-frames 16]
        [--seeds 3] [--generate] [--shard i/n]
    merge shards:  python 02_probe.py --merge runs/02-shard-* --out runs/02

Writes OUT/videos/<aspect>/*.mp4, OUT/videos.jsonl (every video, its label and description),
OUT/features.safetensors (pooled visual encodings; reused on a rerun), OUT/answers.jsonl,
OUT/probe_bench.jsonl (the temporal test videos as a benchmark stage 06 reads),
OUT/probe_control_bench.jsonl (the control's), OUT/report.json and OUT/report.md.
"""
import argparse
import inspect
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import TypedDict

import numpy as np
import torch
from tqdm import tqdm

COLOURS = {"red": (225, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 205, 40)}
SHAPES = {"train": ("square", "circle"), "test": ("triangle", "diamond")}  # irrelevant to every question
BACKGROUNDS = {"train": ((25, 25, 25), (20, 35, 60)), "test": ((60, 45, 20), (45, 20, 50))}
RENDERED_FRAMES = 32  # frames written per video (8 fps); the model sees --num-frames of them
FRAME_SIDE = 64
TEST_SHARE = 1 / 3
THIRDS = ("beginning", "middle", "end")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder or hub id (AutoModelForImageTextToText)")
    p.add_argument("--adapter", help="a PEFT adapter for the language model (e.g. stage 03's)")
    p.add_argument("--out", required=True)
    p.add_argument("--aspects", default=",".join(ASPECTS), help="comma-separated subset of: " + ", ".join(ASPECTS)
                   + f" ({', '.join(CONTROLS)}: an order-free control)")
    p.add_argument("--num-videos", type=int, default=150, help="videos per aspect; a third of them form the test split")
    p.add_argument("--num-frames", type=int, default=16, help="frames the model sees per video")
    p.add_argument("--seeds", type=int, default=3, help="probe trainings per aspect and probe kind")
    p.add_argument("--generate", action="store_true", help="also score greedy replies (letter extracted)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard", default="0/1", help="i/n: render, encode and ask about every n-th video")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="join shard folders into --out, train the probes, report")
    p.add_argument("--no-4bit", dest="four_bit", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    require_positive(p, args, "seeds", "batch_size")
    if not args.merge and not args.model:
        p.error("--model is required (unless --merge)")
    args.aspects = [a for a in args.aspects.split(",") if a]
    unknown = set(args.aspects) - set(ASPECTS)
    if unknown or not args.aspects:
        p.error(f"unknown aspects {sorted(unknown)}; choose from {', '.join(ASPECTS)}")
    fewest = 3 * max(len(ASPECTS[a][1]) for a in args.aspects)  # every class in the test split, twice that to train on
    if args.num_videos < fewest or args.num_frames < 2:
        p.error(f"need --num-videos >= {fewest} for these aspects (3 x their most classes) and --num-frames >= 2")
    args.shard_index, args.shard_count = parse_shard(p, args.shard)
    return args


# ---------------------------------------------------------------- scenes: what is where, frame by frame
# A scene is a list of frame states {"objects": [{"colour", "x", "y", "size"}], "light"}; x, y and
# size are fractions of the frame side. The renderer and the text description both read it.

def still(colour, x, y, size=0.14):
    return {"colour": colour, "x": x, "y": y, "size": size}


def appearing(objects_and_starts, frames, ends=None):
    """Frames in which each object is present from its start (to its end, if given)."""
    ends = ends or [frames] * len(objects_and_starts)
    return [{"objects": [o for (o, start), end in zip(objects_and_starts, ends) if start <= t < end], "light": 1.0}
            for t in range(frames)]


def scene_order(colours_in_order, rng, frames):
    """The objects appear one after another, each for a while; x slots are shuffled so place says nothing.
    How long each stays is drawn alike for all, whatever its rank: were the first to stay to the end, it
    would be in the most frames, and counting frames per colour, which needs no sense of order, would
    name it."""
    n = len(colours_in_order)
    slots = rng.permutation(np.linspace(0.2, 0.8, n))
    jitter = frames // (2 * n + 2)
    starts = [int(rng.integers(k * frames // (n + 1), k * frames // (n + 1) + jitter + 1)) for k in range(n)]
    longest = frames - ((n - 1) * frames // (n + 1) + jitter)  # the last start still fits it
    ends = [s + int(rng.integers(frames // 4, longest + 1)) for s in starts]
    return appearing([(still(c, float(x), float(rng.uniform(0.3, 0.7))), s) for c, x, s in zip(colours_in_order, slots, starts)],
                     frames, ends)


def scene_thirds(colours_by_third, rng, frames):
    """One object (or none) per part of the video, each present only during its part: beginning,
    middle and end, each a quarter to seven sixteenths of it. The three lengths are drawn alike, in
    random order, so how many frames an object is in does not tell its part (with equal thirds and
    8 frames sampled, the first third holds 2 and the others 3, and counting would name the
    beginning's object); each part still holds its third's middle frame."""
    lowest, highest = frames // 4, 7 * frames // 16
    splits = [(a, b) for a in range(lowest, highest + 1) for b in range(lowest, highest + 1) if lowest <= frames - a - b <= highest]
    first, second = splits[int(rng.integers(len(splits)))]
    bounds = [0, first, first + second, frames]
    shown = [(still(c, float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75))), bounds[k])
             for k, c in enumerate(colours_by_third) if c]
    ends = [bounds[k + 1] for k, c in enumerate(colours_by_third) if c]
    return appearing(shown, frames, ends)


def scene_motion(start, end, rng, frames, size=(0.14, 0.14), light=(1.0, 1.0)):
    """One object moving (or growing, or lit) linearly from `start` to `end` = (x, y)."""
    colour = str(rng.choice(list(COLOURS)))
    states = []
    for t in range(frames):
        a = t / (frames - 1)
        lerp = lambda pair: float(pair[0] + a * (pair[1] - pair[0]))
        states.append({"objects": [still(colour, lerp((start[0], end[0])), lerp((start[1], end[1])), lerp(size))],
                       "light": lerp(light)})
    return states


def refer_scene(third):
    def build(label, rng, frames):
        others = [c for c in COLOURS if c != list(COLOURS)[label]]
        colours = list(rng.permutation(others)[:2])
        colours.insert(third, list(COLOURS)[label])
        return scene_thirds([str(c) for c in colours], rng, frames)
    return build


def speed_scene(label, rng, frames):
    distance = 0.7 if label == 0 else 0.15
    sign = rng.choice([-1, 1])
    x0 = float(rng.uniform(0.15, 0.85 - distance)) if sign > 0 else float(rng.uniform(0.15 + distance, 0.85))
    y = float(rng.uniform(0.3, 0.7))
    return scene_motion((x0, y), (x0 + sign * distance, y), rng, frames)


def direction_scene(label, rng, frames):
    across = float(rng.uniform(0.3, 0.7))
    a, b = (0.15, 0.85) if label in (0, 2) else (0.85, 0.15)
    start, end = ((a, across), (b, across)) if label < 2 else ((across, a), (across, b))
    return scene_motion(start, end, rng, frames)


ORDER3 = list(itertools.permutations(("red", "green", "blue")))
# aspect: (question, option per label, scene builder(label, rng, frames))
ASPECTS = {
    "order_of_two": ("Which object appears first?", ["the red object", "the blue object"],
                     lambda label, rng, frames: scene_order(["red", "blue"][::1 - 2 * label], rng, frames)),
    "order_of_three": ("In which order do the objects appear?", [", then ".join(p) for p in ORDER3],
                       lambda label, rng, frames: scene_order(list(ORDER3[label]), rng, frames)),
    **{f"referring_{where}": (f"Which object is present at the {where} of the video?",
                              [f"the {c} object" for c in COLOURS], refer_scene(k)) for k, where in enumerate(THIRDS)},
    "grounding": ("When does the red object appear?", ["at the beginning", "in the middle", "at the end"],
                  lambda label, rng, frames: scene_thirds(["red" if k == label else None for k in range(3)], rng, frames)),
    "size": ("How does the object's size change?", ["it grows", "it shrinks"],
             lambda label, rng, frames: scene_motion((0.5, 0.5), (0.5, 0.5), rng, frames, size=(0.06, 0.3)[::1 - 2 * label])),
    "light": ("How does the scene's light change?", ["it gets brighter", "it gets darker"],
              lambda label, rng, frames: scene_motion((0.5, 0.5), (0.5, 0.5), rng, frames, light=(0.3, 1.0)[::1 - 2 * label])),
    "direction": ("In which direction does the object move?", ["to the right", "to the left", "down", "up"], direction_scene),
    "speed": ("How fast does the object move?", ["fast", "slowly"], speed_scene),
    "appearance": ("Which object is in the video?", [f"the {c} object" for c in COLOURS],
                   lambda label, rng, frames: appearing([(still(list(COLOURS)[label], float(rng.uniform(0.25, 0.75)),
                                                                float(rng.uniform(0.25, 0.75))), 0)], frames)),
}
# Order-free controls: any one frame answers them. A video LLM near chance here does not see the
# objects, and then its temporal numbers say nothing about time. Left out of the verdict's means.
# The probes read only what changes within a video, so they are near chance here by design.
CONTROLS = ("appearance",)


def plan_videos(aspects, num_videos, seed):
    """Every probe video: aspect, split and a balanced label; a fixed seed per video."""
    plans = []
    for aspect in aspects:
        classes = len(ASPECTS[aspect][1])
        num_test = max(classes, round(num_videos * TEST_SHARE))
        for i in range(num_videos):
            split = "test" if i < num_test else "train"
            plans.append({"id": f"{aspect}-{split}-{i:04d}", "aspect": aspect, "split": split, "label": i % classes,
                          "seed": seed * 1_000_003 + sum(map(ord, aspect)) * 7919 + i})
    return plans


def build_scene(plan):
    """(frame states, shape, background) of a planned video, from its seed alone."""
    rng = np.random.default_rng(plan["seed"])
    states = ASPECTS[plan["aspect"]][2](plan["label"], rng, RENDERED_FRAMES)
    shape = str(rng.choice(SHAPES[plan["split"]]))
    background = BACKGROUNDS[plan["split"]][int(rng.integers(len(BACKGROUNDS[plan["split"]])))]
    return states, shape, background


# ---------------------------------------------------------------- rendering and description

def shape_mask(shape, x, y, size, side):
    yy, xx = np.mgrid[0:side, 0:side] / side
    dx, dy, r = xx - x, yy - y, size / 2
    if shape == "square":
        return (abs(dx) <= r) & (abs(dy) <= r)
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r * 1.3
    return (dy >= -r) & (dy <= r) & (abs(dx) <= (dy + r) / 2)  # triangle, apex up


def render(states, shape, background, side=FRAME_SIDE):
    """uint8 frames [T, side, side, 3] of a scene."""
    frames = np.empty((len(states), side, side, 3), dtype=np.uint8)
    for t, state in enumerate(states):
        canvas = np.empty((side, side, 3), dtype=np.float32)
        canvas[:] = background
        for o in state["objects"]:
            canvas[shape_mask(shape, o["x"], o["y"], o["size"], side)] = COLOURS[o["colour"]]
        frames[t] = np.clip(canvas * state["light"], 0, 255).astype(np.uint8)
    return frames


def describe(states, shape, indices):
    """The frames the model sees, in words: what the text-only language model is given."""
    lines = []
    for n, t in enumerate(indices, 1):
        state = states[t]
        things = "; ".join(f"a {o['colour']} {shape} at x={o['x']:.2f}, y={o['y']:.2f}, size {o['size']:.2f}"
                           for o in state["objects"]) or "no objects"
        lines.append(f"Frame {n}: {things}; light {state['light']:.2f}.")
    return "\n".join(lines)


def write_video(path, frames, fps=8):
    """An H.264 mp4 (MPEG-4 part 2 where libx264 is missing), written atomically."""
    import av
    tmp = f"{path}.{os.getpid()}.tmp.mp4"
    with av.open(tmp, "w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": "12", "preset": "ultrafast"}
        except Exception:
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)


class ProbeVideo(TypedDict):
    """A rendered probe video as videos.jsonl keeps it and every later step reads it."""
    id: str  # "{aspect}-{split}-{number}"
    aspect: str  # the aspect it tests (a key of ASPECTS; CONTROLS are not temporal)
    split: str  # "train" or "test" (of the probes)
    label: int  # index of the right option
    video: str  # path relative to --out
    question: str
    options: list
    description: str  # frame-by-frame text for the text-only LLM


def render_videos(plans, out, num_frames) -> list[ProbeVideo]:
    """Write each planned video (skipping ones already there) and return its manifest record."""
    records = []
    for plan in tqdm(plans, desc="render", unit="video", mininterval=2):
        states, shape, background = build_scene(plan)
        relative = os.path.join("videos", plan["aspect"], plan["id"] + ".mp4")
        path = os.path.join(out, relative)
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_video(path, render(states, shape, background))
        question, options, _ = ASPECTS[plan["aspect"]]
        records.append({**{k: plan[k] for k in ("id", "aspect", "split", "label")}, "video": relative,
                        "question": question, "options": options,
                        "description": describe(states, shape, uniform_indices(RENDERED_FRAMES, num_frames))})
    return records


# ---------------------------------------------------------------- visual encodings

def video_tokens(model, processor, videos, device):
    """[videos, temporal units, tokens per unit, width]: what the model puts into its video tokens
    (its own get_video_features), with gradients where they are on. A unit is a frame, or a group of
    frames where the vision tower merges time (Qwen2-VL: 2); trailing separator rows are left out."""
    videos = list(videos)
    inputs = processor.video_processor(videos=videos, return_tensors="pt", **video_timing(videos))
    get = model.model.get_video_features
    params = inspect.signature(get).parameters
    kwargs = {k: v.to(device) for k, v in inputs.items() if k in params}
    for name in ("vision_feature_layer", "vision_feature_select_strategy"):
        if name in params and getattr(model.config, name, None) is not None:
            kwargs[name] = getattr(model.config, name)
    out = get(**kwargs)
    features = getattr(out, "pooler_output", out)
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    units = int(inputs["video_grid_thw"][0, 0]) if "video_grid_thw" in inputs else len(videos[0])
    per_video = features.float().reshape(len(videos), -1, features.shape[-1])
    per_unit = per_video.shape[1] // units  # rows past units * per_unit are separators (LLaVA-OneVision's newline)
    return per_video[:, :units * per_unit].reshape(len(videos), units, per_unit, -1)


@torch.no_grad()
def frame_features(model, processor, videos, device):
    """[videos, temporal units, width]: the video tokens of each temporal unit, mean-pooled over space."""
    return video_tokens(model, processor, videos, device).mean(2).cpu()


def encode_videos(model, processor, records, out, num_frames, batch_size, device, cache_key):
    """{id: [units, width]} for every record; features already cached under the same key are reused."""
    from safetensors import safe_open
    from safetensors.torch import save
    path = os.path.join(out, "features.safetensors")
    cached = {}
    if os.path.isfile(path):
        with safe_open(path, "pt") as f:
            if f.metadata() == cache_key:
                cached = {key: f.get_tensor(key) for key in f.keys()}
    todo = [r for r in records if r["id"] not in cached]
    print(f"visual encodings: {len(records) - len(todo)} reused from {path}, {len(todo)} to compute")
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    for start in tqdm(range(0, len(todo), batch_size), desc="visual encodings", unit="batch", mininterval=2):
        batch = todo[start:start + batch_size]
        frames = [sample_frames(os.path.join(out, r["video"]), num_frames) for r in batch]
        for r, f in zip(batch, frame_features(hf_model, processor, frames, device)):
            cached[r["id"]] = f.contiguous()
    if todo:
        with atomic_write(path, "wb") as f:
            f.write(save(cached, metadata=cache_key))
    return {r["id"]: cached[r["id"]] for r in records}


# ---------------------------------------------------------------- probes

class LinearProbe(torch.nn.Module):
    """A linear classifier over all frames' features at once (so it may use their order)."""
    def __init__(self, units, width, classes):
        super().__init__()
        self.linear = torch.nn.Linear(units * width, classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


class TemporalProbe(torch.nn.Module):
    """A small GRU reading the frames' features in order, classified from its last state."""
    def __init__(self, units, width, classes, hidden=16):
        super().__init__()
        self.gru = torch.nn.GRU(width, hidden, batch_first=True)
        self.classify = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        return self.classify(self.gru(x)[1][-1])


PROBES = {"linear": LinearProbe, "temporal": TemporalProbe}


def train_probe(kind, x_train, y_train, x_test, y_test, classes, seed, epochs=300, patience=50, lr=1e-2, l2=0.05):
    """Test accuracy of a probe trained with Adam and an L2 penalty on its weight matrices (few
    videos, many feature dimensions) on 80% of the training split, stopped early (and restored
    to its best state) by accuracy on the other 20%."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_train), generator=generator)
    held = order[:max(classes, len(order) // 5)]
    fit = order[len(held):]
    mean, std = x_train[fit].mean((0, 1)), x_train[fit].std((0, 1)) + 1e-6
    norm = lambda x: (x - mean) / std
    torch.manual_seed(seed)
    probe = PROBES[kind](x_train.shape[1], x_train.shape[2], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    matrices = [p for p in probe.parameters() if p.dim() > 1]
    accuracy = lambda x, y: float((probe(norm(x)).argmax(-1) == y).float().mean())
    best, best_state, waited = -1.0, None, 0
    for _ in range(epochs):
        probe.train()
        for batch in torch.randperm(len(fit), generator=generator).split(64):
            rows = fit[batch]
            loss = torch.nn.functional.cross_entropy(probe(norm(x_train[rows])), y_train[rows])
            loss = loss + l2 * sum(m.pow(2).sum() for m in matrices)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probe.eval()
        with torch.no_grad():
            score = accuracy(x_train[held], y_train[held])
        if score >= best:
            best, best_state, waited = score, {k: v.clone() for k, v in probe.state_dict().items()}, 0
        elif (waited := waited + 1) >= patience:
            break
    probe.load_state_dict(best_state)
    probe.eval()
    with torch.no_grad():
        return accuracy(x_test, y_test)


def probe_results(records, features, seeds, seed):
    """{aspect: {kind: {mean, std, runs}}} over `seeds` trainings of each probe kind."""
    results = {}
    aspects = [a for a in dict.fromkeys(r["aspect"] for r in records) if a not in CONTROLS]  # nothing changes in those
    for aspect in tqdm(aspects, desc="probes", unit="aspect"):
        data = {}
        for split in ("train", "test"):
            rows = sorted((r for r in records if r["aspect"] == aspect and r["split"] == split), key=lambda r: r["id"])
            stacked = torch.stack([features[r["id"]] for r in rows])
            # Each frame relative to its video's average frame: what stays constant over a video (background,
            # shapes, which differ between the splits) drops out, and what changes over time stays.
            data[split] = (stacked - stacked.mean(1, keepdim=True), torch.tensor([r["label"] for r in rows]))
        classes = len(ASPECTS[aspect][1])
        results[aspect] = {}
        for kind in PROBES:
            runs = [train_probe(kind, *data["train"], *data["test"], classes, seed + s) for s in range(seeds)]
            spread = float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0  # the sample standard deviation
            results[aspect][kind] = {"mean": round(float(np.mean(runs)), 4), "std": round(spread, 4),
                                     "runs": [round(r, 4) for r in runs]}
    return results


# ---------------------------------------------------------------- the language model's answers

TEXT_PREFIX = "These are descriptions of a video's frames, in order:\n{description}\n\n"


def ask(model, processor, records, out, args, device):
    """[{id, text_scores, video_scores[, text_reply, video_reply]}] for the test videos: the same
    multiple-choice question from the description alone, then from the video."""
    answers = []
    tests = [r for r in records if r["split"] == "test"]
    for start in tqdm(range(0, len(tests), args.batch_size), desc="LLM answers", unit="batch", mininterval=2):
        batch = tests[start:start + args.batch_size]
        options = [r["options"] for r in batch]
        prompts = [choice_prompt(r["question"], r["options"]) for r in batch]
        text = [(None, TEXT_PREFIX.format(description=r["description"]) + p) for r, p in zip(batch, prompts)]
        video = [(sample_frames(os.path.join(out, r["video"]), args.num_frames), p) for r, p in zip(batch, prompts)]
        entries = [{"id": r["id"]} for r in batch]
        for name, requests in (("text", text), ("video", video)):
            for entry, scores in zip(entries, choice_logprobs(model, processor, requests, options, device)):
                entry[f"{name}_scores"] = scores
            if args.generate:
                for entry, reply in zip(entries, choice_generate(model, processor, requests, device)):
                    entry[f"{name}_reply"] = reply
        answers += entries
    return answers


def answer_accuracy(records, answers, aspect, key, calibrate=False):
    """Accuracy of one way of answering (`text_scores`, `video_reply`, ...) on an aspect's test videos;
    with `calibrate`, of the scores once the model's prior over the option letters on this aspect's
    test videos is divided out (calibrated_choices: no answer is used)."""
    by_id = {a["id"]: a for a in answers}
    tests = [r for r in records if r["aspect"] == aspect and r["split"] == "test" and key in by_id.get(r["id"], {})]
    values = [by_id[r["id"]][key] for r in tests]
    if calibrate:
        chosen = calibrated_choices(values) if values else []
    elif key.endswith("scores"):
        chosen = [max(range(len(v)), key=v.__getitem__) for v in values]
    else:
        chosen = [extract_choice(v, r["options"]) for v, r in zip(values, tests)]
    hits = [c == r["label"] for c, r in zip(chosen, tests)]
    return round(float(np.mean(hits)), 4) if hits else None


# ---------------------------------------------------------------- report

def mean_lift(rows, key):
    """Accuracy above chance averaged over the aspects, with a normal 95% interval; each aspect's
    variance from its Agresti-Coull proportion on its test videos (2 right and 2 wrong added), so an
    aspect at 0% or 100% of few videos still counts as uncertain."""
    usable = [row for row in rows.values() if row.get(key) is not None]
    if not usable:
        return None
    lift = float(np.mean([row[key] - row["chance"] for row in usable]))
    adjusted = [((row[key] * row["test_videos"] + 2) / (row["test_videos"] + 4), row["test_videos"] + 4) for row in usable]
    variance = sum(p * (1 - p) / n for p, n in adjusted) / len(usable) ** 2
    half = 1.96 * variance ** 0.5
    return {"lift": round(lift, 4), "interval": [round(lift - half, 4), round(lift + half, 4)], "key": key}


def verdict(rows):
    """One sentence on where the bottleneck is, said only when the 95% intervals of the mean lift
    above chance of the better probe and of the better language-model column over the temporal
    aspects do not overlap; then one on what the order-free control says about sight."""
    temporal = {aspect: row for aspect, row in rows.items() if aspect not in CONTROLS}
    measured = any(row.get("video_llm") is not None or row.get("text_llm") is not None for row in temporal.values())
    said = bottleneck(temporal) if measured else "No temporal aspect was measured."
    control = {aspect: row for aspect, row in rows.items() if aspect in CONTROLS and row.get("video_llm") is not None}
    return f"{said} {sight(control)}" if control else said


def sight(control):
    """Whether the video LLM sees the objects, from the order-free control (Wilson intervals, as in the
    table): said only when its interval is wholly above chance, wholly within 10 points of it, or wholly
    more than 10 points below it."""
    row = next(iter(control.values()))
    low, high = (bound - row["chance"] for bound in row["video_llm_interval"])
    said = f"{100 * (row['video_llm'] - row['chance']):+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] points above chance"
    if low > 0:
        return f"The video LLM sees the objects (order-free control: {said}): its temporal numbers measure time, not sight."
    if high < -0.1:
        return (f"The video LLM is below chance on the order-free control ({said}): it leans to wrong options, "
                "so its temporal numbers on these videos say nothing about time.")
    if high >= 0.1 or low <= -0.1:
        return (f"Not enough videos in the order-free control to tell whether the video LLM sees the objects ({said}); "
                "more --num-videos narrows the interval.")
    from_text = row.get("text_llm_interval") and row["text_llm_interval"][0] > row["chance"]
    return (f"The video LLM is at chance on the order-free control ({said}), "
            + ("which it answers from the text description: it does not see the objects, so temporal numbers on these "
               "videos say nothing about time." if from_text else
               "and the text LLM is not above chance either: the language model or the answer format fails, not only sight."))


COLUMN_NAMES = {"probe_linear": "linear probes", "probe_temporal": "temporal probes",
                "text_llm": "language model from text", "video_llm": "language model from video",
                "text_llm_calibrated": "language model from text, its letter prior divided out",
                "video_llm_calibrated": "language model from video, its letter prior divided out"}
PROBE_COLUMNS = ("probe_linear", "probe_temporal")
LLM_COLUMNS = ("text_llm", "video_llm", "text_llm_calibrated", "video_llm_calibrated")


def bottleneck(rows):
    """Where the bottleneck is, from the mean lifts of the best probe and the best language-model column:
    the language model is given its best showing, with its letter prior divided out too (a model that
    tells the options apart but favours one letter is at chance only in its raw answers)."""
    probe = max(filter(None, (mean_lift(rows, k) for k in PROBE_COLUMNS)), key=lambda x: x["lift"])
    llm = max(filter(None, (mean_lift(rows, k) for k in LLM_COLUMNS)), key=lambda x: x["lift"])
    say = lambda x: (f"{COLUMN_NAMES[x['key']]} {100 * x['lift']:+.1f} "
                     f"[{100 * x['interval'][0]:+.1f}, {100 * x['interval'][1]:+.1f}]")
    lifts = f"(points above chance, mean over the temporal aspects, the best of each kind: {say(probe)}, {say(llm)})"
    if probe["interval"][1] < 0.1:
        return f"The visual encodings carry little temporal signal: the vision encoder is the bottleneck {lifts}."
    if probe["interval"][0] > llm["interval"][1]:
        return ("The visual encodings carry the temporal signal, but the language model does not use it, even from text: "
                f"the language model is the bottleneck {lifts}.")
    if llm["interval"][0] > probe["interval"][1]:
        return f"The language model does better than the probes: no language-model bottleneck {lifts}."
    return (f"Not enough test videos to tell: the intervals overlap {lifts}; "
            "more --num-videos narrows them.")


def accuracy_text(row, key):
    """"62.5 [40.9, 79.9]" (95% Wilson interval), with "± std" over seeds for the probes."""
    if row.get(key) is None:
        return "-"
    low, high = row[f"{key}_interval"]
    spread = f" ± {100 * row[key + '_std']:.1f}" if key + "_std" in row else ""
    return f"{100 * row[key]:.1f}{spread} [{100 * low:.1f}, {100 * high:.1f}]"


def report(records, features, answers, args, meta):
    probes = probe_results(records, features, args.seeds, args.seed)
    rows = {}
    for aspect in dict.fromkeys(r["aspect"] for r in records):
        row = {"chance": round(1 / len(ASPECTS[aspect][1]), 4)}
        for kind, results in probes.get(aspect, {}).items():  # none for a control (see CONTROLS)
            row[f"probe_{kind}"], row[f"probe_{kind}_std"] = results["mean"], results["std"]
        for key in ("text", "video"):
            row[f"{key}_llm"] = answer_accuracy(records, answers, aspect, f"{key}_scores")
            row[f"{key}_llm_calibrated"] = answer_accuracy(records, answers, aspect, f"{key}_scores", calibrate=True)
            if args.generate:
                row[f"{key}_llm_generate"] = answer_accuracy(records, answers, aspect, f"{key}_reply")
        row["test_videos"] = sum(r["aspect"] == aspect and r["split"] == "test" for r in records)
        for key in [k for k in row if k.endswith(("_llm", "_generate", "_calibrated")) or k in PROBE_COLUMNS]:
            if row[key] is not None:  # probes: the interval of their mean accuracy over seeds, as one run's
                row[f"{key}_interval"] = wilson_interval(round(row[key] * row["test_videos"]), row["test_videos"])
        rows[aspect] = row
    summary = verdict(rows)
    with atomic_write(os.path.join(args.out, "report.json")) as f:
        temporal = {aspect: row for aspect, row in rows.items() if aspect not in CONTROLS}
        json.dump({"meta": meta, "verdict": summary, "aspects": rows, "controls": [a for a in rows if a in CONTROLS],
                   "temporal_means": {key: mean_lift(temporal, key) for key in PROBE_COLUMNS + LLM_COLUMNS},
                   "probe_runs": probes}, f, indent=1)
    columns = ["chance", *PROBE_COLUMNS, *LLM_COLUMNS]
    columns += ["text_llm_generate", "video_llm_generate"] if args.generate else []
    lines = ["| aspect (test videos) | " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for aspect, row in rows.items():
        cells = [f"{100 * row[c]:.1f}" if c == "chance" else accuracy_text(row, c) for c in columns]
        name = f"{aspect} (control, {row['test_videos']})" if aspect in CONTROLS else f"{aspect} ({row['test_videos']})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with atomic_write(os.path.join(args.out, "report.md")) as f:
        f.write(f"# Temporal bottleneck: {meta.get('model')}\n\nAccuracy in % on the test videos (probes: mean ± std over "
                f"{args.seeds} seeds), in brackets its 95% interval (Wilson) over the test videos. Probes read the "
                "model's pooled visual encodings; the text LLM reads a frame-by-frame description; the video LLM sees "
                f"{args.num_frames} frames. Calibrated: the same answers with the model's prior over the option letters "
                "(its mean probability for each on the aspect's test videos; no answer is used) divided out, so that a "
                f"model that tells the options apart but favours one letter is not taken for one at chance.\n\n{table}\n\n{summary}\n")
    print(table)
    print(summary)


def write_benches(records, out):
    """The test videos as benchmark records for stage 06 (`video` relative to OUT): the temporal aspects in
    probe_bench.jsonl, the order-free control apart in probe_control_bench.jsonl (if it was run)."""
    for name, control in (("probe_bench", False), ("probe_control_bench", True)):
        bench = [{"id": r["id"], "video": r["video"], "question": r["question"], "options": r["options"],
                  "answer": LETTERS[r["label"]], "task_type": r["aspect"], "source": "probe"}
                 for r in records if r["split"] == "test" and (r["aspect"] in CONTROLS) == control]
        if bench:
            write_jsonl(os.path.join(out, f"{name}.jsonl"), bench)


def read_shard(folder, out):
    """A shard folder's records (videos re-pointed relative to OUT), features and answers."""
    from safetensors.torch import load_file
    paths = [os.path.join(folder, name) for name in ("videos.jsonl", "features.safetensors", "answers.jsonl", "meta.json")]
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"{path}: missing; did this shard finish?")
    records = [r for _, r in read_jsonl(paths[0])]
    for r in records:
        r["video"] = os.path.relpath(os.path.join(folder, r["video"]), out)
    return records, load_file(paths[1]), [a for _, a in read_jsonl(paths[2])], json.loads(read_text(paths[3]))


def merge(args):
    records, features, answers, meta = [], {}, [], {}
    for folder in args.merge:
        r, f, a, meta = read_shard(folder, args.out)
        records, answers = records + r, answers + a
        features.update(f)
    args.seeds, args.seed, args.num_frames, args.generate = meta["seeds"], meta["seed"], meta["num_frames"], meta["generate"]
    make_out_dir(args.out)
    write_benches(records, args.out)
    report(records, features, answers, args, {**meta, "merged": args.merge})


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    check_model_path(args.model)  # before rendering: a mistyped --model fails in seconds
    make_out_dir(args.out)
    plans = plan_videos(args.aspects, args.num_videos, args.seed)[args.shard_index::args.shard_count]
    records = render_videos(plans, args.out, args.num_frames)
    write_jsonl(os.path.join(args.out, "videos.jsonl"), records)
    device = pick_device()
    model, processor = load_for_inference(args.model, args.adapter, args.four_bit, device)
    began = time.perf_counter()
    cache_key = {"model": os.path.abspath(args.model) if os.path.isdir(args.model) else args.model,
                 "num_frames": str(args.num_frames)}
    features = encode_videos(model, processor, records, args.out, args.num_frames, args.batch_size, device, cache_key)
    answers = ask(model, processor, records, args.out, args, device)
    write_jsonl(os.path.join(args.out, "answers.jsonl"), answers)
    meta = {"model": args.model, "adapter": args.adapter, "num_frames": args.num_frames, "num_videos": args.num_videos,
            "seeds": args.seeds, "seed": args.seed, "generate": args.generate, "shard": args.shard,
            "seconds_encode_and_ask": round(time.perf_counter() - began, 1)}
    with atomic_write(os.path.join(args.out, "meta.json")) as f:
        json.dump(meta, f, indent=1)
    if args.shard_count > 1:
        print(f"shard {args.shard} done; when every shard is, run: python 02_probe.py --merge <shard folders> --out DIR")
        return
    write_benches(records, args.out)
    report(records, features, answers, args, meta)
    print(f"report in {args.out}/report.md; benchmarks for stage 06 in {args.out}/probe_bench.jsonl (temporal) "
          f"and probe_control_bench.jsonl (the order-free control)")


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
def write_jsonl(path, records):
    """Replace `path` with these records, atomically."""
    with atomic_write(path) as f:
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
