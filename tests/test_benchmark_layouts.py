"""Stage 06 reads the published benchmark files as they ship and builds lmms-eval's prompt for each.

The records are written by hand from the published files' field names and real questions
(TempCompass's questions/*.json and HF parquet, Video-MME's parquet, MLVU's data/*.json,
LongVideoBench's lvb_val.json and parquet); the expected prompts are lmms-eval's default ones."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_stage

evaluation = load_stage("06_eval.py")
SCRIPT = os.path.join(REPO, "06_eval.py")
pyarrow = pytest.importorskip("pyarrow")
import pyarrow.parquet  # noqa: E402


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), str(path))
    return str(path)


def touch(folder, *names):
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def read(path, fmt="auto", video_root=None, prompt="official"):
    return evaluation.read_bench(str(path), fmt, video_root, None, prompt)


TEMPCOMPASS = {  # questions/<task>.json: {video_id: {dim: [{question, answer}]}}
    "multi-choice": {"1034419625": {"action": [
        {"question": "What is the man doing in the video?\nA. dunking a basketball\nB. dribbling a basketball\n"
                     "C. passing a basketball", "answer": "A. dunking a basketball"}]}},
    "yes_no": {"1034419625": {"action": [{"question": "Is the man dunking?", "answer": "yes"}],
                              "direction": [{"question": "Is the ball moving to the left?", "answer": "no"}]}},
    "caption_matching": {"1034419625": {"action": [
        {"question": "Which description is a more suitable match for the video?\nOption 1: The man is dribbling a "
                     "basketball.\nOption 2: A man is dunking a basketball.",
         "answer": "Option 2: A man is dunking a basketball."},
        {"question": "Which sentence better captures the essence of the video?\nSentence A: A man is dunking a "
                     "basketball.\nSentence B: A video showing a person passing a basketball.",
         "answer": "Sentence A: A man is dunking a basketball."},
        {"question": "Which caption matches the video better?\nCaption A: A man is dunking a basketball.\n"
                     "Caption B: The man is shooting a basketball.", "answer": "Caption A: A man is dunking a basketball."}]}},
}


def test_tempcompass_repository_files(tmp_path):
    touch(tmp_path, "videos/1034419625.mp4")
    (mc,), (yes, no), (numbered, sentence, caption) = [
        read(write_json(tmp_path / "questions" / f"{task}.json", TEMPCOMPASS[task]), video_root=str(tmp_path))[2]
        for task in ("multi-choice", "yes_no", "caption_matching")]
    assert mc["prompt"] == ("What is the man doing in the video?\nA. dunking a basketball\nB. dribbling a basketball\n"
                            "C. passing a basketball\nPlease directly give the best option:")
    assert mc["options"] == ["dunking a basketball", "dribbling a basketball", "passing a basketball"] and mc["answer"] == 0
    assert mc["groups"] == {"dim": "action", "task": "multi-choice"} and mc["video"] == str(tmp_path / "videos" / "1034419625.mp4")
    assert yes["prompt"] == "Is the man dunking?\nPlease answer yes or no:" and (yes["answer"], no["answer"]) == (0, 1)
    assert no["groups"] == {"dim": "direction", "task": "yes_no"} and yes["id"] != no["id"]
    assert numbered["labels"] == ["1", "2"] and numbered["answer"] == 1
    assert numbered["options"] == ["The man is dribbling a basketball.", "A man is dunking a basketball."]
    assert numbered["prompt"].endswith("Option 2: A man is dunking a basketball.\nPlease directly give the best option:")
    assert sentence["labels"] == caption["labels"] == ["A", "B"] and sentence["answer"] == caption["answer"] == 0
    assert {i["groups"]["task"] for i in (numbered, sentence, caption)} == {"caption_matching"}
    # the project's own prompt letters every option, numbered ones too
    _, _, items, _ = read(tmp_path / "questions" / "caption_matching.json", video_root=str(tmp_path), prompt="project")
    assert items[0]["labels"] == ["A", "B"] and items[0]["prompt"].splitlines()[1] == "A. The man is dribbling a basketball."


def test_tempcompass_hf_parquet_and_captioning(tmp_path):
    rows = [{"video_id": video, "question": r["question"], "answer": r["answer"], "dim": dim}
            for video, dims in TEMPCOMPASS["multi-choice"].items() for dim, records in dims.items() for r in records]
    name, layout, items, _ = read(write_parquet(tmp_path / "multi-choice" / "test-00000-of-00001.parquet", rows))
    assert layout == "tempcompass" and items[0]["answer"] == 0 and items[0]["prompt"].endswith("give the best option:")
    captioning = write_json(tmp_path / "captioning.json", {"1034419625": {"action": [
        {"question": "You will be presented with a video and several pieces of information. One piece of information "
                     "is consistent with the video while the others are not.\nInformation A: {'subject': 'man'}\n"
                     "Generated Caption:", "answer": "B. dunking a basketball"}]}})
    with pytest.raises(evaluation.InputError, match="captioning record: lmms-eval scores those with a GPT judge"):
        read(captioning)


VIDEOMME_ROW = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
                "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
                "task_type": "Counting Problem", "question": "How many red socks are above the fireplace at the end of this video?",
                "options": ["A. 1.", "B. 4.", "C. 2.", "D. 3."], "answer": "C"}


def test_videomme_parquet_and_json(tmp_path):
    touch(tmp_path, "data/fFjv93ACGo8.mp4")
    for path in (write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", [VIDEOMME_ROW]),
                 write_json(tmp_path / "videomme.json", [VIDEOMME_ROW])):
        name, layout, (item,), _ = read(path, video_root=str(tmp_path))
        assert layout == "videomme" and item["id"] == "001-1" and item["answer"] == 2
        assert item["options"] == ["1.", "4.", "2.", "3."] and item["video"] == str(tmp_path / "data" / "fFjv93ACGo8.mp4")
        assert item["groups"] == {"duration": "short", "domain": "Knowledge", "task_type": "Counting Problem"}
        assert item["prompt"] == (
            "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
            "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many red socks are above the "
            "fireplace at the end of this video?\nA. 1.\nB. 4.\nC. 2.\nD. 3.\n\n"
            "Answer with the option's letter from the given choices directly.")


def test_a_parquet_file_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "videomme.parquet", [VIDEOMME_ROW])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(evaluation.InputError, match=r"a Parquet file; reading it needs pyarrow \(pip install pyarrow\)"):
        read(path)


MLVU_PLOTQA = {"video": "movie101_66.mp4", "duration": 246, "question": "What color is the main male character in the video?",
               "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": "Yellow", "question_type": "plotQA"}
MLVU_NEEDLE_BROKEN = {"video": "needle_4.mp4", "duration": 300.5, "question": "What does the man catch?",
                      "candidates": ["A ball", "A hat", "A bird", "A kite"], "answer": "Catching a flying drone quadcopter",
                      "question_type": "findNeedle"}


def test_mlvu_task_files_combined_files_and_the_hf_layout(tmp_path, capsys):
    touch(tmp_path, "video/1_plotQA/movie101_66.mp4", "video/2_needle/needle_4.mp4")
    name, layout, (item,), unscorable = read(write_json(tmp_path / "data" / "1_plotQA.json", [MLVU_PLOTQA]),
                                             video_root=str(tmp_path))
    assert layout == "mlvu" and item["answer"] == 0 and item["groups"] == {"task_type": "plotQA"} and unscorable == 0
    assert item["video"] == str(tmp_path / "video" / "1_plotQA" / "movie101_66.mp4")
    assert item["prompt"] == ("Question: What color is the main male character in the video?\nOptions:\n(A) Yellow\n"
                              "(B) Red\n(C) Green\n(D) Blue\nOnly give the best option.\nBest option: (")
    # all tasks in one file (a list, or an object of task lists); a needle record whose answer is not a candidate is skipped
    combined = write_json(tmp_path / "mlvu_dev.json", {"plotQA": [MLVU_PLOTQA], "findNeedle": [MLVU_NEEDLE_BROKEN]})
    name, layout, items, unscorable = read(combined, video_root=str(tmp_path))
    assert [i["groups"]["task_type"] for i in items] == ["plotQA"] and unscorable == 1
    assert "answer 'Catching a flying drone quadcopter' is not one of its 4 options" in capsys.readouterr().err
    # the HF copy: video_name, the options as "(A) text" lines of the question, a letter for the answer
    hf = {"video_name": "movie101_66.mp4", "duration": 246, "question": "What color is the main male character in the "
          "video?\n(A) Yellow\n(B) Red\n(C) Green\n(D) Blue", "answer": "(B) Red", "task_type": "plotQA", "question_id": "q9"}
    _, layout, (item,), _ = read(write_json(tmp_path / "hf.json", [hf]), video_root=str(tmp_path))
    assert layout == "mlvu" and item["options"] == ["Yellow", "Red", "Green", "Blue"] and item["answer"] == 1
    assert item["prompt"] == hf["question"] + "\nOnly give the best option.\nBest option: ("


def test_mlvu_repeated_candidates_all_count_as_the_answer(tmp_path):
    record = {**MLVU_PLOTQA, "candidates": ["Yellow", "Red", "Yellow", "Blue"]}
    _, _, (item,), _ = read(write_json(tmp_path / "4_count.json", [record]))
    assert item["answers"] == [0, 2]
    assert evaluation.prediction_record("base", "mlvu", item, 2, {})["correct"]


LVB = {"video_id": "86CxyhFV9MI", "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4",
       "subtitle_path": "86CxyhFV9MI_en.json", "question": "What happens after the woman in the red coat sits down?",
       "duration": 512.3, "duration_group": 600, "question_category": "TOS", "topic_category": "NP-News-Programs",
       "starting_timestamp_for_subtitles": 0.0}


def test_longvideobench_json_and_parquet(tmp_path):
    touch(tmp_path, "videos/86CxyhFV9MI.mp4")
    candidates = ["She opens a book", "She drinks tea", "She waves", "She stands up"]
    as_json = write_json(tmp_path / "lvb_val.json", [{**LVB, "candidates": candidates, "correct_choice": 2}])
    as_parquet = write_parquet(tmp_path / "validation-00000-of-00001.parquet", [
        {**LVB, **{f"option{i}": (candidates + ["N/A"])[i] for i in range(5)}, "correct_choice": 2}])
    for path in (as_json, as_parquet):
        _, layout, (item,), _ = read(path, video_root=str(tmp_path))
        assert layout == "longvideobench" and item["options"] == candidates and item["answer"] == 2
        assert item["id"] == "86CxyhFV9MI_0" and item["groups"] == {"task_type": "TOS", "duration": "600"}
        assert item["video"] == str(tmp_path / "videos" / "86CxyhFV9MI.mp4")
        assert item["prompt"] == ("What happens after the woman in the red coat sits down?\nA. She opens a book\n"
                                  "B. She drinks tea\nC. She waves\nD. She stands up\n"
                                  "Answer with the option's letter from the given choices directly.\n")


def test_project_layouts_keep_the_project_prompt(tmp_path):
    (tmp_path / "videos").mkdir()
    touch(tmp_path, "videos/a.mp4")
    bench = tmp_path / "probe_bench.jsonl"
    bench.write_text(json.dumps({"id": "p1", "video": "videos/a.mp4", "question": "Which object appears first?",
                                 "options": ["red", "blue"], "answer": "B", "task_type": "order_of_two"}) + "\n")
    _, layout, (item,), _ = read(bench)
    assert layout == "jsonl" and item["video"] == str(tmp_path / "videos" / "a.mp4") and item["answer"] == 1
    assert item["prompt"] == evaluation.choice_prompt("Which object appears first?", ["red", "blue"])
    t3 = tmp_path / "t3_val.jsonl"
    t3.write_text(json.dumps({"id": "v1", "task": "order", "conversations": [
        {"from": "human", "value": "Events: a, then b.\nWhich came first?\nA. b\nB. a"}, {"from": "gpt", "value": "B"}],
        "options": ["A. b", "B. a"], "answer": "B"}) + "\n")
    _, layout, (item,), _ = read(t3)
    assert layout == "t3" and item["video"] is None and item["question"] == "Events: a, then b.\nWhich came first?"
    assert item["options"] == ["b", "a"] and item["answer"] == 1 and item["groups"] == {"task_type": "order"}


@pytest.mark.parametrize("reply, expected", [("Option 2", 1), ("2", 1), ("(1) The man is dribbling", 0),
                                             ("Option 1 or Option 2", None), ("Option 3", None)])
def test_numbered_options_are_read_from_replies(reply, expected):
    labels, options = ["1", "2"], ["The man is dribbling a basketball.", "A man is dunking a basketball."]
    assert evaluation.extract_choice(evaluation.with_letters(reply, labels), options) == expected


def test_published_layouts_score_end_to_end(tiny_models, tmp_path):
    """Files in three published layouts, with real (tiny) videos in their archives' folders, scored by
    the tiny model: every record is scored and results.md shows intervals and the prompt the model saw."""
    from videos import frames_for, write_video
    (tmp_path / "data").mkdir()
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "data" / "fFjv93ACGo8.mp4", frames_for(16, seed=1))
    write_video(tmp_path / "videos" / "1034419625.mp4", frames_for(16, seed=2))
    videomme = write_parquet(tmp_path / "videomme.parquet", [{**VIDEOMME_ROW, "question_id": f"001-{i}"} for i in range(3)])
    tempcompass = write_json(tmp_path / "caption_matching.json", TEMPCOMPASS["caption_matching"])
    yes_no = write_json(tmp_path / "yes_no.json", TEMPCOMPASS["yes_no"])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--bench", videomme,
                             "--bench", tempcompass, "--bench", yes_no, "--video-root", str(tmp_path),
                             "--num-frames", "4", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert sorted((p["bench"], len(p["scores"])) for p in rows) == sorted(
        [("videomme", 4)] * 3 + [("caption_matching", 2)] * 3 + [("yes_no", 2)] * 2)
    report = open(out / "results.md").read()
    assert "videomme (n=3)" in report and "caption_matching (n=3)" in report and "[" in report.split("videomme (n=3)")[1]
    assert "The prompt of videomme's first item (after the video):\n\n```\nSelect the best answer" in report
    assert "Please answer yes or no:\n```" in report
    meta = json.load(open(out / "results.json"))["meta"]
    assert meta["formats"] == {"videomme": "videomme", "caption_matching": "tempcompass", "yes_no": "tempcompass"}


def test_videos_of_the_same_name_in_two_task_folders(tmp_path):
    touch(tmp_path, "video/1_plotQA/movie101_66.mp4", "video/3_ego/movie101_66.mp4")
    _, _, (item,), _ = read(write_json(tmp_path / "data" / "1_plotQA.json", [MLVU_PLOTQA]), video_root=str(tmp_path))
    assert item["video"] == str(tmp_path / "video" / "1_plotQA" / "movie101_66.mp4")  # the folder named like the file
    ego = {**MLVU_PLOTQA, "question_type": "ego"}
    _, _, (item,), _ = read(write_json(tmp_path / "all.json", [ego]), video_root=str(tmp_path))
    assert item["video"] == str(tmp_path / "video" / "3_ego" / "movie101_66.mp4")  # the folder named like the task
    with pytest.raises(evaluation.InputError, match="2 videos named movie101_66.mp4 under .*give --video-root"):
        read(write_json(tmp_path / "other.json", [{**MLVU_PLOTQA, "question_type": "count"}]), video_root=str(tmp_path))


@pytest.mark.parametrize("reply", ["Option 2.", "2.", "The best option is 2."])
def test_numbered_labels_followed_by_a_full_stop(reply):
    assert evaluation.extract_choice(evaluation.with_letters(reply, ["1", "2"]), ["sits", "stands"]) == 1


def test_resume_and_merge_refuse_to_mix_runs(tmp_path):
    args = evaluation.parse_args(["--model", "m", "--bench", "b.json", "--out", str(tmp_path)])
    (tmp_path / "settings.json").write_text(json.dumps(evaluation.run_settings(args)))
    evaluation.check_resume(str(tmp_path), evaluation.run_settings(args))  # same settings: fine
    other = evaluation.parse_args(["--model", "m", "--bench", "b.json", "--out", str(tmp_path), "--num-frames", "8"])
    with pytest.raises(evaluation.InputError, match="scored with other settings \\(num_frames was 16, now 8\\)"):
        evaluation.check_resume(str(tmp_path), evaluation.run_settings(other))
    shards = []
    for i in range(2):
        folder = tmp_path / f"shard{i}"
        folder.mkdir()
        (folder / "settings.json").write_text(json.dumps({**evaluation.run_settings(args), "shard": f"{i}/2"}))
        (folder / "results.json").write_text(json.dumps({"meta": {"shard": f"{i}/2", "skipped": {}}, "results": {}}))
        (folder / "predictions.jsonl").write_text(json.dumps(
            {"model": "base", "bench": "b", "id": f"q{i}", "groups": {}, "answer": "A", "prediction": "A", "correct": True}) + "\n")
        shards.append(str(folder))
    merge = lambda *folders: subprocess.run([sys.executable, SCRIPT, "--merge", *folders, "--out", str(tmp_path / "m")],
                                            capture_output=True, text=True)
    assert merge(*shards).returncode == 0
    assert merge(shards[0]).stderr.strip().endswith("--merge needs the shards 0/2 ... 1/2 once each; got 0/2")
    assert "got 0/2, 0/2" in merge(shards[0], shards[0]).stderr
