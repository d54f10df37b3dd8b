"""Shared fixtures: tiny models of real architectures (built once per session) and stage loading."""
import contextlib
import io
import os
import subprocess
import sys
import traceback

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
TOY_MODEL = os.path.join(REPO, "toy_world", "model")  # the shipped toy-world model
needs_toy_model = pytest.mark.skipif(not os.path.isfile(os.path.join(TOY_MODEL, "model.safetensors")),
                                     reason="no shipped toy model")

import tiny_model  # noqa: E402  (after the sys.path lines above)
from stages import load_stage  # noqa: E402  (one helper for tests and benchmarks)


def run_in_process(script, *args):
    """Run a stage as `python SCRIPT ARGS` would (exit status, stdout, stderr, a traceback as status 1),
    but in this process: no interpreter and torch start-up, which is most of a refused run's time."""
    stage = load_stage(script)
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            stage.run_main(stage.main, [str(a) for a in args])
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc()
            status = 1
        finally:
            getattr(stage, "_stop_decoder", lambda: None)()
    return subprocess.CompletedProcess([script, *map(str, args)], status, out.getvalue(), err.getvalue())

# The models the per-model tests run on: the tiny defaults, then the tiny twin of every real
# checkpoint folder on this machine ("real:NAME", see tiny_model.real_processor_folders).


def renders_chat(folder):
    """Whether a real folder's chat template renders chat messages (a base checkpoint's does not)."""
    from transformers import AutoProcessor
    turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = AutoProcessor.from_pretrained(folder).apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return "What happens?" in text


REAL_FOLDERS = tiny_model.real_processor_folders()
TWINS = [f"real:{name}" for name, folder in REAL_FOLDERS.items() if renders_chat(folder)]
NOT_CHAT_TWINS = [f"real:{name}" for name in REAL_FOLDERS if f"real:{name}" not in TWINS]
MODELS = list(tiny_model.ARCHS) + TWINS


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{name: folder}: a tiny Qwen2-VL and LLaVA-OneVision, and the tiny twins of the real folders."""
    root = tmp_path_factory.mktemp("models")
    models = {arch: tiny_model.build(str(root / arch), arch=arch) for arch in tiny_model.ARCHS}
    for name, folder in REAL_FOLDERS.items():
        models[f"real:{name}"] = tiny_model.build_like(str(root / f"real-{name}"), folder)
    return models
