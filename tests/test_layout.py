"""The code's shape, checked on its source (the layers themselves: ``lint-imports``, run by .ci/run).

- an import of the package's own modules inside a function says why, on its line (``# local: ...``);
- no module imports another module's private name;
- the tests import no command module (they run the commands as processes, as a user does).
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN = ("tlt_jax", "kernels_pallas", "configs")


def _sources(*tops):
    for top in tops:
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(root, f)
                    yield os.path.relpath(path, REPO), open(path).read()


def _imports(tree):
    """(node, module, names, inside_function) for every import of the package's own modules."""
    out = []

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] in OWN:
                out.append((child, child.module, [a.name for a in child.names], inside))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] in OWN:
                        out.append((child, a.name, [], inside))
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def local_imports_without_reason(sources):
    bad = []
    for path, text in sources:
        lines = text.splitlines()
        for node, module, _, inside in _imports(ast.parse(text)):
            if inside and "# local:" not in lines[node.lineno - 1]:
                bad.append(f"{path}:{node.lineno} imports {module} inside a function")
    return bad


def private_imports(sources):
    return [f"{path}:{node.lineno} imports {name} from {module}" for path, text in sources
            for node, module, names, _ in _imports(ast.parse(text)) for name in names
            if name.startswith("_") and not name.startswith("__")]


def test_function_local_imports_of_the_package_say_why():
    assert local_imports_without_reason(_sources("tlt_jax", "kernels_pallas", "configs")) == []


def test_no_private_name_is_imported_across_modules():
    assert private_imports(_sources("tlt_jax", "kernels_pallas", "configs", "tests")) == []


def test_tests_import_no_command_module():
    bad = [f"{path}:{node.lineno} imports {module}" for path, text in _sources("tests")
           for node, module, _, _ in _imports(ast.parse(text)) if module.startswith("tlt_jax.cli")]
    assert bad == []


@pytest.mark.parametrize("source,expected", [
    ("def f():\n    from tlt_jax.core import errors\n", 1),
    ("def f():\n    from tlt_jax.core import errors  # local: a reason\n", 0),
    ("from tlt_jax.core import errors\n", 0),
])
def test_the_checks_see_what_they_look_for(source, expected):
    assert len(local_imports_without_reason([("x.py", source)])) == expected
    assert private_imports([("x.py", "from tlt_jax.engine.adaptive import _take_rows\n")])
