"""Each stage file (and each benchmark or verification program) says, in its header's "Uses" block, exactly
what it takes from the stages, and takes from them only what they define (the shared harness comes from the
support package, not through a stage)."""
import ast
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "[0-9][0-9]_*.py")))
# the benchmark and verification programs import the stages as a user's script would: their headers too
PROGRAMS = sorted(os.path.basename(p) for pattern in ("bench_*.py", "verify_*.py")
                  for p in glob.glob(os.path.join(ROOT, pattern)))


def parse(stage):
    with open(os.path.join(ROOT, stage)) as f:
        return ast.parse(f.read())


def taken(tree):
    """{earlier stage: names this file reads from it}, from `alias = importlib.import_module("NN_x")`."""
    aliases = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "attr", None) == "import_module"):
            aliases[node.targets[0].id] = node.value.args[0].value
    names = {stage: set() for stage in aliases.values()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            names[aliases[node.value.id]].add(node.attr)
    return names


def declared(tree):
    """{earlier stage: names} from the docstring's "Uses" block: lines `NN_x: name, name, ...`."""
    doc = ast.get_docstring(tree)
    block = re.search(r"^Uses\n((?:    .*\n?)+)", doc, re.M)
    names, current = {}, None
    for line in (block.group(1).splitlines() if block else []):
        match = re.match(r"\s+(\d\d_\w+):(.*)", line)
        if match:
            current, line = match.group(1), match.group(2)
            names[current] = set()
        names[current] |= {n.strip() for n in line.split(",") if n.strip()}
    return names


def defined(stage):
    """Top-level names a stage defines itself (not those it imports)."""
    names = set()
    for node in parse(stage + ".py").body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("stage", STAGES + PROGRAMS)
def test_the_uses_block_names_exactly_what_the_stage_takes(stage):
    tree = parse(stage)
    assert declared(tree) == taken(tree)


@pytest.mark.parametrize("stage", STAGES + PROGRAMS)
def test_a_stage_takes_from_earlier_stages_only_what_they_define(stage):
    for earlier, names in taken(parse(stage)).items():
        assert earlier < stage, f"{stage} imports the later stage {earlier}"
        assert not names - defined(earlier), f"{stage} takes {names - defined(earlier)} through {earlier}"


def docstring_lines(tree):
    return sum(node.body[0].end_lineno - node.body[0].lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)
               and isinstance(node.body[0], ast.Expr))


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_is_mostly_code(stage):
    """Prose stays concise: docstrings at most 15% of a stage's lines, and no line over 110 characters."""
    with open(os.path.join(ROOT, stage)) as f:
        text = f.read()
    assert docstring_lines(ast.parse(text)) <= 0.15 * text.count("\n")
    assert max(len(line) for line in text.splitlines()) <= 110
