"""The house rules that a test can see (docs/architecture.md, shared DESIGN.md).

- layers import downwards only, and no module imports itself back through others (function-level
  imports included);
- only ``mednext.config`` reads ``MEDNEXT_*`` variables and only ``mednext.pipeline.workdir``
  reads or writes the engine's ``nnUNet_*`` variables;
- every private name of the engine that a mednext class overrides is listed, with its reason, in
  docs/decisions.md;
- code comments and docstrings carry no measured timings and no development history.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import pkgutil
import re
import tokenize
from pathlib import Path

import pytest

import mednext

PACKAGE = Path(mednext.__file__).resolve().parent
REPO = PACKAGE.parent.parent

# Rank of each layer: a module may import modules of its own rank or lower.
BASE = {"mednext.config", "mednext.errors", "mednext.files", "mednext.memory", "mednext.version"}
LAYERS = {"nn": 1, "pipeline": 2, "demo": 3, "bench": 4, "cli": 5}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def rank(module: str) -> float:
    if module in BASE:
        return 0
    if module == "mednext":
        return 2.5  # the package re-exports the network layer's API and, lazily, the pipeline's Segmenter
    if module == "mednext.__main__":
        return 6
    return LAYERS[module.split(".")[1]]


def _resolve(name: str) -> str | None:
    """The mednext module that an imported dotted name refers to (a module, or the package defining it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every mednext module ``module`` imports, at any depth of its code."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in ``base``
        else:
            continue
        for name in names:
            if name.split(".")[0] == "mednext":
                target = _resolve(name)
                if target and target != module:
                    found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_the_layout_is_what_the_architecture_doc_describes():
    layers = {m.split(".")[1] for m in MODULES if m.count(".") >= 1 and m not in BASE and m != "mednext.__main__"}
    assert layers == set(LAYERS), f"unexpected top-level parts {layers - set(LAYERS)}; add them to docs/architecture.md"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_downwards(module):
    upward = sorted(t for t in GRAPH[module] if rank(t) > rank(module))
    assert not upward, f"{module} (layer rank {rank(module)}) imports {upward} from a higher layer"


def test_no_import_circles():
    """Tarjan's strongly connected components over every import, function-level included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not cycles, f"import circles: {cycles}"


# ----------------------------------------------------------------------------- environment

ENV_OWNERS = {"MEDNEXT_": "mednext.config", "nnUNet_": "mednext.pipeline.workdir"}
_ENV_CALLS = {"get", "pop", "setdefault", "__getitem__", "__setitem__", "__delitem__"}


def _module_constants(tree: ast.Module) -> dict[str, str]:
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
    return constants


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def environment_keys(path: Path) -> list[str]:
    """The keys of every access to ``os.environ`` / ``os.getenv`` in a file; ``"?"`` when a key is not
    a string the file defines (so it cannot be checked)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = _module_constants(tree)

    def key_of(node: ast.AST) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and node.id in constants:
            return constants[node.id]
        return "?"

    keys = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            keys.append(key_of(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if (_is_environ(node.func.value) and node.func.attr in _ENV_CALLS) or node.func.attr in (
                "getenv",
                "putenv",
            ):
                keys.append(key_of(node.args[0]))
        elif isinstance(node, ast.ImportFrom) and node.module == "nnunetv2.paths":
            keys += [alias.name for alias in node.names]  # the engine's folder variables, read through its module
    return keys


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_owners_read_the_switches(module):
    for key in environment_keys(MODULES[module]):
        for prefix, owner in ENV_OWNERS.items():
            if key.startswith(prefix) or key == "?":
                assert module == owner or (key == "?" and module in ENV_OWNERS.values()), (
                    f"{module} reads the environment variable {key!r}; only {owner} may (ask {owner} for it instead)"
                    if key != "?"
                    else f"{module} reads an environment variable whose name is not a constant of the module"
                )


def test_the_environment_check_sees_reads(tmp_path):
    """The scanner above finds the ways code reads a variable (so the rule cannot pass vacuously)."""
    path = tmp_path / "probe.py"
    path.write_text(
        "import os\nNAME = 'nnUNet_n_proc_DA'\nos.environ.get('MEDNEXT_A')\nos.environ['MEDNEXT_B']\n"
        "os.getenv('MEDNEXT_C')\nos.environ[NAME] = '0'\nos.environ.pop(name)\nfrom nnunetv2.paths import nnUNet_raw\n"
    )
    assert sorted(environment_keys(path)) == [
        "?",
        "MEDNEXT_A",
        "MEDNEXT_B",
        "MEDNEXT_C",
        "nnUNet_n_proc_DA",
        "nnUNet_raw",
    ]


# ----------------------------------------------------------------------------- engine hooks


def _engine_classes() -> list[type]:
    pytest.importorskip("nnunetv2")
    classes = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="mednext."):
        if info.name.split(".")[1] not in ("pipeline", "demo"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and any(b.__module__.startswith("nnunetv2.") for b in cls.__mro__):
                classes.append(cls)
    return classes


def private_engine_overrides() -> set[str]:
    """``Class._name`` for every private (single-underscore) engine attribute a mednext class redefines."""
    found = set()
    for cls in _engine_classes():
        engine_bases = [b for b in cls.__mro__ if b.__module__.startswith("nnunetv2.")]
        for name in vars(cls):
            if name.startswith("_") and not name.startswith("__") and any(name in vars(b) for b in engine_bases):
                found.add(f"{cls.__name__}.{name}")
    return found


def test_private_engine_overrides_are_listed_with_reasons():
    decisions = (REPO / "docs" / "decisions.md").read_text(encoding="utf-8")
    missing = sorted(name for name in private_engine_overrides() if f"`{name}`" not in decisions)
    assert not missing, (
        f"these engine private names are overridden without an entry in docs/decisions.md: {missing}; "
        "use a public hook, or list each as `Class._name` with the reason no public hook exists"
    )


# ----------------------------------------------------------------------------- comments and docs

HISTORY = [
    re.compile(r"\bsessions?\s+\d", re.IGNORECASE),  # "session 5"
    re.compile(r"\b\d+(?:\.\d+)?\s?ms\b"),  # timings
    re.compile(r"\b\d+\.\d+\s?s\b"),  # timings in seconds
    re.compile(r"\bmeasured\s*(?:on|at|with|\(|:)", re.IGNORECASE),  # "measured on an H200", "Measured (2 cores"
    re.compile(r"\b\d+(?:\.\d+)?x (?:faster|slower)", re.IGNORECASE),
    re.compile(r"/tmp/"),
]


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    source = path.read_text(encoding="utf-8")
    found = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((getattr(node, "lineno", 1), doc))
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_comments_carry_no_measurements_or_history(module):
    bad = [
        f"line {line}: {match.group(0)!r} in {text.strip()[:100]!r}"
        for line, text in comments_and_docstrings(MODULES[module])
        for pattern in HISTORY
        for match in pattern.finditer(text)
    ]
    assert not bad, f"{module}: numbers live in docs/ tables with their command, history in git:\n" + "\n".join(bad)


def test_user_docs_describe_the_product_not_its_history():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    patterns = [re.compile(r"\bsessions?\s+\d", re.IGNORECASE), re.compile(r"/tmp/"), re.compile(r"issue's target")]
    bad = [
        f"{path.name}:{n}: {line.strip()[:120]}"
        for path in docs
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(p.search(line) for p in patterns)
    ]
    assert not bad, "user docs narrate development history:\n" + "\n".join(bad)


def test_architecture_doc_is_short_and_names_every_layer():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for layer in ("config", "errors", "files", "memory", *LAYERS):
        assert f"`{layer}" in text or f"{layer}/" in text, f"docs/architecture.md does not describe {layer}"


def _text_io_without_encoding(path: Path) -> list[str]:
    """Calls that read or write text in the locale's encoding: ``read_text``/``write_text`` and
    text-mode ``open`` without ``encoding=`` (a machine with an ASCII locale then fails on any
    non-ASCII path or label name)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        keywords = {k.arg for k in node.keywords}
        if name in ("read_text", "write_text") and "encoding" not in keywords:
            found.append(f"line {node.lineno}: {name} without encoding")
        if name == "open" and isinstance(func, ast.Name) and "encoding" not in keywords:
            mode = (
                node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            )
            text_mode = mode is None or (isinstance(mode, ast.Constant) and "b" not in str(mode.value))
            if text_mode:
                found.append(f"line {node.lineno}: open() in text mode without encoding")
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_text_files_are_read_and_written_with_an_encoding(module):
    bad = _text_io_without_encoding(MODULES[module])
    assert not bad, f"{module}: name the encoding (utf-8), whatever the machine's locale:\n" + "\n".join(bad)
