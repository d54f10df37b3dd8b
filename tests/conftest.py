"""Shared fixtures: tiny models of real architectures (built once per session) and stage loading."""
import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import tiny_model  # noqa: E402  (after the sys.path lines above)
from stages import load_stage  # noqa: E402,F401  (one helper for tests and benchmarks)

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
