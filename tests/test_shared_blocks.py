"""Stage scripts stay self-contained: the shared helpers come from one source, each stage carries only
what it calls, and no stage imports another file of this repo."""
import ast
import glob
import os
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import sync_shared  # noqa: E402  (tools/ is not a package)


def stage_scripts():
    return sorted(glob.glob(os.path.join(REPO, "0[1-6]_*.py")))


def source_blocks():
    with open(sync_shared.SOURCE, encoding="utf-8") as f:
        return sync_shared.read_blocks(f.read())[0]


def test_syncing_the_shared_blocks_changes_nothing(capsys):
    assert sync_shared.main(["--check"]) == 0, capsys.readouterr().out


def test_no_stage_carries_a_shared_definition_it_never_uses():
    for path in stage_scripts():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        tree = ast.parse(text)
        for match in sync_shared.BLOCK.finditer(text):
            first = text[:match.start()].count("\n") + 1
            last = first + match.group(0).count("\n")
            for node in tree.body:
                if not first < node.lineno < last or not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
                    continue
                for name in sync_shared.defined_names(node):
                    inside = {id(n) for n in ast.walk(node)}
                    uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == name and id(n) not in inside]
                    assert uses, f"{os.path.basename(path)} carries {name} (shared block {match['name']}) but never uses it"


def test_a_stage_gets_what_its_code_reaches_and_nothing_more():
    stage = '"""A stage."""\n\n\ndef main():\n    return list(read_jsonl("x.jsonl"))\n\n\nif __name__ == "__main__":\n    main()\n'
    synced = sync_shared.synced(stage, source_blocks())
    defined = {node.name for node in ast.parse(synced).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert defined == {"main", "read_jsonl", "check_input_file", "InputError"}  # read_jsonl calls the other two
    assert synced.index("def main") < synced.index("# ---- shared: io") < synced.rindex('if __name__ == "__main__":')
    assert sync_shared.synced(synced, source_blocks()) == synced


def test_a_name_the_stage_defines_itself_is_not_copied_in():
    stage = 'def read_jsonl(path):\n    return []\n\n\ndef main():\n    read_jsonl("x")\n\n\nif __name__ == "__main__":\n    main()\n'
    assert "# ---- shared" not in sync_shared.synced(stage, source_blocks())


def test_no_stage_imports_another_file_of_this_repo():
    local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "*.py"))}
    local |= {"tests", "bench", "tools", "shared_blocks", "sync_shared"}
    for path in stage_scripts():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        imported = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, re.M))
        assert not {m.split(".")[0] for m in imported} & local, path
        assert "spec_from_file_location" not in source and "import_module" not in source


SOURCE = '''import json

# ---- shared: io (test) ----
class InputError(Exception):
    pass


def read_json(path):
    with open(path) as f:
        return json.load(f)
# ---- end shared: io ----
'''
STAGE = '\n\ndef main():\n    return read_json("x")\n\n\nif __name__ == "__main__":\n    main()\n'


def sync_error(source=SOURCE, stage="import json\n" + STAGE):
    """The one-line refusal of syncing `stage` from `source`, or None."""
    try:
        sync_shared.synced(stage, *sync_shared.read_blocks(source, "SRC"), path="STAGE")
    except sync_shared.SyncError as e:
        return str(e)


@pytest.mark.parametrize("source,stage,expect", [
    (SOURCE.replace("# ---- end shared: io ----", "# ---- end shared: io ---"), None, "SRC:3: a shared-block marker without its pair"),
    (SOURCE.replace("# ---- shared: io (test)", "# ---- shared:io (test)"), None, "SRC:3: a shared-block marker without its pair"),
    (None, "# ---- shared: io (x) ----\n" + STAGE, "STAGE:1: a shared-block marker without its pair"),
    (SOURCE.replace("    pass", "    pass\n\n\nprint('loaded')"), None, "SRC:8: a statement in a shared block must define a name"),
    (SOURCE.replace("    pass", "    pass\n\n\ndef read_json():\n    pass"), None, "SRC:12: read_json is already defined at line 8"),
    (SOURCE.replace("return json.load(f)", "return json.load(f) +"), None, "SRC:10: invalid syntax"),
    (None, STAGE, "the shared read_json (" + sync_shared.SOURCE + ":8) needs `import json`"),
    (None, "import json\n\n\nclass Bad(InputError):\n    pass\n" + STAGE, "STAGE:4: uses the shared InputError while the module loads"),
    (SOURCE.replace("    pass", "    pass\n\n\nMODE = 'r'").replace("open(path)", "open(path, MODE)"), "import json\nMODE = 'rb'\n" + STAGE,
     "STAGE: defines MODE, which the shared read_json"),
    (None, "import json\n\n\ndef main():\n    pass\n", "STAGE: no line `if __name__"),
])
def test_what_would_not_run_is_refused_in_one_line_naming_the_place(source, stage, expect):
    message = sync_error(source or SOURCE, stage or "import json\n" + STAGE)
    assert message is not None and (message.startswith(expect) or expect in message), message


def test_a_well_formed_source_and_stage_sync():
    assert sync_error() is None
