"""Import a numbered stage script (its file name is not a valid module name) without running main()."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_stage(filename):
    spec = importlib.util.spec_from_file_location(filename[3:-3], os.path.join(REPO, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
