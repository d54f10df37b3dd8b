"""Copy the shared helper blocks from tools/shared_blocks.py into the stage scripts.

A stage gets, for each block, only the top-level definitions (functions, classes, constants)
that its own code reaches, directly or through other shared definitions, in the source's
order. The blocks go at the end of the stage, just before its `if __name__ == "__main__":`,
so that a reader meets the stage's method first. A block the stage does not use is left out.

Usage:
    python tools/sync_shared.py           rewrite the stages that are out of date
    python tools/sync_shared.py --check   only name them; exit 1 if there are any
"""
import argparse
import ast
import glob
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(REPO, "tools", "shared_blocks.py")
BLOCK = re.compile(r"^# ---- shared: (?P<name>[\w-]+)[^\n]*\n(?P<body>.*?)^# ---- end shared: (?P=name) ----\n",
                   re.S | re.M)
MAIN_GUARD = 'if __name__ == "__main__":'


def stage_scripts():
    return sorted(glob.glob(os.path.join(REPO, "0[1-6]_*.py")))


def defined_names(node):
    """The module-level names a top-level statement binds (looking into `if` and `try`, not into bodies)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    children = [getattr(node, field, []) for field in ("body", "orelse", "finalbody")]
    children += [h.body for h in getattr(node, "handlers", [])]
    return set().union(*(defined_names(child) for block in children for child in block))


def used_names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def read_blocks(text):
    """[(name, header line, [(names defined, names used, source text)])] in the order of the source file.

    A definition's text runs from the end of the one before it, so it keeps its comments and spacing."""
    blocks = []
    for match in BLOCK.finditer(text):
        body = match["body"]
        lines = body.splitlines(keepends=True)
        definitions, previous_end = [], 0
        for node in ast.parse(body).body:
            chunk = "".join(lines[previous_end:node.end_lineno])
            definitions.append((defined_names(node), used_names(node), chunk))
            previous_end = node.end_lineno
        blocks.append((match["name"], match.group(0).splitlines()[0], definitions))
    return blocks


def needed_names(own_code, blocks):
    """The shared names the stage's own code reaches, following shared definitions into each other
    (a name the stage defines itself is its own, not the shared one)."""
    tree = ast.parse(own_code)
    own = set().union(*(defined_names(node) for node in tree.body))
    provides = {name: used for _, _, definitions in blocks for names, used, _ in definitions for name in names
                if name not in own}
    needed, frontier = set(), used_names(tree) & provides.keys()
    while frontier:
        needed |= frontier
        frontier = {n for name in frontier for n in provides[name]} & provides.keys() - needed
    return needed


def render_block(name, header, definitions, needed):
    kept = [chunk for names, _, chunk in definitions if names & needed]
    if not kept:
        return None
    return f"{header}\n" + "".join(kept).lstrip("\n") + f"# ---- end shared: {name} ----\n"


def synced(stage_text, blocks):
    """The stage's text with its shared blocks replaced by what it needs of the source's blocks."""
    own = re.sub(r"\n{4,}", "\n\n\n", BLOCK.sub("", stage_text))
    head, guard, tail = own.rpartition(MAIN_GUARD)
    if not guard:
        raise SystemExit(f"no line `{MAIN_GUARD}` to put the shared blocks before")
    needed = needed_names(own, blocks)
    rendered = [render_block(name, header, definitions, needed) for name, header, definitions in blocks]
    return head.rstrip("\n") + "\n\n\n" + "\n\n".join(b for b in rendered if b) + "\n\n" + guard + tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a stage is out of date")
    args = parser.parse_args(argv)
    with open(SOURCE, encoding="utf-8") as f:
        blocks = read_blocks(f.read())
    stale = []
    for path in stage_scripts():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = synced(text, blocks)
        if new == text:
            continue
        stale.append(os.path.basename(path))
        if not args.check:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(new)
            os.replace(path + ".tmp", path)
    verb = "out of date" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "all stages in sync")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
