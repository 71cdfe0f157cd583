"""A lint rule: POSIX-only calls stay where something guards them.

Windows has no `resource`, `fcntl`, `os.fork`, `os.killpg`, SIGKILL or SIGSTOP; code that
touches them unguarded dies there at import or at first use. Every such use must sit in a
function (or a module, for a test module's `pytestmark`) that checks the platform: a
`sys.platform`/`os.name` test, a `hasattr`, an `except ImportError/AttributeError`, or a
skip mark. Names that exist everywhere (SIGINT, SIGTERM) are not listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["mangogram_proto", "mangogram_broker", "mangogram_client", "bench", "examples",
           "fuzz", "tests", "broker.py", "client.py"]  # fmt: skip
POSIX_MODULES = {"resource", "fcntl", "termios", "tty", "pwd", "grp"}
POSIX_ATTRIBUTES = {
    ("os", "fork"), ("os", "killpg"), ("os", "setsid"), ("os", "getpgid"),
    ("os", "getuid"), ("os", "geteuid"), ("signal", "SIGKILL"), ("signal", "SIGSTOP"),
    ("signal", "SIGCONT"), ("signal", "SIGHUP"), ("signal", "SIGQUIT"),
}  # fmt: skip
GUARDS = ("sys.platform", "os.name", "hasattr(", "ImportError", "AttributeError", "skipif",
          "posix_signals")  # fmt: skip


def unguarded_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every POSIX-only use with no guard in its function or module."""
    tree = ast.parse(source)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    module_guard = any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
        and any(g in ast.get_source_segment(source, node) or "" for g in GUARDS)
        for node in tree.body
    )

    def guarded(node: ast.AST) -> bool:
        scope = node
        while scope in parents:
            scope = parents[scope]
            if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
                text = "\n".join(ast.get_source_segment(source, d) or "" for d in
                                 scope.decorator_list) + (ast.get_source_segment(source, scope)
                                                          or "")  # fmt: skip
                if any(g in text for g in GUARDS):
                    return True
            elif isinstance(scope, ast.If | ast.Try | ast.IfExp):
                text = ast.get_source_segment(source, scope) or ""
                if any(g in text for g in GUARDS):
                    return True
        return module_guard

    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
            what = next(iter(names & POSIX_MODULES), None)
        elif isinstance(node, ast.ImportFrom) and node.module in POSIX_MODULES:
            what = node.module
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in POSIX_ATTRIBUTES
        ):
            what = f"{node.value.id}.{node.attr}"
        if what is not None and not guarded(node):
            found.append((node.lineno, what))
    return found


def python_files() -> list[Path]:
    files: list[Path] = []
    for entry in CHECKED:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_every_posix_only_call_is_guarded() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in python_files()
        for line, what in unguarded_uses(path.read_text(encoding="utf-8"))
    ]
    assert offenders == [], "POSIX-only, unguarded:\n" + "\n".join(offenders)


def test_the_rule_catches_an_unguarded_call_and_accepts_guarded_ones() -> None:
    bad = "import os, signal\ndef stop(pid):\n    os.kill(pid, signal.SIGKILL)\n"
    assert unguarded_uses(bad) == [(3, "signal.SIGKILL")]
    assert unguarded_uses("import resource\n") == [(1, "resource")]
    good = (
        "import os, signal, sys\n"
        "def stop(pid):\n"
        "    if hasattr(signal, 'SIGKILL'):\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "def limit():\n"
        "    if sys.platform == 'win32':\n"
        "        return\n"
        "    import resource\n"
        "try:\n"
        "    import fcntl\n"
        "except ImportError:\n"
        "    fcntl = None\n"
    )
    assert unguarded_uses(good) == []
