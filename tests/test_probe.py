"""Stage 02: the renderer's ground truth, descriptions, probes, reports, shards, both architectures."""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, load_stage, run_in_process

probe = load_stage("02_probe.py")


def run_probe(model, out, *extra):
    """Stage 02, in this process (no interpreter and torch start-up per run)."""
    return run_in_process("02_probe.py", "--model", model, "--out", out, "--num-frames", 8, "--seeds", 2, *extra)


def decoded_scene(plan, tmp_path):
    """(all 32 decoded frames, background colour) of a planned video, written as a real mp4."""
    states, shape, background = probe.build_scene(plan)
    path = str(tmp_path / f"{plan['id']}.mp4")
    probe.write_video(path, probe.render(states, shape, background))
    return probe.sample_frames(path, probe.RENDERED_FRAMES, indices=range(probe.RENDERED_FRAMES)).astype(int), background


def colours_in(frame):
    """Named colours covering at least 10 pixels of a decoded frame (at full light)."""
    return {name for name, rgb in probe.COLOURS.items() if (np.abs(frame - rgb).max(-1) < 60).sum() >= 10}


def object_pixels(frame, background, light=1.0):
    return np.abs(frame - np.array(background) * light).max(-1) > 40


def first_seen(frames):
    order = []
    for frame in frames:
        order += sorted(colours_in(frame) - set(order))
    return order


@pytest.mark.parametrize("split", ["train", "test"])
def test_decoded_videos_show_what_the_labels_say(split, tmp_path):
    plans = [p for p in probe.plan_videos(list(probe.ASPECTS), 8, seed=3) if p["split"] == split or split == "train"]
    checked = set()
    for plan in plans:
        frames, background = decoded_scene(plan, tmp_path)
        aspect, label = plan["aspect"], plan["label"]
        third_middles = [int((k + 0.5) * len(frames) / 3) for k in range(3)]
        if aspect == "order_of_two":
            assert first_seen(frames) == [["red", "blue"], ["blue", "red"]][label]
        elif aspect == "order_of_three":
            assert tuple(first_seen(frames)) == probe.ORDER3[label]
        elif aspect.startswith("referring_"):
            where = probe.THIRDS.index(aspect.split("_")[1])
            assert colours_in(frames[third_middles[where]]) == {list(probe.COLOURS)[label]}
            assert all(len(colours_in(frames[t])) == 1 for t in third_middles)
        elif aspect == "grounding":
            assert ["red" in colours_in(frames[t]) for t in third_middles] == [k == label for k in range(3)]
        elif aspect in ("direction", "speed", "size"):
            first, last = (np.argwhere(object_pixels(frames[t], background)) for t in (0, -1))
            if aspect == "size":
                assert (len(last) > 4 * len(first)) == (label == 0) and (len(first) > 4 * len(last)) == (label == 1)
            else:
                (y0, x0), (y1, x1) = first.mean(0), last.mean(0)
                side = frames.shape[1]
                if aspect == "direction":
                    assert [x1 - x0 > side / 3, x0 - x1 > side / 3, y1 - y0 > side / 3, y0 - y1 > side / 3][label]
                else:
                    moved = abs(x1 - x0)
                    assert moved > 0.5 * side if label == 0 else moved < 0.25 * side
        elif aspect == "appearance":  # the order-free control: the object is there in every frame
            assert all(colours_in(frame) == {list(probe.COLOURS)[label]} for frame in frames[::4])
        elif aspect == "light":
            brighter = frames[-1].mean() > 2 * frames[0].mean()
            darker = frames[0].mean() > 2 * frames[-1].mean()
            assert (brighter, darker) == ((True, False) if label == 0 else (False, True))
        checked.add(aspect)
    assert checked == set(probe.ASPECTS)


def frame_counts(plan, num_frames):
    """How many of the sampled frames each colour is in."""
    states, _, _ = probe.build_scene(plan)
    return collections.Counter(o["colour"] for t in probe.uniform_indices(len(states), num_frames) for o in states[t]["objects"])


def test_counting_frames_does_not_tell_the_order():
    """The order questions need order: naming the colour seen in the most sampled frames (ties split)
    picks the first object no more often than chance, so a model that only counts cannot pass them."""
    for aspect, chance in (("order_of_two", 1 / 2), ("order_of_three", 1 / 3)):
        picked = 0.0
        plans = probe.plan_videos([aspect], 300, seed=0)
        for plan in plans:
            counts = frame_counts(plan, 8)
            first = next(iter(counts))  # a Counter keeps the order colours were first seen in
            most = [c for c in counts if counts[c] == max(counts.values())]
            picked += (first in most) / len(most)
        assert abs(picked / len(plans) - chance) < 0.06, aspect


@pytest.mark.parametrize("num_frames", [8, 16])
def test_counting_frames_does_not_tell_the_part_of_the_video(num_frames):
    """Which object is at the beginning, middle or end, and when the red one appears, need order too:
    the best rule that sees only how many frames each colour is in (fitted on the answers themselves)
    does little better than picking one of the objects in the video, or one of the three parts."""
    colours = list(probe.COLOURS)
    for aspect in ("referring_beginning", "referring_middle", "referring_end", "grounding"):
        by_counts = collections.defaultdict(lambda: collections.defaultdict(float))
        plans = probe.plan_videos([aspect], 600, seed=0)
        for plan in plans:
            counts = frame_counts(plan, num_frames)
            if aspect == "grounding":
                by_counts[counts["red"]][plan["label"]] += 1
            else:  # a counter can only pick a count, then one of the objects with it
                answer = counts[colours[plan["label"]]]
                by_counts[tuple(sorted(counts.values()))][answer] += 1 / sum(v == answer for v in counts.values())
        best = sum(max(guesses.values()) for guesses in by_counts.values()) / len(plans)
        assert best < 1 / 3 + 0.1, (aspect, best)  # equal thirds: 1.0 for the beginning at 8 frames


def test_descriptions_name_what_the_sampled_frames_show(tmp_path):
    for plan in probe.plan_videos(["order_of_three", "grounding", "referring_middle"], 6, seed=1)[::2]:
        frames, _ = decoded_scene(plan, tmp_path)
        states, shape, _ = probe.build_scene(plan)
        indices = probe.uniform_indices(probe.RENDERED_FRAMES, 8)
        lines = probe.describe(states, shape, indices).split("\n")
        assert len(lines) == 8
        for line, t in zip(lines, indices):
            assert {c for c in probe.COLOURS if f"a {c} {shape}" in line} == colours_in(frames[t])


def test_splits_differ_in_appearance_only():
    plans = probe.plan_videos(list(probe.ASPECTS), 12, seed=0)
    for split in ("train", "test"):
        scenes = [probe.build_scene(p) for p in plans if p["split"] == split]
        assert {shape for _, shape, _ in scenes} <= set(probe.SHAPES[split])
        assert {tuple(bg) for _, _, bg in scenes} <= set(probe.BACKGROUNDS[split])
    test_labels = [p["label"] for p in plans if p["aspect"] == "direction" and p["split"] == "test"]
    assert sorted(set(test_labels)) == [0, 1, 2, 3]  # every class in the test split


@pytest.fixture(scope="module")
def qwen_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-qwen")
    result = run_probe(tiny_models["qwen2_vl"], out, "--aspects", "size,direction,grounding", "--num-videos", "60")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_probe_learns_the_signal_and_not_shuffled_labels(qwen_run):
    from safetensors.torch import load_file
    records = read_jsonl(qwen_run / "videos.jsonl")
    features = load_file(str(qwen_run / "features.safetensors"))
    report = json.load(open(qwen_run / "report.json"))
    for aspect in ("size", "direction"):
        row = report["aspects"][aspect]
        assert max(row["probe_linear"], row["probe_temporal"]) >= row["chance"] + 0.3, (aspect, row)
    rng = np.random.default_rng(0)
    # labels shuffled within each aspect keep the class balance but lose any link to the video
    shuffled = []
    for aspect in ("size", "direction"):
        rows = [r for r in records if r["aspect"] == aspect]
        shuffled += [dict(r, label=int(label)) for r, label in zip(rows, rng.permutation([r["label"] for r in rows]))]
    results = probe.probe_results(shuffled, features, seeds=3, seed=0)
    for aspect, kinds in results.items():
        chance = 1 / len(probe.ASPECTS[aspect][1])
        for kind, result in kinds.items():
            assert result["mean"] < chance + 0.2, (aspect, kind, result)


def test_probe_on_planted_signal_and_on_noise():
    torch.manual_seed(0)
    labels = torch.arange(120) % 3
    noise = torch.randn(120, 6, 16)
    signal = noise.clone()
    signal[torch.arange(120), 2 * labels, 0] += 4.0  # the class is which frame carries a bump
    for kind in probe.PROBES:
        assert probe.train_probe(kind, signal[:80], labels[:80], signal[80:], labels[80:], 3, seed=0) >= 0.8
        assert probe.train_probe(kind, noise[:80], labels[:80], noise[80:], labels[80:], 3, seed=0) < 0.5


def test_report_files_are_complete(qwen_run):
    report = json.load(open(qwen_run / "report.json"))
    assert set(report["aspects"]) == {"size", "direction", "grounding"}
    for row in report["aspects"].values():
        for key in ("chance", *probe.PROBE_COLUMNS, *probe.LLM_COLUMNS):
            assert 0 <= row[key] <= 1
        assert row["test_videos"] == 20
    assert report["verdict"] and len(report["probe_runs"]["size"]["linear"]["runs"]) == 2
    table = open(qwen_run / "report.md").read()
    assert all(f"| {aspect} (20) |" in table for aspect in report["aspects"]) and report["verdict"] in table
    bench = read_jsonl(qwen_run / "probe_bench.jsonl")
    assert len(bench) == 60
    for record in bench:
        assert set(record) == {"id", "video", "question", "options", "answer", "task_type", "source"}
        assert os.path.isfile(qwen_run / record["video"]) and not os.path.isabs(record["video"])
        assert record["answer"] in "ABCD"[:len(record["options"])]


def test_features_are_cached_for_a_rerun(tiny_models, qwen_run, tmp_path):
    features = qwen_run / "features.safetensors"
    before = os.stat(features).st_mtime_ns
    result = run_probe(tiny_models["qwen2_vl"], qwen_run, "--aspects", "size,direction,grounding", "--num-videos", "60")
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.stat(features).st_mtime_ns == before
    assert f"visual encodings: 180 reused from {features}, 0 to compute" in result.stdout


def test_llava_onevision_end_to_end_with_generation(tiny_models, tmp_path):
    result = run_probe(tiny_models["llava_onevision"], tmp_path, "--aspects", "order_of_two,light", "--num-videos", "18",
                       "--generate")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.load(open(tmp_path / "report.json"))["aspects"]
    assert all(row[k] is not None for row in rows.values() for k in ("text_llm_generate", "video_llm_generate"))
    answers = read_jsonl(tmp_path / "answers.jsonl")
    assert len(answers) == 12 and all(isinstance(a["video_reply"], str) and len(a["text_scores"]) == 2 for a in answers)


def test_shards_merge_to_the_single_run(tiny_models, tmp_path):
    common = ["--aspects", "size,grounding", "--num-videos", "9", "--seeds", "1"]
    assert run_probe(tiny_models["qwen2_vl"], tmp_path / "whole", *common).returncode == 0
    for i in range(2):
        result = run_probe(tiny_models["qwen2_vl"], tmp_path / f"shard{i}", *common, "--shard", f"{i}/2")
        assert result.returncode == 0, result.stderr[-2000:]
        assert not (tmp_path / f"shard{i}" / "report.json").exists()
    merged = run_in_process("02_probe.py", "--merge", tmp_path / "shard0", tmp_path / "shard1", "--out", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr[-2000:]
    whole, joined = (json.load(open(tmp_path / d / "report.json"))["aspects"] for d in ("whole", "merged"))
    assert joined == whole
    bench = read_jsonl(tmp_path / "merged" / "probe_bench.jsonl")
    assert len(bench) == 6 and all(os.path.isfile(tmp_path / "merged" / r["video"]) for r in bench)


def test_missing_model_is_one_line(tmp_path):
    """As a shell sees it: its own process, so any warning the stage prints would show in stderr."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "02_probe.py"), "--model", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "out"), "--aspects", "size", "--num-videos", "6"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'}: no such model folder"


def test_the_verdict_waits_for_intervals_that_do_not_overlap():
    """4 test videos per aspect cannot separate 60% from 30%; 200 can."""
    def rows(n):
        return {aspect: {"chance": 0.25, "probe_linear": 0.6, "probe_temporal": 0.55, "text_llm": 0.3, "video_llm": 0.28,
                         "test_videos": n} for aspect in ("direction", "order")}
    assert probe.verdict(rows(4)).startswith("Not enough test videos to tell")
    assert "the language model is the bottleneck (points above chance" in probe.verdict(rows(200))
    assert probe.mean_lift(rows(200), "probe_linear")["lift"] == pytest.approx(0.35)
    assert "the best of each kind: linear probes +35.0 [" in probe.verdict(rows(200))
    assert ", language model from text +5.0 [" in probe.verdict(rows(200))


def test_the_language_model_is_judged_at_its_best_with_its_letter_prior_divided_out():
    """A model whose raw answers favour one letter but whose scores tell the options apart is not at
    chance: the verdict takes its calibrated column when that is its best, and names it."""
    rows = {a: {"chance": 0.5, "probe_linear": 0.95, "text_llm": 0.5, "video_llm": 0.5, "video_llm_calibrated": 0.97,
                "test_videos": 200} for a in ("order_of_two", "size")}
    said = probe.verdict(rows)
    assert "language model from video, its letter prior divided out +47.0 [" in said
    assert not said.startswith("The visual encodings carry the temporal signal, but the language model does not use it")
    records = [{"id": f"v{i}", "aspect": "order_of_two", "split": "test", "label": i % 2, "options": ["red", "blue"]}
               for i in range(20)]
    answers = [{"id": f"v{i}", "video_scores": [-0.1, -3.0] if i % 2 == 0 else [-0.4, -1.2]} for i in range(20)]
    assert probe.answer_accuracy(records, answers, "order_of_two", "video_scores") == 0.5  # always A
    assert probe.answer_accuracy(records, answers, "order_of_two", "video_scores", calibrate=True) == 1.0


def test_an_aspect_at_0_or_100_percent_still_counts_as_uncertain():
    """12 of 12 right on every aspect is not certainty: the mean lift's interval keeps a width."""
    rows = {a: {"chance": 0.5, "probe_linear": 1.0, "test_videos": 12} for a in ("size", "light")}
    low, high = probe.mean_lift(rows, "probe_linear")["interval"]
    assert low < 0.5 - 0.05 and high > 0.5


def test_the_control_is_kept_out_of_the_verdicts_means_and_says_whether_the_model_sees():
    """The order-free control does not dilute the temporal means; it adds whether the video LLM sees the
    objects, from the same Wilson intervals as the table, and says so only when the interval decides."""
    temporal = {a: {"chance": 0.25, "probe_linear": 0.6, "probe_temporal": 0.55, "text_llm": 0.3, "video_llm": 0.28,
                    "test_videos": 200} for a in ("direction", "order_of_three")}

    def control(video, text, n=200):
        row = {"chance": 0.25, "text_llm": text, "video_llm": video, "test_videos": n}
        for key in ("text_llm", "video_llm"):
            row[f"{key}_interval"] = probe.wilson_interval(round(row[key] * n), n)
        return dict(temporal, appearance=row)
    assert probe.verdict(control(0.95, 0.99)).startswith(probe.verdict(temporal))  # the control is not in the means
    assert "The video LLM sees the objects (order-free control: +70.0 [" in probe.verdict(control(0.95, 0.99))
    assert "it does not see the objects" in probe.verdict(control(0.26, 0.99))
    assert "and the text LLM is not above chance either: the language model or the answer format fails" in probe.verdict(control(0.26, 0.25))
    assert "Not enough videos in the order-free control to tell" in probe.verdict(control(0.5, 0.99, n=4))  # 2 of 4: [15.0, 85.0]
    assert "The video LLM is below chance on the order-free control (-25.0 [" in probe.verdict(control(0.0, 0.99, n=40))
    assert "Not enough videos in the order-free control to tell" in probe.verdict(control(0.125, 0.99, n=8))  # [2.2, 47.1]
    assert probe.verdict({"appearance": control(0.95, 0.99)["appearance"]}).startswith("No temporal aspect was measured.")


def test_the_control_runs_apart_from_the_temporal_aspects(tiny_models, tmp_path):
    """The control's test videos go to their own benchmark file, its probe cells are empty (nothing changes
    within its videos), and the verdict adds a sentence on sight."""
    result = run_probe(tiny_models["qwen2_vl"], tmp_path, "--aspects", "appearance,size", "--num-videos", "12",
                       "--num-frames", "4", "--seeds", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.load(open(tmp_path / "report.json"))
    assert report["controls"] == ["appearance"] and "probe_linear" not in report["aspects"]["appearance"]
    size = {"size": report["aspects"]["size"]}  # the verdict's means, over the temporal aspects only
    assert report["temporal_means"] == {k: probe.mean_lift(size, k) for k in probe.PROBE_COLUMNS + probe.LLM_COLUMNS}
    assert set(report["probe_runs"]) == {"size"}
    assert "order-free control" in report["verdict"] and "| appearance (control, 4) | 25.0 | - | - |" in open(tmp_path / "report.md").read()
    for name, aspects in (("probe_bench", {"size"}), ("probe_control_bench", {"appearance"})):
        assert {r["task_type"] for r in read_jsonl(tmp_path / f"{name}.jsonl")} == aspects
