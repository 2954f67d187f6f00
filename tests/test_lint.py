"""The code base stays ruff-clean, keeps its layers, and no module reads another's
``_private`` names (part of the test command, so CI enforces it)."""

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "multiqueue"

# Private names any module may read on another's objects, each with its reason.  (Names no
# module of the package defines, such as os._exit or namedtuple._asdict, need no entry.)
PRIVATE_READ_ALLOWLIST: dict[str, str] = {
    "_fields_": "ctypes' own API: the field table of a Structure (shm/layout.py defines some)",
    "_pack_": "ctypes' own API: a Structure's packing",
}


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    assert Path(ruff).exists(), "ruff is not installed: pip install -e '.[test]' installs it"
    result = subprocess.run([ruff, "check", "src", "tests", "benchmarks", "examples"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_hold():
    """import-linter's contracts in pyproject.toml: each layer imports only those below it."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), "import-linter is not installed: pip install -e '.[test]' installs it"
    result = subprocess.run([str(lint_imports)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# -- no module reads another module's private names ---------------------------------------


def _modules() -> dict[str, ast.Module]:
    """Every module of the package, by path relative to the package folder."""
    return {path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE.rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _assigned_names(target: ast.expr):
    """The names an assignment target binds (``a``, ``a, b``, ``[a, *b]``)."""
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _assigned_names(element)
    elif isinstance(target, ast.Starred):
        yield from _assigned_names(target.value)


def _self_attributes(target: ast.expr):
    """The attribute names ``self.x = ...`` (or ``cls.x``) binds, tuple targets included."""
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
            and target.value.id in ("self", "cls"):
        yield target.attr
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _self_attributes(element)


def _assignment_targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


def _slots(node: ast.AST):
    """The entries of a ``__slots__ = (...)`` assignment."""
    if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in _assignment_targets(node)):
        value = node.value
        if isinstance(value, (ast.Tuple, ast.List, ast.Set)):
            yield from (e.value for e in value.elts if isinstance(e, ast.Constant))
        elif isinstance(value, ast.Constant) and isinstance(value.value, str):
            yield value.value


def _scope_statements(body: list[ast.stmt]):
    """The statements of a module or class body, those inside if / try / with / for
    blocks included (not those of the functions and classes it defines)."""
    for node in body:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _scope_statements(getattr(node, field, []))


def _scope_definitions(body: list[ast.stmt]):
    """Names a module or class body defines: defs, classes, assignments, slots."""
    for node in _scope_statements(body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        for target in _assignment_targets(node):
            yield from _assigned_names(target)
        yield from _slots(node)
        if isinstance(node, ast.ClassDef):
            yield from _scope_definitions(node.body)


def _private_definitions(tree: ast.Module) -> set[str]:
    """The private names a module defines, at module or class level or as ``self._x``."""
    names = set(_scope_definitions(tree.body))
    for node in ast.walk(tree):
        for target in _assignment_targets(node):
            names.update(_self_attributes(target))
    return {name for name in names if _is_private(name)}


def _native_definitions() -> set[str]:
    """The private names the C extension defines: its method and member tables'
    ``{"_name", ...}`` rows (BufferBase's ``_id``, ``_ctx``, ``_check``...)."""
    source = (PACKAGE / "_native.c").read_text()
    return set(re.findall(r'^\s*\{"(_[A-Za-z0-9_]+)",', source, re.M))


def _private_reads(tree: ast.Module):
    """(line, text, name) of every read of a private attribute of something not
    self/cls, ``getattr(x, "_name")`` and ``from module import _name`` included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _is_private(alias.name):
                    yield node.lineno, f"from {'.' * node.level}{node.module or ''} import {alias.name}", \
                        alias.name
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _is_private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            yield node.lineno, f"{ast.unparse(owner)}.{node.attr}", node.attr
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2:
            owner, name = node.args[0], node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _is_private(name.value) \
                    and not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                yield node.lineno, f"{node.func.id}({ast.unparse(owner)}, {name.value!r})", name.value


def private_reads_across_modules() -> list[str]:
    """``file:line: x._name (defined in other.py)`` for every read of a private name that
    another module of the package defines and the reading module does not."""
    modules = _modules()
    defined = {path: _private_definitions(tree) for path, tree in modules.items()}
    defined["_native.c"] = _native_definitions()
    offenders = []
    for path, tree in modules.items():
        for line, text, name in sorted(_private_reads(tree)):
            if name in defined[path] or name in PRIVATE_READ_ALLOWLIST:
                continue
            owners = sorted(other for other, names in defined.items() if name in names)
            if owners:
                offenders.append(f"src/multiqueue/{path}:{line}: {text} (defined in {', '.join(owners)})")
    return offenders


def test_no_module_reads_another_modules_private_names():
    offenders = private_reads_across_modules()
    assert not offenders, (
        "these read private names of other modules; give the owner a public name instead:\n"
        + "\n".join(offenders))


# -- the import-linter exceptions hide nothing -----------------------------------------


def test_ignored_imports_of_the_root_are_only_the_extension():
    """grimp reads ``import multiqueue._native`` as an import of the package root, so
    pyproject.toml ignores ``<module> -> multiqueue`` for a few modules: they must take
    nothing else from the root (which would import every layer, the top ones included)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    ignored = {line.split(" -> ")[0] for contract in config["contracts"]
               for line in contract.get("ignore_imports", []) if line.endswith(" -> multiqueue")}
    assert ignored, "pyproject.toml no longer ignores any import of the package root"
    for module in sorted(ignored):
        path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
        imported = _root_imports(ast.parse(path.read_text()), module)
        assert imported <= {"multiqueue._native"}, f"{module} imports {sorted(imported)} from the root"


def _root_imports(tree: ast.Module, module: str) -> set[str]:
    """What a module imports from the package root itself (not from a subpackage)."""
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "multiqueue"
                         and a.name.count(".") <= 1)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, package)
            if source == "multiqueue":
                found.update(f"multiqueue.{a.name}" for a in node.names)
    return found


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


MAX_MODULE_LINES = 600  # a module one can read in a sitting (the C extension is the exception)
MAX_CLASS_LINES = 350


def test_modules_and_classes_stay_small():
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines > {MAX_MODULE_LINES}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_big.append(f"{path.relative_to(ROOT)}:{node.lineno}: class {node.name}: "
                               f"{node.end_lineno - node.lineno + 1} lines > {MAX_CLASS_LINES}")
    assert not too_big, "\n".join(too_big)


def test_a_function_level_import_of_the_package_says_why():
    """Imports of the package's own modules sit at the top of the module, where they show
    the dependencies; one inside a function needs a comment saying why (an optional
    dependency, start-up time measured)."""
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for func in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                ours = (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    "multiqueue"))) or (isinstance(node, ast.Import) and any(
                        a.name.startswith("multiqueue") for a in node.names))
                if ours and not ("#" in lines[node.lineno - 1]
                                 or lines[node.lineno - 2].strip().startswith("#")):
                    hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not hidden, "imports hidden in functions, with no comment saying why:\n" + "\n".join(hidden)
