"""Stage 04: frame indices per pair, the ratio, filters, resume after a kill, shards, bad videos."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_stage, run_in_process
from videos import frames_for, write_video

pairs_stage = load_stage("04_build_pairs.py")
SCRIPT = os.path.join(REPO, "04_build_pairs.py")


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    (folder / "nested").mkdir()
    for i in range(3):
        write_video(folder / ("nested" if i == 2 else ".") / f"clip{i}.mp4", frames_for(40, seed=i))
    (folder / "broken.mp4").write_bytes(b"not a video" * 40)
    (folder / "notes.txt").write_text("not a video either")
    return folder


@pytest.fixture(scope="module")
def t3_adapter(tiny_models, tmp_path_factory):
    """A briefly T3-tuned adapter, so the tiny model ends its answers (as the pipeline runs it)."""
    data, out = tmp_path_factory.mktemp("t3"), tmp_path_factory.mktemp("adapter")
    subprocess.run([sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", str(data), "--num-train", "200",
                    "--num-val", "8", "--scales", "1x"], check=True, capture_output=True)  # its worker pool needs a process
    trained = run_in_process("03_train_t3.py", "--model", tiny_models["qwen2_vl"], "--train", data / "t3_train.jsonl",
                             "--out", out, "--max-steps", 25, "--batch-size", 8, "--grad-accum", 1, "--lr", 3e-3)
    assert trained.returncode == 0, trained.stderr[-2000:]
    return out


def build(tiny_models, adapter, videos, out, *extra):
    return subprocess.run([sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--adapter", str(adapter),
                           "--videos", str(videos), "--out", str(out), "--num-frames", "8", "--sparse-frames", "2",
                           "--max-new-tokens", "24", "--temperature", "1.0", "--batch-size", "4", *map(str, extra)],
                          capture_output=True, text=True)


def read(path):
    return [json.loads(line) for line in open(path)]


def test_planned_frames_include_or_exclude_the_segment():
    args = pairs_stage.parse_args(["--model", "m", "--videos", "v", "--out", "o", "--num-frames", "8", "--sparse-frames", "3"])
    video = {"id": "a.mp4", "path": "/x/a.mp4", "frames": 57}
    kinds = set()
    for slot in range(200):
        a = pairs_stage.plan_attempt(slot, video, "localized" if slot % 2 else "comprehensive", args)
        f = a["frames"]
        assert len(f["train"]) == 8 and all(0 <= i < 57 for i in f["train"] + f["chosen"] + f["rejected"])
        kinds.add((a["kind"], a["negative"]))
        if a["kind"] == "localized":
            start, end = a["segment"]
            inside = lambda i: start <= i < end
            assert f["chosen"] and all(inside(i) for i in f["chosen"])
            assert not any(inside(i) for i in f["rejected"])
            assert any(inside(i) for i in f["train"])  # the training view shows the segment
            if a["negative"] == "incomplete":
                assert len(f["rejected"]) == 3
        else:
            assert f["chosen"] == f["train"] and len(f["rejected"]) == 3
    assert kinds == {("localized", "irrelevant"), ("localized", "incomplete"), ("comprehensive", "incomplete")}
    assert pairs_stage.plan_attempt(7, video, "localized", args) == pairs_stage.plan_attempt(7, video, "localized", args)


@pytest.mark.parametrize("ratio,share", [("5:5", 0.5), ("7:3", 0.7), ("1:0", 1.0)])
def test_slot_kinds_follow_the_ratio(ratio, share):
    args = pairs_stage.parse_args(["--model", "m", "--videos", "v", "--out", "o", "--ratio", ratio])
    kinds = [pairs_stage.slot_kind(s, args.local_share) for s in range(100)]
    assert kinds.count("localized") == round(100 * share)
    assert all(abs(kinds[:n].count("localized") - n * share) <= 1 for n in range(1, 100))  # interleaved, not blocked


@pytest.mark.parametrize("num_videos", [2, 3, 4, 6])
@pytest.mark.parametrize("ratio,share", [("5:5", 0.5), ("7:3", 0.7)])
def test_every_video_gets_both_kinds_at_the_ratio(num_videos, ratio, share):
    """Slot parity must not tie a kind to a video (with an even number of videos it did): over 20 rounds
    each video gets localized attempts in the asked share, within one."""
    rounds = 20
    plans = [pairs_stage.slot_plan(s, num_videos, share, seed=0) for s in range(rounds * num_videos)]
    for video in range(num_videos):
        kinds = [kind for v, kind in plans if v == video]
        assert len(kinds) == rounds
        assert abs(kinds.count("localized") - share * rounds) <= 1, (video, kinds)
    assert abs(sum(kind == "localized" for _, kind in plans) - share * len(plans)) <= num_videos
    assert plans == [pairs_stage.slot_plan(s, num_videos, share, seed=0) for s in range(rounds * num_videos)]  # seeded


def test_no_two_attempts_share_their_inputs():
    """Attempts on one video are jittered views, re-drawn when one repeats: over 400 slots on 3 short
    videos no (video, kind, frames) comes twice."""
    args = pairs_stage.parse_args(["--model", "m", "--videos", "v", "--out", "o", "--num-frames", "8", "--sparse-frames", "2"])
    videos = [{"id": f"v{i}", "path": f"v{i}.mp4", "frames": 24 + 8 * i} for i in range(3)]
    taken, planned = set(), []
    for slot in range(400):
        index, kind = pairs_stage.slot_plan(slot, len(videos), args.local_share, args.seed)
        attempt = pairs_stage.fresh_attempt(slot, videos[index], kind, args, taken)
        if attempt:
            planned.append((attempt["video"]["id"], kind, json.dumps(attempt["frames"], sort_keys=True)))
    assert len(planned) > 380 and len(set(planned)) == len(planned)


def test_filters_drop_what_they_claim(monkeypatch):
    args = pairs_stage.parse_args(["--model", "m", "--videos", "v", "--out", "o", "--num-frames", "8", "--sparse-frames", "2"])
    video = {"id": "a.mp4", "path": "a.mp4", "frames": 40}
    attempts = [pairs_stage.plan_attempt(s, video, "comprehensive", args) for s in range(6)]
    attempts += [pairs_stage.plan_attempt(s, video, "localized", args) for s in range(6, 8)]
    for a in attempts[:6]:
        a["question"] = "What happens?"  # given with the video: no caption or question to write
    answers = [("", False), ("x", False),                                # empty
               ("a dog runs", False), ("a dog runs", False),              # identical
               ("a big red dog runs fast", False), ("a big red dog runs fast now", False),  # near identical
               ("a square moves", True), ("nothing", False),              # truncated
               ("good answer", False), ("bad answer", False),             # judge prefers rejected
               ("the square moves right", False), ("it is dark", False),  # kept
               ("left to right", False), ("no idea", False),              # localized: unanswerable
               ("a square slides", False), ("blank", False)]              # localized: kept
    calls = iter([[("A square moves.", False)] * 2, [("What happens?", False)] * 2, answers])
    monkeypatch.setattr(pairs_stage, "generate", lambda *a, **k: next(calls))
    monkeypatch.setattr(pairs_stage, "read_frames", lambda path, count, indices: (None, indices))
    def judge(model, processor, prompts, choices, args, device):
        if choices == ["A", "B"]:  # prefer the rejected answer of attempt 4 only
            return [((-1.0, 0.0) if a["judge_order"] else (0.0, -1.0)) if a is attempts[4] else
                    ((0.0, -1.0) if a["judge_order"] else (-1.0, 0.0)) for a in [x for x in attempts if x["dropped_by"] is None]]
        return [(-2.0, -1.0), (-1.0, -2.0)]  # attempt 6 unanswerable, attempt 7 answerable
    monkeypatch.setattr(pairs_stage, "judge_logprobs", judge)
    results = pairs_stage.run_attempts(None, None, attempts, args, None)
    assert [a["dropped_by"] for a in results] == ["empty", "identical", "near_identical", "truncated",
                                                  "judge_prefers_rejected", None, "unanswerable", None]


def test_a_multiple_choice_question_is_asked_with_its_options_and_audits_the_pairs(monkeypatch, tmp_path):
    """With options, the given question is asked as stage 06 asks it; an answer that picks no option
    drops the attempt, two that pick the same option are identical, and the given answer is only
    compared with the kept pairs' answers, never used to keep one."""
    args = pairs_stage.parse_args(["--model", "m", "--videos", "v", "--out", "o", "--num-frames", "8", "--sparse-frames", "2",
                                   "--no-judge"])
    video = {"id": "a.mp4", "path": "a.mp4", "frames": 40, "question": "Which object appears first?",
             "options": ["the red object", "the blue object"], "answer": 0, "caption": "A red object, then a blue one."}
    attempts = [pairs_stage.plan_attempt(s, video, "comprehensive", args) for s in range(5)]
    assert attempts[0]["question"] == ("Which object appears first?\nA. the red object\nB. the blue object\n"
                                       "Answer with the option's letter from the given choices directly.")
    answers = [("A", False), ("C", False),                  # C is no option
               ("blue", False), ("B", False),               # "blue" names no option
               ("A", False), ("A.", False),                 # the same option
               ("A", False), ("B", False),                  # kept, the chosen answer right
               ("The answer is B", False), ("A", False)]    # kept, the rejected answer right
    monkeypatch.setattr(pairs_stage, "generate", lambda *a, **k: answers)
    monkeypatch.setattr(pairs_stage, "read_frames", lambda path, count, indices: (None, indices))
    results = pairs_stage.run_attempts(None, None, attempts, args, None)
    assert [a["dropped_by"] for a in results] == ["not_an_option", "not_an_option", "identical", None, None]
    pair = pairs_stage.pair_record(results[4], tmp_path)
    assert pair["choices"] == {"chosen": "B", "rejected": "A"} and pair["answer"] == "A"
    assert pair["options"] == video["options"] and pair["prompt"] == attempts[0]["question"]
    assert pair["caption"] == video["caption"]  # the video list's, as the judge reads it: none is written
    kept, targets = {"localized": 0, "comprehensive": 0}, {"localized": 0, "comprehensive": 5}
    _, logged = pairs_stage.keep_results(results, kept, targets, tmp_path)
    stats = pairs_stage.write_stats(tmp_path, logged, [], targets, 1.0, 2)
    checked = stats["audit_against_given_answers"]
    assert checked["pairs"] == 2 and checked["chosen"]["right"] == 1 and checked["rejected"]["right"] == 1
    assert checked["videos"] == 1
    assert stats["dropped_by"]["not_an_option"] == 2
    del video["answer"]  # no answer given: nothing to audit
    plain = pairs_stage.keep_results([dict(results[3], video=video)], kept, {"localized": 0, "comprehensive": 9}, tmp_path)[1]
    assert "audit_against_given_answers" not in pairs_stage.write_stats(tmp_path, plain, [], targets, 1.0, 1)


def test_the_audit_counts_a_videos_pairs_as_one_cluster():
    """Pairs of one video share its chosen answer: ten copies of one video's pair are not ten
    independent checks. Single pairs per video give Wilson's interval; clustered ones a wider one."""
    single = [[True]] * 93 + [[False]] * 107
    assert pairs_stage.interval_over_videos(single) == pytest.approx(pairs_stage.wilson_interval(93, 200), abs=1e-3)
    clustered = [[True] * 10] * 9 + [[False] * 10] * 11  # 200 pairs, 20 videos, each video all right or all wrong
    low, high = pairs_stage.interval_over_videos(clustered)
    assert low == pytest.approx(pairs_stage.wilson_interval(9, 20)[0], abs=0.01) and high - low > 0.35
    assert pairs_stage.interval_over_videos([[True] * 12] * 2) == pairs_stage.wilson_interval(2, 2)  # all right: 2 videos
    kept = [{"id": f"p{i}", "video": f"v{i % 3}", "right": {"chosen": True, "rejected": i % 2 == 0}} for i in range(6)]
    checked = pairs_stage.audit(kept)
    assert (checked["pairs"], checked["videos"], checked["chosen"]["right"], checked["rejected"]["right"]) == (6, 3, 6, 3)


@pytest.mark.parametrize("record, message", [
    ({"options": ["x", "y"]}, "'options' need a 'question' (a string)"),
    ({"question": " ", "options": ["x", "y"]}, "'question' is empty"),
    ({"question": ""}, "'question' is empty"),
    ({"question": "Q?", "options": ["x", "X "]}, "two options are the same"),
    ({"id": "v0"}, "id 'v0' is already on line 1"),
    ({"question": "Q?", "options": ["B", "A"], "answer": "A"}, "'answer' 'A' is option A's letter and option B's text; "
                                                               "give the letter of the one meant"),
    ({"question": "Q?", "options": ["x"]}, "'options' must be a list of 2 to 10 non-empty strings"),
    ({"question": "Q?", "options": ["x", ""]}, "'options' must be a list of 2 to 10 non-empty strings"),
    ({"question": "Q?", "answer": "A"}, "'answer' needs 'options'"),
    ({"question": "Q?", "options": ["x", "y"], "answer": "C"}, "'answer' must be one of the letters A, B or an option's "
                                                                "text, not 'C'"),
])
def test_a_bad_multiple_choice_video_record_is_one_clear_line(video_dir, tmp_path, record, message):
    listing = tmp_path / "videos.jsonl"
    good = {"id": "v0", "video": str(video_dir / "clip0.mp4"), "question": "Q?", "options": ["x", "y"], "answer": "y"}
    listing.write_text(json.dumps(good) + "\n" + json.dumps({"id": "v1", "video": str(video_dir / "clip1.mp4"), **record}) + "\n")
    result = subprocess.run([sys.executable, SCRIPT, "--model", "m", "--videos", str(listing), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {listing}:2: {message}"]


def test_an_answer_names_its_option_by_letter_or_by_text(video_dir, tmp_path):
    listing = tmp_path / "videos.jsonl"
    for answer in ("b", " B ", "Blue", " blue "):  # a letter in any case; an option's text in any case, spaces aside
        listing.write_text(json.dumps({"id": "v0", "video": str(video_dir / "clip0.mp4"), "question": "Q?",
                                       "options": ["Red", "Blue"], "answer": answer}) + "\n")
        assert pairs_stage.list_videos(str(listing))[0]["answer"] == 1


def test_builds_pairs_with_ratio_stats_and_bad_video_skipped(tiny_models, t3_adapter, video_dir, tmp_path):
    result = build(tiny_models, t3_adapter, video_dir, tmp_path, "--num-pairs", "4", "--no-judge", "--max-attempts", "6")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("warning: skipping") == 1 and "broken.mp4" in result.stderr
    attempts = read(tmp_path / "attempts.jsonl")
    assert {a["video"] for a in attempts} == {"clip0.mp4", "clip1.mp4", "nested/clip2.mp4"}
    comprehensive = [a for a in attempts if a["kind"] == "comprehensive"]
    assert comprehensive and all(a["question_source"] in ("generated", "template") for a in comprehensive)
    pairs = read(tmp_path / "pairs.jsonl")
    stats = json.load(open(tmp_path / "stats.json"))
    assert stats["kept_by_kind"] == {"localized": 2, "comprehensive": 2} and len(pairs) == 4
    assert stats["skipped_videos"] == 1 and stats["attempts"] == len(read(tmp_path / "attempts.jsonl"))
    assert sum(stats["dropped_by"].values()) == stats["attempts"] - stats["kept"]
    assert stats["comprehensive_questions"]["template"]["attempts"] == sum(a["question_source"] == "template" for a in comprehensive)
    assert sum(stats["comprehensive_questions"][q]["attempts"] for q in ("generated", "template")) == len(comprehensive)
    for pair in pairs:
        assert os.path.isfile(tmp_path / pair["video"])  # relative to the pairs file
        assert pair["chosen"] != pair["rejected"] and pair["prompt"] == pair["question"]
        assert set(pair) >= {"id", "video", "prompt", "chosen", "rejected", "kind", "negative", "frames"}
        if pair["kind"] == "localized":
            start, end = pair["frames"]["segment"]
            assert all(start <= i < end for i in pair["frames"]["chosen"]) and pair["caption"]
            assert not any(start <= i < end for i in pair["frames"]["rejected"])
    # the pairs feed stage 05 as they are
    tpo = load_stage("05_train_tpo.py")
    assert len(tpo.load_pairs(str(tmp_path / "pairs.jsonl"))) == 4


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_pairs(tiny_models, t3_adapter, video_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert build(tiny_models, t3_adapter, video_dir, whole, "--num-pairs", "6").returncode == 0
    assert build(tiny_models, t3_adapter, video_dir, killed, "--num-pairs", "6").returncode == 0
    # a kill after the first group: later groups never written, the last pair not yet logged, a torn line
    attempts = (killed / "attempts.jsonl").read_text().splitlines(keepends=True)
    first_group = [line for line in attempts if json.loads(line)["slot"] < 4]
    (killed / "attempts.jsonl").write_text("".join(first_group) + '{"slot": 4, "id"')
    kept_ids = {json.loads(line)["id"] for line in first_group if json.loads(line)["kept"]}
    pairs = [line for line in (killed / "pairs.jsonl").read_text().splitlines(keepends=True)]
    orphan = next((line for line in pairs if json.loads(line)["id"] not in kept_ids), None)
    (killed / "pairs.jsonl").write_text("".join(line for line in pairs if json.loads(line)["id"] in kept_ids) + (orphan or ""))
    again = build(tiny_models, t3_adapter, video_dir, killed, "--num-pairs", "6", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = read(whole / "pairs.jsonl"), read(killed / "pairs.jsonl")
    assert len({p["id"] for p in b}) == len(b)  # no duplicates
    assert sorted(a, key=lambda p: p["id"]) == sorted(b, key=lambda p: p["id"])
    refused = build(tiny_models, t3_adapter, video_dir, killed, "--num-pairs", "6")
    assert refused.returncode == 2 and "pass --resume" in refused.stderr


def test_shards_are_disjoint_and_cover(video_dir, tmp_path):
    videos = pairs_stage.list_videos(str(video_dir))
    assert [v["id"] for v in videos] == ["broken.mp4", "clip0.mp4", "clip1.mp4", "nested/clip2.mp4"]
    shards = [videos[i::3] for i in range(3)]
    ids = [v["id"] for shard in shards for v in shard]
    assert sorted(ids) == sorted(v["id"] for v in videos) and len(set(ids)) == len(ids)
    listing = tmp_path / "videos.jsonl"
    listing.write_text("".join(json.dumps({"id": f"v{i}", "video": os.path.relpath(video_dir / f"clip{i}.mp4", tmp_path),
                                           "question": "What moves?"}) + "\n" for i in range(2)))
    from_jsonl = pairs_stage.list_videos(str(listing))
    assert [v["id"] for v in from_jsonl] == ["v0", "v1"] and from_jsonl[0]["question"] == "What moves?"
    assert os.path.isfile(from_jsonl[1]["path"])


def test_no_readable_video_or_missing_model_is_a_clear_error(tiny_models, video_dir, tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "bad.mp4").write_bytes(b"junk" * 100)
    result = subprocess.run([sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--videos", str(tmp_path / "v"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'v'}: no readable videos (1 skipped)"
    assert "Traceback" not in result.stderr
    missing = subprocess.run([sys.executable, SCRIPT, "--model", str(tmp_path / "nope"), "--videos", str(video_dir),
                              "--out", str(tmp_path / "out2")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: no such model folder"


def test_a_shortfall_is_said_with_what_to_try(tiny_models, t3_adapter, video_dir, tmp_path):
    result = build(tiny_models, t3_adapter, video_dir, tmp_path, "--num-pairs", "40", "--no-judge", "--max-attempts", "0.3")
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.load(open(tmp_path / "stats.json"))
    assert 0 < stats["kept"] < 40
    line = next(l for l in result.stderr.splitlines() if l.startswith("warning: kept"))
    assert line.startswith(f"warning: kept {stats['kept']} of the 40 pairs asked for ({stats['kept_by_kind']['localized']} "
                           f"localized of 20, {stats['kept_by_kind']['comprehensive']} comprehensive of 20); most dropped by ")
    assert "try more videos, a larger --max-attempts (now 0.3)" in line
