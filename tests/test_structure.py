"""The house rules that keep the code readable: no import cycles between src/ modules, no function longer than
about 60 lines unless its docstring says why, and README's links into docs/ resolve."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def imports() -> dict[str, set[str]]:
    """src module -> the src modules it imports, at the top or inside functions (a lazy import is still a dependency)."""
    graph = {}
    for f in sorted((ROOT / "src").glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src."):
                deps.add(node.module.split(".")[1])
        graph[f.stem] = deps - {f.stem}
    return graph


def test_no_import_cycles():
    graph, cycles, state, stack = imports(), [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in graph:
        if u not in state:
            visit(u)
    assert not cycles, cycles


def test_the_cycle_check_sees_lazy_imports(tmp_path):
    tree = ast.parse("def f():\n    from .runs import Run\n")
    assert [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] == ["runs"]


def test_no_long_function_without_a_reason():
    long = []
    for f in sorted((ROOT / "src").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES and "long because" not in (ast.get_docstring(node) or "").lower():
                    long.append(f"{f.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_production_code_does_not_import_the_generator():
    users = sorted(m for m, deps in imports().items() if "synth" in deps)
    assert users == [], users


def test_readme_is_a_landing_page_whose_links_into_docs_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    links = re.findall(r"\]\(((?:docs/)[^)#\s]+)(?:#[^)]*)?\)", text)
    assert links, "README links into docs/"
    for link in links:
        assert (ROOT / link).exists(), link
    for page in sorted((ROOT / "docs").glob("*.md")):  # and the docs' links to each other and to files
        for link in re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name}: {link}"


def test_the_scale_rehearsal_knows_every_step_of_run_sh():
    """bench/scale.py groups run.sh's steps by name: a step added to run.sh without a group there would end a
    rehearsal of hours at its report."""
    text = (ROOT / "bench" / "scale.py").read_text()
    kinds = ast.literal_eval(text.split("STEP_KINDS = ", 1)[1].split("\n\n", 1)[0])
    names = re.findall(r'^\s*step "([^"$]+)', (ROOT / "run.sh").read_text(), flags=re.M)
    assert len(names) >= 10
    for name in names:
        assert any(name.startswith(prefix) for prefix, _ in kinds), name
