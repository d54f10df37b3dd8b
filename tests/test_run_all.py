"""run_all.sh: all six stages on the tiny model, offline, ending with the base / +T3 / +T3+TPO table."""
import json
import os
import subprocess

import pytest

from conftest import REPO


@pytest.mark.slow
def test_run_all_runs_every_stage_and_prints_the_table(tmp_path):
    settings = {"OUT": str(tmp_path / "runs"), "NUM_TRAIN": "200", "NUM_VAL": "26", "STEPS": "25", "BATCH": "8",
                "NUM_PAIRS": "2", "NUM_FRAMES": "4", "PROBE_VIDEOS": "18", "PROBE_SEEDS": "1", "EVAL_LIMIT": "8",
                "WORLD_STEPS": "10"}
    result = subprocess.run(["bash", os.path.join(REPO, "run_all.sh")], env={**os.environ, **settings},
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    runs = tmp_path / "runs"
    for stage, artifact in (("01", "t3_val.jsonl"), ("02", "report.md"), ("03", "adapter_model.safetensors"),
                            ("02", "world_text.jsonl"), ("03_world", "adapter_model.safetensors"),
                            ("04", "pairs.jsonl"), ("05", "adapter_model.safetensors"), ("06", "results.md")):
        assert (runs / stage / artifact).is_file(), stage
    results = json.load(open(runs / "06" / "results.json"))["results"]
    assert list(results) == ["base", "t3", "t3+tpo", "t3_world"]  # t3_world: the toy model's second T3 adapter
    assert all(set(per_model) == {"probe_bench", "probe_control_bench", "t3_val"} for per_model in results.values())
    assert all(results[m]["t3_val"]["total"] == 8 for m in results)
    table = result.stdout[result.stdout.index("| model |"):]
    assert "| base |" in table and "| t3 |" in table and "| t3+tpo |" in table and "| t3_world |" in table
    for headline in ("== 02", "mean over 10 temporal aspects", "order-free control (appearance, ", "reward accuracy", "T3 validation accuracy",
                     "against the answers given with the videos", "step 1: DPO term 0.6931"):
        assert headline in result.stdout
    assert result.stdout.count("the language model is the bottleneck") <= 1  # the verdict is printed once
    # quiet: no library warnings a user cannot act on, no tracebacks
    noise = [line for line in result.stderr.replace("\r", "\n").splitlines()
             if "Warning" in line or "Traceback" in line or "Failed to load" in line or "[h264" in line]
    assert not noise, noise[:5]
