"""What the benchmarks share: importing a numbered stage script, and naming the machine they ran on."""
import importlib.util
import os
import platform

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_stage(filename):
    """A stage script (or another of the repo's scripts, by its path in the repo) as a module, without
    running main(); a stage's file name is not a valid module name, so "02_probe.py" becomes "probe"."""
    name = os.path.splitext(os.path.basename(filename))[0].lstrip("0123456789_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine():
    """The device and versions a result was measured with, for the first line of its table."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device}; torch {torch.__version__}; python {platform.python_version()}"
