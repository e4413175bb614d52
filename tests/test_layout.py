"""The package's layout holds: every import runs down the floors, there is no import cycle,
and no module grows past the size a reader can take in (README, "Layout")."""

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ultraedit_fast")

# floor of each top-level module or sub-package (a package stands for every module in
# it); a module may import modules of its own floor or below, never above
FLOORS = {
    "_version": 0,
    "_log": 0,
    "kernels": 0,
    "utils": 1,
    "parallel": 2,
    "model": 3,
    "scoring": 4,
    "data": 4,
    "core": 5,
    "storage": 6,
    "editors": 7,
    "lifelong": 8,
    "baselines": 8,
    "integrations": 8,
    "cli": 9,
    "bench": 9,
    "__init__": 9,
    "__main__": 9,
}
# the ground floor's leaves the kernels may use
KERNEL_DEPS = {"_log", "_version"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules():
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, PKG)[:-3].replace(os.sep, ".")
                out[rel] = path
    return out


def _imports(name: str, path: str):
    """Package modules imported by ``name`` (anywhere in it, function bodies too)."""
    pkg_parts = name.split(".")[:-1] if not name.endswith("__init__") else name.split(".")[:-1]
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x
                    for a in node.names:
                        found.add(".".join(base + [a.name]))
                else:
                    found.add(mod)
            elif node.module and node.module.startswith("ultraedit_fast"):
                found.add(node.module[len("ultraedit_fast") :].lstrip("."))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ultraedit_fast."):
                    found.add(a.name[len("ultraedit_fast.") :])
    return {m for m in found if m}


def _top(mod: str) -> str:
    return mod.split(".")[0]


def test_every_module_has_a_floor():
    missing = sorted({_top(m) for m in _modules()} - set(FLOORS))
    assert not missing, f"add these modules to FLOORS: {missing}"


def test_imports_run_down_and_do_not_cycle():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for d in _imports(name, path):
            # resolve ``kernels`` (package) and ``kernels.ops`` alike to a known module
            target = d if d in mods else (d + ".__init__" if d + ".__init__" in mods else None)
            if target is None and _top(d) in FLOORS:
                target = d  # a name imported from a package's __init__
            if target is not None:
                deps.add(target)
        graph[name] = deps
    up = []
    for name, deps in graph.items():
        for d in deps:
            if _top(d) != _top(name) and FLOORS[_top(d)] > FLOORS[_top(name)]:
                up.append(f"{name} -> {d}")
    assert not up, f"imports that run up a floor: {up}"
    kernels_out = [
        f"{n} -> {d}"
        for n, ds in graph.items()
        if _top(n) == "kernels"
        for d in ds
        if _top(d) not in {"kernels"} | KERNEL_DEPS
    ]
    assert not kernels_out, f"the kernels import the package above them: {kernels_out}"
    # cycles between top-level modules (a package's modules count as the package)
    top = {}
    for name, deps in graph.items():
        top.setdefault(_top(name), set()).update(_top(d) for d in deps if _top(d) != _top(name))
    seen, stack = {}, []

    def visit(n):
        seen[n] = "open"
        stack.append(n)
        for d in top.get(n, ()):
            if seen.get(d) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(d) :] + [d])}")
            if d not in seen:
                visit(d)
        stack.pop()
        seen[n] = "done"

    for n in top:
        if n not in seen:
            visit(n)


def test_no_module_is_too_large():
    sizes = {name: sum(1 for _ in open(path)) for name, path in _modules().items()}
    total = sum(sizes.values())
    big = {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
    largest = max(sizes, key=sizes.get)
    assert sizes[largest] < 0.15 * total, (largest, sizes[largest], total)


def test_no_function_is_too_long():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_subpackage_says_what_it_is_for():
    for entry in sorted(os.listdir(PKG)):
        init = os.path.join(PKG, entry, "__init__.py")
        if os.path.isfile(init):
            doc = ast.get_docstring(ast.parse(open(init).read())) or ""
            assert len(doc.split()) >= 15, f"{entry}/__init__.py: a paragraph on what it holds"
