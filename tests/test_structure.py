"""The house rules that keep the code readable: no import cycles between src/ modules, no function longer than
about 60 lines unless its docstring says why, and README's links into docs/ resolve."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def modules() -> dict[str, Path]:
    """Every module under src/, packages included, by dotted name within src ('cache', 'serve.node')."""
    out = {}
    for f in sorted((ROOT / "src").rglob("*.py")):
        parts = f.relative_to(ROOT / "src").with_suffix("").parts
        if parts[-1] != "__init__":
            out[".".join(parts)] = f
    return out


def imported(name: str, source: str, known) -> set[str]:
    """The src modules that module `name` (dotted within src) imports in `source`, at the top or inside functions (a
    lazy import is still a dependency): relative imports of any level and absolute `src.` ones."""
    package = name.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
        elif (node.module or "").startswith("src."):
            target = node.module.split(".")[1:]
        else:
            continue
        for a in node.names:  # `from . import layout` and `from .serve import node` name modules too
            if ".".join([*target, a.name]) in known:
                deps.add(".".join([*target, a.name]))
        if ".".join(target) in known:
            deps.add(".".join(target))
    return deps - {name}


def imports() -> dict[str, set[str]]:
    """src module -> the src modules it imports."""
    known = modules()
    return {name: imported(name, f.read_text(), known) for name, f in known.items()}


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


def test_the_cycle_check_sees_lazy_and_package_imports():
    """The function the cycle check walks, on source it has not seen: a lazy import inside a function, a parent
    package's module (`..predictor`) and a sibling (`.results`) are all dependencies."""
    known = {"runs", "predictor", "layout", "serve.results", "serve.node"}
    source = "from . import layout\ndef f():\n    from .runs import Run\n"
    assert imported("blend", source, known) == {"layout", "runs"}
    source = "from ..predictor import Predictor\ndef g():\n    from .results import analyse\n"
    assert imported("serve.node", source, known) == {"predictor", "serve.results"}
    assert "serve.node" in modules() and "cache" in modules()


def test_no_long_function_without_a_reason():
    long = []
    for f in sorted((ROOT / "src").rglob("*.py")):
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


def test_the_pipeline_does_not_import_the_serving_side():
    """src/serve/ (demo, page, node, DICOM writer) builds on the pipeline and brings FastAPI, pynetdicom and
    highdicom; no pipeline step may need them."""
    users = sorted(m for m, deps in imports().items() if not m.startswith("serve.") and any(d.startswith("serve.") for d in deps))
    assert users == [], users
    assert {m for m in modules() if m.startswith("serve.")} >= {"serve.demo", "serve.webapp", "serve.node",
                                                                "serve.dicom_out", "serve.results"}


@pytest.mark.parametrize("picture", ["demo_page", "node_report"])
def test_the_docs_pictures_are_of_the_demo_run_that_run_sh_makes(picture):
    """docs/screenshot.py (the page, README) and docs/node_picture.py (what a viewer receives, docs/node.md) write,
    beside each picture, the model card it showed: the picture must be of the run a plain `bash run.sh` makes today
    (its patients, folds, model and size, its out-of-fold operating point, a card of today's code) and the card must
    be the picture's (its sha256). Retake both with those scripts."""
    import hashlib
    import json

    import yaml
    rec = json.loads((ROOT / "docs" / f"{picture}.card.json").read_text())
    assert hashlib.sha256((ROOT / "docs" / f"{picture}.png").read_bytes()).hexdigest() == rec["image_sha256"]
    run_sh = (ROOT / "run.sh").read_text()
    patients = int(re.search(r"src\.synth .*--patients (\d+)", run_sh).group(1))
    k = int(re.search(r"K=\$\{K_GIVEN:-(\d+)\}", run_sh).group(1))
    spec_file = re.search(r"CPU_CONFIGS=\((configs/[^ )]+)", run_sh).group(1)
    spec = yaml.safe_load((ROOT / spec_file).read_text())
    card = rec["card"]
    assert (card["data"], card["patients"], len(card["folds"])) == ("demo", patients, k)
    assert (card["run"], card["model"], card["img_size"]) == (Path(spec_file).stem, spec["model"], spec["img_size"])
    assert set(card["prior"]) == {"epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"}
    op = card["operating_point"]
    if picture == "demo_page":
        assert f"Verdict at {op['threshold']:.3f}" in rec["summary_shown"] and "chosen out of fold" in rec["summary_shown"]
    else:
        assert rec["objects"][:2] == ["SR ICH AI result (research use)", "KO ICH AI key images (research use)"]
