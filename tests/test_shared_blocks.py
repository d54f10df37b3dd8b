"""Stage scripts stay self-contained: shared helpers are identical copies, and no stage imports another."""
import glob
import os
import re

from conftest import REPO

BLOCK = re.compile(r"^# ---- shared: (?P<name>[\w-]+) .*?\n(?P<body>.*?)^# ---- end shared: (?P=name) ----$", re.S | re.M)


def stage_scripts():
    return sorted(glob.glob(os.path.join(REPO, "0[1-6]_*.py")))


def test_shared_blocks_are_identical_copies():
    copies = {}
    for path in stage_scripts():
        for match in BLOCK.finditer(open(path, encoding="utf-8").read()):
            copies.setdefault(match["name"], {})[os.path.basename(path)] = match["body"]
    assert "io" in copies and len(copies["io"]) == len(stage_scripts())
    for name, bodies in copies.items():
        first = next(iter(bodies.values()))
        differing = [script for script, body in bodies.items() if body != first]
        assert not differing, f"shared block {name!r} differs in {differing}"


def test_no_stage_imports_another_file_of_this_repo():
    local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "*.py"))} | {"tests", "bench"}
    for path in stage_scripts():
        source = open(path, encoding="utf-8").read()
        imported = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, re.M))
        assert not {m.split(".")[0] for m in imported} & local, path
        assert "spec_from_file_location" not in source and "import_module" not in source
