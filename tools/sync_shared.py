"""Copy the shared helper blocks from tools/shared_blocks.py into the stage scripts.

A stage gets, for each block, only the top-level definitions (functions, classes, constants)
that its own code reaches, directly or through other shared definitions, in the source's
order. The blocks go at the end of the stage, just before its `if __name__ == "__main__":`,
so that a reader meets the stage's method first. A block the stage does not use is left out.

It refuses, naming the file and line, what would give a stage that does not run: markers that
do not pair up, a name defined twice in the source, a statement in a block that defines no
name, a shared definition that needs an import the stage lacks, a stage name that would replace
one a shared definition relies on, and a use of a shared name while the stage loads (the blocks
come last, so they are not defined yet). A shared name reached only through a string, e.g.
globals()["name"], is not seen: call shared code by name.

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
BLOCK = re.compile(r"^# ---- shared: (?P<name>[\w-]+) [^\n]*\n(?P<body>.*?)^# ---- end shared: (?P=name) ----\n",
                   re.S | re.M)
MARKER = re.compile(r"^# ---- (?:end )?shared:.*$", re.M)
MAIN_GUARD = 'if __name__ == "__main__":'


class SyncError(Exception):
    """A source or stage the tool cannot sync; the message names the file and line."""


def stage_scripts():
    return sorted(glob.glob(os.path.join(REPO, "0[1-6]_*.py")))


def line_of(text, offset):
    return text.count("\n", 0, offset) + 1


def check_markers(path, text):
    """Every marker line must open or close a block that pairs up."""
    paired = {m.start() for b in BLOCK.finditer(text) for m in MARKER.finditer(text, b.start(), b.end())}
    for marker in MARKER.finditer(text):
        if marker.start() not in paired:
            raise SyncError(f"{path}:{line_of(text, marker.start())}: a shared-block marker without its pair "
                            f"(`# ---- shared: NAME (...) ----` ... `# ---- end shared: NAME ----`): {marker.group(0)!r}")


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


def load_time_names(node):
    """The names a top-level statement reads while the module loads: everything but function bodies."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        parts = [*node.decorator_list, *node.args.defaults, *filter(None, node.args.kw_defaults), node.returns,
                 *(a.annotation for a in node.args.args + node.args.kwonlyargs)]
        return set().union(*(used_names(p) for p in parts if p is not None))
    if isinstance(node, ast.ClassDef):
        parts = [*node.decorator_list, *node.bases, *node.keywords]
        return set().union(*(used_names(p) for p in parts), *(load_time_names(n) for n in node.body))
    return used_names(node)


def parse(path, text, first_line=1):
    try:
        return ast.parse(text)
    except SyntaxError as e:
        raise SyncError(f"{path}:{first_line + (e.lineno or 1) - 1}: {e.msg}") from None


def read_blocks(text, path=SOURCE):
    """(blocks, imports): blocks are [(name, header line, [(names defined, names used, source text, line)])]
    in the source's order; imports maps each name the source imports to its import line.

    A definition's text runs from the end of the one before it, so it keeps its comments and spacing."""
    check_markers(path, text)
    imports = {}
    for node in parse(path, text).body:
        for statement in node.body if isinstance(node, ast.Try) else [node]:  # `try: import triton`, too
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                imports.update((name, ast.get_source_segment(text, statement)) for name in defined_names(statement))
    blocks, seen = [], {}
    for match in BLOCK.finditer(text):
        first = line_of(text, match.start("body"))
        body = match["body"]
        lines = body.splitlines(keepends=True)
        definitions, previous_end = [], 0
        for node in parse(path, body, first).body:
            names, line = defined_names(node), first + node.lineno - 1
            if not names:
                raise SyncError(f"{path}:{line}: a statement in a shared block must define a name (it is copied "
                                "only where that name is used)")
            for name in names & seen.keys():
                raise SyncError(f"{path}:{line}: {name} is already defined at line {seen[name]}")
            seen.update(dict.fromkeys(names, line))
            definitions.append((names, used_names(node), "".join(lines[previous_end:node.end_lineno]), line))
            previous_end = node.end_lineno
        blocks.append((match["name"], match.group(0).splitlines()[0], definitions))
    return blocks, imports


def needed_definitions(path, own_code, blocks, imports, blocks_at_line):
    """The shared names the stage's own code reaches, following shared definitions into each other;
    SyncError where the result would not run (see the module docstring)."""
    tree = parse(path, own_code)
    own = set().union(*(defined_names(node) for node in tree.body))
    provides = {name: (used, line) for _, _, definitions in blocks for names, used, _, line in definitions
                for name in names}
    needed, frontier = set(), used_names(tree) & provides.keys() - own
    while frontier:
        needed |= frontier
        frontier = {n for name in frontier for n in provides[name][0]} & provides.keys() - own - needed
    for name in sorted(needed):
        used, line = provides[name]
        for clash in sorted(used & own & provides.keys()):
            raise SyncError(f"{path}: defines {clash}, which the shared {name} ({SOURCE}:{line}) uses as the shared "
                            "one; rename the stage's")
        for missing in sorted(used & imports.keys() - own):
            raise SyncError(f"{path}: the shared {name} ({SOURCE}:{line}) needs `{imports[missing]}`; "
                            "add it to the stage's imports")
    for node in tree.body:
        for name in sorted(load_time_names(node) & needed if node.lineno < blocks_at_line else ()):
            raise SyncError(f"{path}:{node.lineno}: uses the shared {name} while the module loads, but the shared "
                            "blocks come after the stage's own code; use it inside a function, or define it in the stage")
    return needed


def render_block(name, header, definitions, needed):
    kept = [chunk for names, _, chunk, _ in definitions if names & needed]
    if not kept:
        return None
    return f"{header}\n" + "".join(kept).lstrip("\n") + f"# ---- end shared: {name} ----\n"


def synced(stage_text, blocks, imports=None, path="stage"):
    """The stage's text with its shared blocks replaced by what it needs of the source's blocks."""
    check_markers(path, stage_text)
    pieces = BLOCK.split(stage_text)[::3]  # the stage's own text around its blocks (split also yields names, bodies)
    if len(pieces) > 1:  # join the pieces with the two blank lines that stand between top-level definitions
        middle = [p.strip("\n") for p in pieces[1:-1] if p.strip("\n")]
        pieces = [pieces[0].rstrip("\n"), *middle, pieces[-1].lstrip("\n")]
    own = "\n\n\n".join(pieces)
    head, guard, tail = own.rpartition(MAIN_GUARD)
    if not guard:
        raise SyncError(f"{path}: no line `{MAIN_GUARD}` to put the shared blocks before")
    needed = needed_definitions(path, own, blocks, imports or {}, blocks_at_line=line_of(own, len(head)))
    rendered = [render_block(name, header, definitions, needed) for name, header, definitions in blocks]
    return head.rstrip("\n") + "\n\n\n" + "\n\n".join(b for b in rendered if b) + "\n\n" + guard + tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a stage is out of date")
    args = parser.parse_args(argv)
    try:
        with open(SOURCE, encoding="utf-8") as f:
            blocks, imports = read_blocks(f.read())
        stale = []
        for path in stage_scripts():
            with open(path, encoding="utf-8") as f:
                text = f.read()
            new = synced(text, blocks, imports, path)
            if new == text:
                continue
            stale.append(os.path.basename(path))
            if not args.check:
                with open(path + ".tmp", "w", encoding="utf-8") as f:
                    f.write(new)
                os.replace(path + ".tmp", path)
    except SyncError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verb = "out of date" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "all stages in sync")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
