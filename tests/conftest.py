"""Shared fixtures: tiny models of real architectures (built once per session) and stage loading."""
import importlib.util
import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_stage(filename):
    """Import a numbered stage script (its name is not a valid module name) without running main()."""
    spec = importlib.util.spec_from_file_location(filename[:-3].lstrip("0123456789_"), os.path.join(REPO, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{arch: folder} for a tiny Qwen2-VL and a tiny LLaVA-OneVision."""
    import tiny_model
    root = tmp_path_factory.mktemp("models")
    return {arch: tiny_model.build(str(root / arch), arch=arch) for arch in tiny_model.ARCHS}
