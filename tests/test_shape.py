"""The repository's shape: the top-level modules import one another without a circle, lazy imports included."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imports_between_modules(folder=REPO):
    modules = {p.stem: p for p in folder.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import statement, inside functions too
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = found & modules.keys() - {name}
    return graph


def circle(graph):
    """One import circle of graph as a list of modules (first == last), or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for dep in sorted(graph[module]):
            found = visit(dep)
            if found:
                return found
        path.pop()
        done.add(module)
    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_no_import_circle_and_the_generator_stands_alone():
    graph = imports_between_modules()
    assert circle(graph) is None, " -> ".join(circle(graph))
    assert graph["toy"] <= {"utils", "files"}  # not datasets: the generator stands alone


def test_a_lazy_import_that_closes_a_circle_is_found(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("import c\n")
    (tmp_path / "c.py").write_text("def f():\n    from a import x\n")
    assert circle(imports_between_modules(tmp_path)) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("def f():\n    import os\n")
    assert circle(imports_between_modules(tmp_path)) is None
