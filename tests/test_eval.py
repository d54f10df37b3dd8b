"""Stage 06: published layouts, letter extraction, log-likelihood scoring, several adapters, shards, resume, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_stage
from videos import frames_for, write_video

evaluation = load_stage("06_eval.py")
SCRIPT = os.path.join(REPO, "06_eval.py")


def write(path, records, jsonl=False):
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return str(path)


def touch_videos(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")


def read_one(path, fmt="auto", video_root=None):
    return evaluation.read_bench(str(path), fmt, video_root, None)[1]


def test_tempcompass_layout(tmp_path):
    touch_videos(tmp_path, "1025.mp4")
    path = write(tmp_path / "tempcompass.json", [
        {"video_id": "1025", "question": "Which way does the car move?\nA. left\nB. right\nC. up", "answer": "B. right",
         "dim": "direction"},
        {"video_id": "1025", "question": "Is the car moving to the right?", "answer": "yes", "dim": "direction"},
        {"video_id": "1025", "question": "Which caption matches the video better?\nCaption A: A car drives left.\n"
                                         "Caption B: A car drives right.", "answer": "Caption B: A car drives right.",
         "dim": "order"},
    ])
    mc, yes_no, caption = read_one(path, video_root=str(tmp_path))
    assert mc["question"] == "Which way does the car move?" and mc["options"] == ["left", "right", "up"]
    assert mc["answer"] == 1 and mc["groups"] == {"dim": "direction", "task": "multi-choice"}
    assert mc["video"] == str(tmp_path / "1025.mp4")
    assert yes_no["options"] == ["yes", "no"] and yes_no["answer"] == 0 and yes_no["groups"]["task"] == "yes_no"
    assert caption["options"] == ["A car drives left.", "A car drives right."] and caption["answer"] == 1
    assert caption["groups"] == {"dim": "order", "task": "caption_matching"}
    assert len({mc["id"], yes_no["id"], caption["id"]}) == 3


def test_videomme_mlvu_and_longvideobench_layouts(tmp_path):
    touch_videos(tmp_path, "fFjv93ACGo8.mp4", "order_3.mp4", "lvb_7.mp4")
    videomme = write(tmp_path / "videomme.jsonl", [
        {"video_id": "001", "duration": "short", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Temporal Reasoning", "question": "What happens first?",
         "options": ["A. A cat jumps.", "B. A dog barks.", "C. It rains.", "D. Nothing."], "answer": "C"}], jsonl=True)
    item, = read_one(videomme, video_root=str(tmp_path))
    assert item["options"] == ["A cat jumps.", "A dog barks.", "It rains.", "Nothing."] and item["answer"] == 2
    assert item["id"] == "001-1" and item["groups"] == {"task_type": "Temporal Reasoning", "duration": "short"}
    assert item["video"] == str(tmp_path / "fFjv93ACGo8.mp4")

    mlvu = write(tmp_path / "mlvu.json", {"order": [
        {"video": "order_3.mp4", "duration": 412.3, "question": "In what order do the events happen?",
         "candidates": ["1-2-3", "3-2-1", "2-1-3"], "answer": "3-2-1", "question_type": "order"}]})
    item, = read_one(mlvu)  # videos default to the file's folder
    assert item["options"] == ["1-2-3", "3-2-1", "2-1-3"] and item["answer"] == 1
    assert item["groups"] == {"task_type": "order"} and item["video"] == str(tmp_path / "order_3.mp4")

    lvb = write(tmp_path / "lvb_val.json", [
        {"video_path": "lvb_7.mp4", "question": "What does the man do after sitting down?", "option0": "reads",
         "option1": "sleeps", "option2": "eats", "option3": "N/A", "option4": "N/A", "correct_choice": 2,
         "duration_group": 600, "question_category": "TOS", "id": "lvb-7-q"}])
    item, = read_one(lvb)
    assert item["options"] == ["reads", "sleeps", "eats"] and item["answer"] == 2 and item["id"] == "lvb-7-q"
    assert item["groups"] == {"task_type": "TOS", "duration": "600"}


def test_project_and_t3_layouts(tmp_path):
    (tmp_path / "videos").mkdir()
    touch_videos(tmp_path / "videos", "a.mp4")
    bench = write(tmp_path / "probe_bench.jsonl", [
        {"id": "p1", "video": "videos/a.mp4", "question": "Which object appears first?", "options": ["red", "blue"],
         "answer": "B", "task_type": "order_of_two", "source": "probe"}], jsonl=True)
    item, = read_one(bench)
    assert item["video"] == str(tmp_path / "videos" / "a.mp4") and item["answer"] == 1
    t3 = write(tmp_path / "t3_val.jsonl", [
        {"id": "v1", "task": "order", "conversations": [
            {"from": "human", "value": "Events: a, then b.\nWhich came first?\nA. b\nB. a"}, {"from": "gpt", "value": "B"}],
         "options": ["A. b", "B. a"], "answer": "B"}], jsonl=True)
    item, = read_one(t3)
    assert item["video"] is None and item["question"] == "Events: a, then b.\nWhich came first?"
    assert item["options"] == ["b", "a"] and item["answer"] == 1 and item["groups"] == {"task_type": "order"}


@pytest.mark.parametrize("reply, options, expected", [
    ("B", 4, 1), ("(C)", 4, 2), ("D. The man leaves.", 4, 3), ("A", 2, 0), ("b", 4, None),
    ("The answer is C.", 4, 2), ("Answer: (B)", 4, 1), ("I think the correct option is D", 4, 3),
    ("A man walks in, so (B) fits best.", 4, 1), ("A dog runs. Best choice: C) it rains", 4, 2),
    ("Based on the video, B. it rains", 4, 1), ("A person is walking down the street.", 4, None),
    ("It rains heavily in the video.", 4, 2), ("E", 4, None), ("", 4, None),
    ("Yes, the car moves right.", "yn", 0), ("no.", "yn", 1), ("Maybe", "yn", None),
])
def test_letter_extraction(reply, options, expected):
    texts = ["yes", "no"] if options == "yn" else ["a cat jumps", "a dog barks", "it rains", "nothing"][:options]
    assert evaluation.extract_choice(reply, texts) == expected


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    """A video benchmark (project layout, three videos) and a T3 text benchmark."""
    folder = tmp_path_factory.mktemp("bench")
    (folder / "videos").mkdir()
    records = []
    for i in range(3):
        write_video(folder / "videos" / f"v{i}.mp4", frames_for(24, seed=i))
        records.append({"id": f"q{i}", "video": f"videos/v{i}.mp4", "question": "Where does the square move" + "?" * i,
                        "options": ["left", "right", "up"][:2 + i % 2], "answer": "AB"[i % 2], "task_type": "direction"})
    records.append({"id": "q3", "video": "videos/v0.mp4", "question": "Does the square move?", "options": ["yes", "no"],
                    "answer": "A", "task_type": "motion"})
    video = write(folder / "video_bench.jsonl", records, jsonl=True)
    t3 = write(folder / "t3_val.jsonl", [
        {"id": f"t{i}", "task": ["order", "attribute"][i % 2], "conversations": [
            {"from": "human", "value": f"First x{i}, then y.\nWhat came first?\nA. y\nB. x{i}\nC. z"},
            {"from": "gpt", "value": "B"}], "options": ["A. y", f"B. x{i}", "C. z"], "answer": "B"} for i in range(5)],
        jsonl=True)
    return {"video": video, "t3": t3}


def test_loglik_picks_the_option_the_logits_favour(tiny_models, benches):
    """With the logits of "C" and of "yes" raised by construction, every multiple-choice item is
    scored C and every yes/no item yes, whatever the prompt lengths and left padding."""
    model, processor = evaluation.load_model(tiny_models["qwen2_vl"], four_bit=False, device=torch.device("cpu"))
    model.eval()
    favoured = [processor.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("C", "yes")]
    hook = model.lm_head.register_forward_hook(lambda module, inputs, logits: logits.index_add(
        -1, torch.tensor(favoured), torch.full(logits.shape[:-1] + (2,), 50.0)))
    args = evaluation.parse_args(["--model", "m", "--bench", "b", "--out", "o", "--num-frames", "4"])
    _, video_items = evaluation.read_bench(benches["video"], "auto", None, None)
    _, text_items = evaluation.read_bench(benches["t3"], "auto", None, None)
    for items in (video_items, text_items):
        batch = [("bench", item) for item in items]
        _, frames, _ = evaluation.decode(batch, 4, False, processor)
        scored = evaluation.score_batch(model, processor, batch, frames, args, torch.device("cpu"))
        for (_, item), (predicted, raw) in zip(batch, scored):
            expected = 0 if evaluation.is_yes_no(item["options"]) else (2 if len(item["options"]) > 2 else None)
            if expected is not None:
                assert predicted == expected, (item, raw)
    hook.remove()


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """Two LoRA adapters with random (non-zero) weights, so each changes the model's answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    folders = {}
    for name, seed in (("one", 1), ("two", 2)):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_pretrained(tiny_models["qwen2_vl"])
        config = LoraConfig(r=4, lora_alpha=64, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        get_peft_model(model, config).save_pretrained(str(folder))
        folders[name] = str(folder)
    return folders


def run_eval(tiny_models, benches, out, *extra):
    return subprocess.run([sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--bench", benches["video"],
                           "--bench", benches["t3"], "--num-frames", "4", "--out", str(out), "--batch-size", "3",
                           *map(str, extra)], capture_output=True, text=True)


def predictions(folder):
    return {(p["model"], p["bench"], p["id"]): p for p in map(json.loads, open(os.path.join(folder, "predictions.jsonl")))}


@pytest.mark.slow
def test_several_adapters_equal_separate_runs(tiny_models, benches, adapters, tmp_path):
    both = run_eval(tiny_models, benches, tmp_path / "both", "--adapter", f"one={adapters['one']}",
                    "--adapter", f"two={adapters['two']}")
    assert both.returncode == 0, both.stderr[-2000:]
    together = predictions(tmp_path / "both")
    assert len(together) == 3 * 9
    for name in ("one", "two"):
        alone = run_eval(tiny_models, benches, tmp_path / name, "--adapter", f"{name}={adapters[name]}")
        assert alone.returncode == 0, alone.stderr[-2000:]
        for key, p in predictions(tmp_path / name).items():
            assert together[key]["scores"] == pytest.approx(p["scores"], abs=1e-4), key
    scores = {m: [p["scores"] for k, p in sorted(together.items()) if k[0] == m] for m in ("base", "one", "two")}
    assert scores["base"] != scores["one"] != scores["two"]  # the adapters really were applied
    results = json.load(open(tmp_path / "both" / "results.json"))["results"]
    assert list(results) == ["base", "one", "two"]
    assert results["base"]["video_bench"]["total"] == 4 and results["base"]["t3_val"]["by"]["task_type"]["order"]["total"] == 3
    table = open(tmp_path / "both" / "results.md").read()
    assert "| one |" in table and "video_bench (n=4)" in table and "t3_val (n=5)" in table


def test_generate_mode_records_replies(tiny_models, benches, tmp_path):
    result = run_eval(tiny_models, benches, tmp_path, "--mode", "generate", "--max-new-tokens", "6", "--limit", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(predictions(tmp_path).values())
    assert len(rows) == 4 and all(isinstance(p["reply"], str) and "prediction" in p for p in rows)


@pytest.mark.slow
def test_shards_merge_and_resume_give_the_whole_run(tiny_models, benches, tmp_path):
    assert run_eval(tiny_models, benches, tmp_path / "whole").returncode == 0
    whole = predictions(tmp_path / "whole")
    for i in range(2):
        assert run_eval(tiny_models, benches, tmp_path / f"shard{i}", "--shard", f"{i}/2").returncode == 0
    merged = subprocess.run([sys.executable, SCRIPT, "--merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"),
                             "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert predictions(tmp_path / "merged") == whole
    same = lambda folder: json.load(open(tmp_path / folder / "results.json"))["results"]
    assert same("merged") == same("whole")

    lines = open(tmp_path / "whole" / "predictions.jsonl").read().splitlines()
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "predictions.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # torn last line
    resumed = run_eval(tiny_models, benches, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert predictions(tmp_path / "killed") == whole
    assert len(open(tmp_path / "killed" / "predictions.jsonl").read().splitlines()) == len(lines)


@pytest.mark.parametrize("case", ["answer_not_an_option", "no_answer", "missing_video", "bad_json"])
def test_bad_input_is_one_line(tiny_models, tmp_path, case):
    record = {"id": "x", "video": "nowhere.mp4", "question": "Q?", "options": ["a", "b"], "answer": "A"}
    if case == "answer_not_an_option":
        record["answer"] = "C"
    if case == "no_answer":
        del record["answer"]
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"id": "ok", "video": "", "question": "Q?", "options": ["a", "b"], "answer": "B"}) + "\n"
                    + ("{broken\n" if case == "bad_json" else json.dumps(record) + "\n"))
    result = subprocess.run([sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--bench", str(path),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    expected = {"answer_not_an_option": f"{path}:2: answer 'C' is not one of its 2 options",
                "no_answer": f"{path}:2: missing 'answer'",
                "missing_video": f"{path}:2: video {tmp_path / 'nowhere.mp4'} not found (or pass --skip-missing)",
                "bad_json": f"{path}:2: not valid JSON"}[case]
    assert message.startswith("error: " + expected), message


def test_skip_missing_counts_instead(tiny_models, tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "video": "nowhere.mp4" if i else "", "question": "Q?",
                                        "options": ["a", "b"], "answer": "A"}) + "\n" for i in range(3)))
    result = subprocess.run([sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--bench", str(path),
                             "--out", str(tmp_path / "out"), "--skip-missing"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.load(open(tmp_path / "out" / "results.json"))
    assert results["results"]["base"]["bench"]["total"] == 1 and results["results"]["base"]["bench"]["skipped"] == 2
    assert "skipped 2 items" in result.stdout
