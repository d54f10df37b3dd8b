"""Stage 06: letter extraction, log-likelihood scoring, intervals and paired tests, several adapters, shards, resume,
bad input. The published layouts and their prompts: tests/test_benchmark_layouts.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import MODELS, REPO, load_stage, run_in_process
from videos import frames_for, write_video

evaluation = load_stage("06_eval.py")
SCRIPT = os.path.join(REPO, "06_eval.py")
SCORE_NOISE = 1e-4  # how far one item's scores may move when it is batched (padded) with other items


def write(path, records, jsonl=False):
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return str(path)


REPLIES = [json.loads(line) for line in open(os.path.join(REPO, "tests", "replies.jsonl"), encoding="utf-8")]


@pytest.mark.parametrize("case", REPLIES, ids=[f"{i}:{c['reply'][:30]}" for i, c in enumerate(REPLIES)])
def test_extraction_reads_replies_as_a_reviewer_would(case):
    """tests/replies.jsonl: replies as 7B video LLMs write them, with the option a careful reviewer
    credits (null: none, e.g. two options named and none chosen, or the article "A")."""
    options, expected = case["options"], case["expected"]
    index = None if expected is None else (["yes", "no"] if options == ["yes", "no"] else "ABCDEFGHIJ").index(expected)
    assert evaluation.extract_choice(case["reply"], options) == index, case["why"]


def test_the_reply_table_is_large_and_varied():
    yes_no = [c for c in REPLIES if c["options"] == ["yes", "no"]]
    assert len(REPLIES) >= 60 and len(yes_no) >= 20
    assert sum(c["expected"] is None for c in REPLIES) >= 20 and {len(c["options"]) for c in REPLIES} >= {2, 3, 4, 5}


def test_wilson_interval_matches_published_values():
    assert evaluation.wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert evaluation.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert evaluation.wilson_interval(81, 263) == pytest.approx([0.2553, 0.3662], abs=1e-3)


def test_paired_difference_counts_only_the_items_that_changed():
    pairs = [(True, False)] * 10 + [(False, True)] * 2 + [(True, True)] * 30 + [(False, False)] * 58
    d = evaluation.paired_difference(pairs)
    assert (d["items"], d["gained"], d["lost"], d["difference"]) == (100, 10, 2, 0.08)
    assert d["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096, abs=1e-4)  # exact McNemar, 12 discordant
    assert d["interval"][0] > 0 and d["significant"]
    same = evaluation.paired_difference([(True, True)] * 5 + [(True, False), (False, True)])
    assert same["difference"] == 0 and same["p_value"] == 1.0 and not same["significant"]


def test_a_difference_is_significant_only_when_its_interval_and_its_p_value_agree():
    few = evaluation.paired_difference([(True, False)] * 5 + [(True, True)] * 10)  # 5 gained, none lost
    assert few["interval"][0] > 0 and few["p_value"] == 0.0625 and not few["significant"]
    assert format_row(few).endswith("p=0.062 n.s.")
    every = evaluation.paired_difference([(True, False)] * 10)  # the interval stays within [-1, 1]
    assert every["interval"][1] == 1.0 and every["significant"]
    many = evaluation.paired_difference([(True, False)] * 40 + [(False, False)] * 60)
    assert format_row(many) == "+40.0 [+29.5, +48.9], p<0.0001"


def format_row(difference):
    return evaluation.format_cell({"accuracy": 0.5, "interval": [0.4, 0.6], "vs_base": difference}).split("<br>")[1]


def prediction(model, item, correct, parsed=True, **groups):
    return {"model": model, "bench": "b", "id": item, "groups": groups or {"task_type": "t"},
            "answer": "A", "prediction": "A" if parsed else None, "correct": correct}


def test_results_show_intervals_and_mark_differences_that_are_not_significant(tmp_path):
    base = [prediction("base", f"i{i}", i < 20) for i in range(60)]
    big = [prediction("big", f"i{i}", i < 45) for i in range(60)]  # 25 more right, none lost
    small = [prediction("small", f"i{i}", i < 22, parsed=i < 50) for i in range(60)]  # 2 more right; 10 unparsed
    table = evaluation.write_results(str(tmp_path), base + big + small, {}, {"mode": "generate"})
    results = json.load(open(tmp_path / "results.json"))["results"]
    assert results["base"]["b"]["interval"] == evaluation.wilson_interval(20, 60)
    assert results["big"]["b"]["vs_base"]["significant"] and not results["small"]["b"]["vs_base"]["significant"]
    assert results["small"]["b"]["unparsed"] == 10 and "small on b: 10 of 60 replies name no single option" in table
    rows = {line.split("|")[1].strip(): line for line in open(tmp_path / "results.md") if line.startswith("| ")}
    assert "33.3 [22.7, 45.9]" in rows["base"] and "+41.7 [" in rows["big"] and "n.s." not in rows["big"]
    assert "+3.3 [" in rows["small"] and "n.s." in rows["small"]


def test_mlvu_headline_is_also_the_mean_over_tasks(tmp_path):
    items = [prediction("base", f"i{i}", i % 10 < (9 if i < 10 else 1), task_type="count" if i < 10 else "order")
             for i in range(40)]
    evaluation.write_results(str(tmp_path), items, {}, {"formats": {"b": "mlvu"}})
    cell = json.load(open(tmp_path / "results.json"))["results"]["base"]["b"]
    assert cell["accuracy"] == pytest.approx((9 + 3) / 40) and cell["task_mean"]["accuracy"] == pytest.approx((0.9 + 0.1) / 2)
    assert "Mean over task types" in open(tmp_path / "results.md").read()


def test_an_all_unparsed_run_says_so(tmp_path, capsys):
    evaluation.write_results(str(tmp_path), [prediction("base", f"i{i}", False, parsed=False) for i in range(5)], {}, {})
    assert "no reply of base on b names a single option" in capsys.readouterr().err


def scored(model, item, answer, scores, task="t", bench="b", **extra):
    """A log-likelihood prediction as stage 06 records it."""
    predicted = "ABCD"[max(range(len(scores)), key=scores.__getitem__)]
    return {"model": model, "bench": bench, "id": item, "groups": {"task_type": task}, "answer": answer,
            "prediction": predicted, "correct": predicted in extra.get("answers", [answer]), "scores": scores, **extra}


def test_calibration_judges_what_a_model_tells_apart_not_the_letter_it_favours(tmp_path):
    """40 two-option items, half answered A. `biased` always says A but gives the right option more
    probability than on the items where it is wrong (50% raw, 100% calibrated); `blind` scores every
    item alike whatever its answer, so dividing out its prior cannot help it; `right` is right with a
    wide margin and keeps its picks. Answers are not used: the same scores with every answer flipped
    flip each item's calibrated verdict."""
    answers = ["AB"[i % 2] for i in range(40)]
    predictions = [p for i, answer in enumerate(answers) for p in (
        scored("base", f"i{i}", answer, [-0.1, -2.5]),  # blind: says A, whatever the video
        scored("biased", f"i{i}", answer, [-0.1, -3.0] if answer == "A" else [-0.4, -1.2]),
        scored("right", f"i{i}", answer, [-0.1, -4.0] if answer == "A" else [-4.0, -0.1]))]
    remade = {(p["model"], p["id"]): p for p in evaluation.calibrated(predictions)}
    accuracy = lambda model: sum(remade[model, f"i{i}"]["correct"] for i in range(40)) / 40
    assert accuracy("biased") == 1.0 and accuracy("right") == 1.0 and accuracy("base") == 0.5
    assert all(remade["right", p["id"]]["prediction"] == p["prediction"] for p in predictions if p["model"] == "right")
    flipped = [{**p, "answer": "BA"["AB".index(p["answer"])], "correct": not p["correct"]} for p in predictions]
    assert all(remade[q["model"], q["id"]]["prediction"] == q["prediction"] and
               remade[q["model"], q["id"]]["correct"] != q["correct"] for q in evaluation.calibrated(flipped))
    table = evaluation.write_results(str(tmp_path), predictions, {}, {"mode": "loglik"})
    calibrated = json.load(open(tmp_path / "results.json"))["calibrated"]
    assert calibrated["biased"]["b"]["accuracy"] == 1.0 and calibrated["biased"]["b"]["vs_base"]["significant"]
    raw, after = table.split("With each model's prior over the option letters divided out")
    assert "| biased | 50.0 [" in raw and "| biased | 100.0 [" in after and "+50.0 [" in after


def test_calibrated_choices_divide_out_the_mean_probability_of_each_option():
    """Against a direct computation: each item's option probabilities (its scores renormalized over the
    options: the scores leave some probability to other tokens) divided by their mean over the items.
    The items leave different shares to other tokens, so a prior from the unnormalized scores picks
    otherwise, as the last line checks."""
    rng = np.random.default_rng(0)
    logits = 2 * rng.normal(size=(60, 4))
    scores = logits - np.log(np.exp(logits).sum(1, keepdims=True)) + rng.uniform(-6, 0, size=(60, 1))
    probabilities = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    expected = (probabilities / probabilities.mean(0)).argmax(1).tolist()
    assert evaluation.calibrated_choices(scores.tolist()) == expected
    assert (np.exp(scores) / np.exp(scores).mean(0)).argmax(1).tolist() != expected


def test_calibration_keeps_each_model_benchmark_and_task_type_apart():
    """Each model, benchmark and task type leans its own way; each gets its own prior. Pooled with an
    opposite lean, either would stay at 50%."""
    lean_a = lambda answer: [-0.1, -3.0] if answer == "A" else [-0.4, -1.2]  # always A, but less so when B is right
    lean_b = lambda answer: [-1.2, -0.4] if answer == "A" else [-3.0, -0.1]
    predictions = []
    for i in range(2 * evaluation.CALIBRATION_MIN_ITEMS):
        answer = "AB"[i % 2]
        predictions += [scored("m1", f"i{i}", answer, lean_a(answer)), scored("m2", f"i{i}", answer, lean_b(answer)),
                        scored("m1", f"i{i}", answer, lean_b(answer), bench="other"),
                        scored("m1", f"j{i}", answer, lean_b(answer), task="u")]
    assert sum(p["correct"] for p in predictions) == len(predictions) // 2
    assert all(p["correct"] for p in evaluation.calibrated(predictions))


def test_calibration_pools_small_task_types_and_leaves_out_what_it_cannot_estimate():
    """A task type of fewer than CALIBRATION_MIN_ITEMS items takes its prior from all the benchmark's
    items with as many options; a benchmark too small for that, and generated replies, are left out.
    MLVU's repeated options: any option with the answer's text counts as right. TempCompass's items
    have no task type: their task (the reply's form) is what is pooled."""
    few = evaluation.CALIBRATION_MIN_ITEMS // 2
    pooled = ([scored("base", f"s{i}", "A", [-0.5, -0.9], task="small") for i in range(few)]
              + [scored("base", f"l{i}", "B", [-0.1, -2.0], task="large") for i in range(evaluation.CALIBRATION_MIN_ITEMS)])
    remade = {p["id"]: p for p in evaluation.calibrated(pooled)}
    assert len(remade) == len(pooled)
    # the small type's own prior would leave its alike items at A; beside the large type's stronger lean to A, B leads
    assert all(remade[f"s{i}"]["prediction"] == "B" for i in range(few))
    assert all(remade[f"l{i}"]["prediction"] == "A" for i in range(evaluation.CALIBRATION_MIN_ITEMS))  # its own prior: a tie
    tiny = [scored("base", f"t{i}", "A", [-0.5, -0.9], bench="tiny") for i in range(few)]
    replies = [{**prediction("base", f"g{i}", True), "reply": "A"} for i in range(40)]
    assert evaluation.calibrated(tiny + replies) == []
    repeated = [scored("base", f"m{i}", "A", [-2.0, -2.0, -0.1] if i % 2 else [-0.1, -2.0, -2.0], answers=["A", "C"])
                for i in range(evaluation.CALIBRATION_MIN_ITEMS)]
    assert all(p["correct"] for p in evaluation.calibrated(repeated))
    yes_no = [{**scored("base", f"y{i}", "AB"[i % 2], [-0.1, -3.0] if i % 2 == 0 else [-0.4, -1.2]),
               "groups": {"dim": "speed", "task": "yes_no"}} for i in range(evaluation.CALIBRATION_MIN_ITEMS)]
    letters = [{**scored("base", f"c{i}", "AB"[i % 2], [-1.2, -0.4] if i % 2 == 0 else [-3.0, -0.1]),
                "groups": {"dim": "speed", "task": "caption_matching"}} for i in range(evaluation.CALIBRATION_MIN_ITEMS)]
    assert all(p["correct"] for p in evaluation.calibrated(yes_no + letters))


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


@pytest.mark.parametrize("arch", MODELS)
def test_loglik_picks_the_option_the_logits_favour(tiny_models, benches, arch):
    """With the logits of "C" and of "yes" raised by construction, every multiple-choice item is
    scored C and every yes/no item yes, whatever the prompt lengths and left padding."""
    model, processor = evaluation.load_model(tiny_models[arch], four_bit=False, device=torch.device("cpu"))
    model.eval()
    favoured = [processor.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("C", "yes")]
    hook = model.get_output_embeddings().register_forward_hook(lambda module, inputs, logits: logits.index_add(
        -1, torch.tensor(favoured), torch.full(logits.shape[:-1] + (2,), 50.0)))
    args = evaluation.parse_args(["--model", "m", "--bench", "b", "--out", "o", "--num-frames", "4"])
    _, _, video_items, _ = evaluation.read_bench(benches["video"], "auto", None, None)
    _, _, text_items, _ = evaluation.read_bench(benches["t3"], "auto", None, None)
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
    """Stage 06 on both benches, in this process (no interpreter and torch start-up per run)."""
    return run_in_process("06_eval.py", "--model", tiny_models["qwen2_vl"], "--bench", benches["video"], "--bench", benches["t3"],
                          "--num-frames", 4, "--out", out, "--batch-size", 3, *extra)


def predictions(folder):
    return {(p["model"], p["bench"], p["id"]): p for p in map(json.loads, open(os.path.join(folder, "predictions.jsonl")))}


def assert_same_predictions(got, expected):
    """The same items with the same answers; scores equal up to SCORE_NOISE. A batch padded differently (another
    shard, a resumed run) may round the last of 5 decimals the other way on some CPUs' kernels."""
    assert got.keys() == expected.keys()
    for key, p in expected.items():
        assert {k: v for k, v in got[key].items() if k != "scores"} == {k: v for k, v in p.items() if k != "scores"}, key
        assert got[key]["scores"] == pytest.approx(p["scores"], abs=SCORE_NOISE), key


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
            assert together[key]["scores"] == pytest.approx(p["scores"], abs=SCORE_NOISE), key
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
    results = json.load(open(tmp_path / "results.json"))["results"]["base"]
    unparsed = sum(p["prediction"] is None for p in rows)
    assert sum(cell["unparsed"] for cell in results.values()) == unparsed
    assert ("replies name no single option" in open(tmp_path / "results.md").read()) == (unparsed > 0)


def test_shards_merge_and_resume_give_the_whole_run(tiny_models, benches, tmp_path):
    assert run_eval(tiny_models, benches, tmp_path / "whole").returncode == 0
    whole = predictions(tmp_path / "whole")
    for i in range(2):
        assert run_eval(tiny_models, benches, tmp_path / f"shard{i}", "--shard", f"{i}/2").returncode == 0
    merged = subprocess.run([sys.executable, SCRIPT, "--merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"),
                             "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert_same_predictions(predictions(tmp_path / "merged"), whole)
    same = lambda folder: json.load(open(tmp_path / folder / "results.json"))["results"]
    assert same("merged") == same("whole")

    lines = open(tmp_path / "whole" / "predictions.jsonl").read().splitlines()
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "predictions.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # torn last line
    resumed = run_eval(tiny_models, benches, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_predictions(predictions(tmp_path / "killed"), whole)
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
                "missing_video": f"no video of the 1 named was found beside the benchmark files (or give --video-root); "
                                 f"first: {tmp_path / 'nowhere.mp4'}",
                "bad_json": f"{path}:2: not valid JSON"}[case]
    assert message.startswith("error: " + expected), message


def test_skip_missing_counts_instead(tiny_models, tmp_path):
    write_video(tmp_path / "here.mp4", frames_for(12, seed=3))
    path = tmp_path / "bench.jsonl"
    videos = ["", "here.mp4", "nowhere.mp4", "nowhere2.mp4"]
    path.write_text("".join(json.dumps({"id": f"x{i}", "video": video, "question": "Q?", "options": ["a", "b"],
                                        "answer": "A"}) + "\n" for i, video in enumerate(videos)))
    command = [sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--bench", str(path), "--num-frames", "4",
               "--out", str(tmp_path / "out")]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {path}:3: video {tmp_path / 'nowhere.mp4'} not found (2 of 3 videos are missing; "
        "pass --skip-missing to score without them)")
    result = subprocess.run(command + ["--skip-missing"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.load(open(tmp_path / "out" / "results.json"))
    assert results["results"]["base"]["bench"]["total"] == 2 and results["results"]["base"]["bench"]["skipped"] == 2
    assert "skipped 2 items" in result.stdout
    assert "bench: 2 items skipped (video missing or unreadable)" in open(tmp_path / "out" / "results.md").read()
