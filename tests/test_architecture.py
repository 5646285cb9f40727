"""The package boundary of docs/architecture.md, checked on every module's imports (ast, lazy imports included):
neither side imports the lab, the tests, the benchmarks or packaging; the agent never imports the server;
agent/shared/ imports only the standard library and itself; the server imports from the agent only agent/shared/
and the short list the document names. The document must name exactly the shared modules that exist and the agent
modules the server really imports."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tests.conftest import REPO

DOC = REPO / "docs" / "architecture.md"
_SHARED_ROW = re.compile(r"^\| `agent/shared/(\w+)\.py` \|")
_ALLOWED_ROW = re.compile(r"^\| `(agent(?:\.\w+)*)` \|")


def _modules() -> dict[str, str]:
    """Every module of agent/ and server/ by dotted name, with its source."""
    found = {}
    for top in ("agent", "server"):
        for path in sorted((REPO / top).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path.read_text()
    return found


def imports(source: str, known: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``source``; ``from a import b`` names ``a.b`` when that is a module."""
    known = set(known)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield node.lineno, sub if sub in known else node.module


# What is not the product: the VM and replication labs and the demo (scripts/), the tests, the benchmarks, packaging.
NOT_PRODUCT = ("scripts", "tests", "bench", "packaging")


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}: {self.rule}"


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(modules: dict[str, str], allowed: set[str]) -> list[Violation]:
    """What crosses the boundary the wrong way (pure: ``modules`` maps dotted names to sources)."""
    found = []
    for module, source in modules.items():
        for line, imported in imports(source, modules):
            top = imported.split(".")[0]
            if top in NOT_PRODUCT:
                found.append(Violation(module, line, imported, "the product never imports the lab, tests or tools"))
            elif _inside(module, "agent.shared"):
                if top in ("agent", "server") and not _inside(imported, "agent.shared"):
                    found.append(Violation(module, line, imported, "agent/shared/ imports only agent/shared/"))
                elif top not in ("agent", "server", "__future__") and top not in sys.stdlib_module_names:
                    found.append(Violation(module, line, imported, "agent/shared/ imports only the standard library"))
            elif _inside(module, "agent") and _inside(imported, "server"):
                found.append(Violation(module, line, imported, "the agent never imports the server"))
            elif (
                _inside(module, "server")
                and _inside(imported, "agent")
                and not _inside(imported, "agent.shared")
                and imported not in allowed
            ):
                found.append(Violation(module, line, imported, "not in the list of docs/architecture.md"))
    return found


def _documented() -> tuple[set[str], set[str]]:
    shared, allowed = set(), set()
    for line in DOC.read_text().splitlines():
        if m := _SHARED_ROW.match(line):
            shared.add(m.group(1))
        elif m := _ALLOWED_ROW.match(line):
            allowed.add(m.group(1))
    return shared, allowed


def test_no_import_crosses_the_boundary_the_wrong_way() -> None:
    _, allowed = _documented()
    found = violations(_modules(), allowed)
    assert not found, "\n".join(map(str, found))


def test_the_document_names_the_shared_modules_and_what_the_server_imports() -> None:
    shared, allowed = _documented()
    modules = _modules()
    assert shared == {m.split(".")[-1] for m in modules if m.startswith("agent.shared.")}
    used = {
        imported
        for module, source in modules.items()
        if _inside(module, "server")
        for _, imported in imports(source, modules)
        if _inside(imported, "agent") and not _inside(imported, "agent.shared")
    }
    assert allowed == used, "docs/architecture.md lists what the server does not import, or misses what it does"


def test_the_check_sees_each_kind_of_crossing() -> None:
    modules = {
        "agent.shared": "",
        "agent.shared.wire": "import json\nfrom agent.shared import errors\n",
        "agent.shared.errors": "def f():\n    from agent.host.paths import Paths\n",
        "agent.shared.cli": "import psutil\n",
        "agent.lifecycle.install": "from server.errors import X\n",
        "agent.host.paths": "",
        "agent.lifecycle.bundles": "",
        "server": "",
        "server.errors": "",
        "server.api.app": (
            "from agent.lifecycle import bundles\n"
            "from agent.lifecycle.install import install\n"
            "from agent.shared import cli\n"
        ),
        "server.process.vm": "def f():\n    from scripts.vmlab import Lab\n",
    }
    found = {(v.module, v.imported) for v in violations(modules, {"agent.lifecycle.bundles"})}
    assert found == {
        ("agent.shared.errors", "agent.host.paths"),
        ("agent.shared.cli", "psutil"),
        ("agent.lifecycle.install", "server.errors"),
        ("server.api.app", "agent.lifecycle.install"),
        ("server.process.vm", "scripts.vmlab"),
    }


# Every state file has one owner: its typed load and save live next to its dataclass, and nobody else opens it.
STATE_OWNERS = {
    "agent_config": "agent.lifecycle.installed",  # /etc/mobility/agent.json
    "last_job": "agent.lifecycle.lastjob",  # /var/lib/mobility/last-job.json
    "freeze_state": "agent.lifecycle.freeze",  # /var/lib/mobility/freeze.json
    "daemon_status": "agent.daemon.status",  # /var/lib/mobility/daemon.json
    "identity": "agent.lifecycle.identity",  # /var/lib/mobility/identity.json
    "pending_enrolment": "agent.lifecycle.identity",  # /var/lib/mobility/pending-enrolment.json
    "update_record": "agent.update.state",  # /var/lib/mobility/update.json
    "update_target": "agent.update.state",  # /var/lib/mobility/target.json
    "upgrade_marker": "agent.update.state",  # /var/lib/mobility/upgrade.from
    "daemon_output": "agent.update.daemonctl",  # /var/log/mobility/daemon.out
    "replication_dir": "agent.replication.state",  # /var/lib/mobility/replication/
    "freeze_record": "agent.replication.frozen",  # /run/mobility/frozen.json
    "failover_record": "agent.lifecycle.failover",  # /var/lib/mobility/failover.json
}


def test_each_state_file_is_opened_by_its_owner_only() -> None:
    found = []
    for module, source in _modules().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in STATE_OWNERS and STATE_OWNERS[node.attr] != module:
                if isinstance(node.value, ast.Name) and node.value.id == "self" and module == "agent.host.paths":
                    continue
                found.append(f"{module}:{node.lineno} uses .{node.attr}, owned by {STATE_OWNERS[node.attr]}")
    assert not found, "\n".join(found)


def test_the_default_install_directory_is_spelled_once() -> None:
    found = [
        module
        for module, source in _modules().items()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and node.value == "/usr/local/mobility"
    ]
    assert found == ["agent.lifecycle.install_dir"], found


# The layers of docs/architecture.md ("Packages"): what each package of the product never imports, by dotted
# prefix. A package depends on those below it; the programs (the CLIs, the daemon's loop) sit on top, and nothing
# below imports them back.
NEVER_IMPORTS: dict[str, tuple[str, ...]] = {
    # the host is the bottom layer: from the rest of the agent it uses only the errors and the fault points
    "agent.host": (
        "agent.lifecycle",
        "agent.daemon",
        "agent.update",
        "agent.replication",
        "agent.recovery",
        "agent.cli",
    ),
    "agent.lifecycle": ("agent.daemon", "agent.cli"),
    "agent.recovery": ("agent.daemon", "agent.update", "agent.replication", "agent.cli"),
    "agent.replication": ("agent.lifecycle", "agent.daemon.loop", "agent.cli"),
    # self-update is started by the bootstrapper, the daemon and the CLI and never imports them (the bootstrapper
    # and the updater once imported each other)
    "agent.update": ("agent.lifecycle.bootstrap", "agent.daemon.loop", "agent.cli"),
    "agent.daemon": ("agent.cli",),
    # the database is the server's bottom layer: it knows its tables, not who calls it
    "server.database": ("server.api", "server.releases", "server.process", "server.push", "server.ui", "server.cli"),
    "server.releases": ("server.api", "server.process", "server.push", "server.ui", "server.cli"),
    # the process server takes only the listeners' edge and TLS from the API package; the API and the dashboard read
    # the store, the store imports neither
    "server.process": (
        *("server.api.app", "server.api.enrolment", "server.api.nonces", "server.api.pki", "server.api.metrics"),
        *("server.releases", "server.push", "server.ui", "server.cli"),
    ),
    "server.push": ("server.api.app", "server.process", "server.ui", "server.cli"),
    "server.ui": ("server.api.app", "server.push", "server.cli"),
    "server.api": ("server.push", "server.cli"),
}
# What stays at the top of agent/: the program's command line and what every package uses (errors, fault points).
AGENT_TOP_LEVEL = {"agent", "agent.__main__", "agent.cli", "agent.errors", "agent.faults"}
# And of server/: the command line, what its command modules share, the errors, the data directory and progress.
SERVER_TOP_LEVEL = {
    *("server", "server.__main__", "server.cli", "server.commandline", "server.errors", "server.datadir"),
    "server.progress",
}


def layer_violations(modules: dict[str, str], never: dict[str, tuple[str, ...]]) -> list[str]:
    """Where a module of a package imports what its layer never does (pure)."""
    return [
        f"{module}:{line} imports {imported}"
        for module, source in modules.items()
        for package, forbidden in never.items()
        if _inside(module, package)
        for line, imported in imports(source, modules)
        if any(_inside(imported, f) for f in forbidden)
    ]


def test_each_package_imports_only_its_layers() -> None:
    found = layer_violations(_modules(), NEVER_IMPORTS)
    assert not found, "\n".join(found)


def test_agent_and_server_are_packages_by_capability() -> None:
    """A module lives in the package of its capability (docs/architecture.md names them): only each program's
    command line and what every package uses stay at the top of agent/ and server/."""
    modules = _modules()
    top = AGENT_TOP_LEVEL | SERVER_TOP_LEVEL
    loose = [
        m for m in modules if m.count(".") == 1 and m not in top and not any(k.startswith(m + ".") for k in modules)
    ]
    assert not loose, loose


def test_the_layer_check_sees_an_import_upwards() -> None:
    modules = {
        "agent.host.paths": "from agent.lifecycle.installed import load\n",  # the bottom imports a layer above
        "agent.lifecycle.installed": "from agent.host.paths import Paths\n",  # downwards: fine
        "agent.update.gate": "def f():\n    from agent.daemon.loop import Daemon\n",  # lazily, its starter
        "agent.daemon.loop": "from agent.update import gate\n",
    }
    assert layer_violations(modules, NEVER_IMPORTS) == [
        "agent.host.paths:1 imports agent.lifecycle.installed",
        "agent.update.gate:2 imports agent.daemon.loop",
    ]


def sql_outside_the_database(modules: dict[str, str]) -> list[str]:
    """Where a module of the server outside server/database/ imports SQLAlchemy: runs statements of its own
    around the data-access layer (pure)."""
    return [
        f"{module}:{line} imports {imported}"
        for module, source in modules.items()
        if _inside(module, "server") and not _inside(module, "server.database")
        for line, imported in imports(source, modules)
        if _inside(imported, "sqlalchemy")
    ]


def test_only_the_database_package_runs_sql() -> None:
    """Every query of the server has its one home in server/database/ (the rollouts once ran two dozen statements
    of their own on the data-access layer's connection)."""
    found = sql_outside_the_database(_modules())
    assert not found, "\n".join(found)


def test_the_sql_check_sees_a_statement_outside_the_database() -> None:
    modules = {
        "server.database.jobs": "from sqlalchemy import select\n",  # the database's own: fine
        "server.releases.rollouts": "def f():\n    from sqlalchemy import update\n",
        "server.ui.views": "import sqlalchemy.exc\n",
        "agent.x": "",
    }
    assert sql_outside_the_database(modules) == [
        "server.releases.rollouts:2 imports sqlalchemy",
        "server.ui.views:1 imports sqlalchemy.exc",
    ]


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """Which modules each module imports (pure): every import, lazy and type-only ones included, resolved to the
    module it names (``from agent.shared.wire import WireError`` is an edge to agent.shared.wire)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, source in modules.items():
        for _, imported in imports(source, modules):
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            target = ".".join(parts)
            if target and target != module:
                graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one module (Tarjan's
    algorithm, iterative), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def test_no_import_circles() -> None:
    """No two modules of the product import each other, directly or around a longer circle, not even lazily inside
    a function or for types only: what two modules both need goes into a module below both."""
    modules = _modules()
    graph = import_graph(modules)
    found = [
        " <-> ".join(c) + ": " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
        for c in circles(graph)
    ]
    assert not found, "\n".join(found)


def test_the_circle_check_sees_circles_of_every_kind() -> None:
    modules = {
        "agent": "",
        "agent.a": "from agent.b import x\n",  # a two-module circle, one side lazy
        "agent.b": "def f():\n    from agent.a import y\n",
        "agent.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from agent.e import Z\n",
        "agent.d": "import agent.c\n",  # a three-module circle through a type-only import
        "agent.e": "from agent import d\n",
        "agent.f": "from agent.a import x\nimport agent.f\n",  # imports a circle and itself: in none
        "server": "",
        "server.g": "from agent.a import x\n",
    }
    assert circles(import_graph(modules)) == [["agent.a", "agent.b"], ["agent.c", "agent.d", "agent.e"]]


# Private names of other libraries that are their public API, or that the product must reach (each says why). An
# attribute reached through an object whose type the check cannot know is taken for the product's unless it is here.
THIRD_PARTY_PRIVATES = {
    "_mapping": "SQLAlchemy: a Row as a mapping (its documented API)",
    "_getframe": "sys",
    "_exit": "os: a forked child ends without running the parent's cleanup",
    "_replace": "namedtuple's API",
    "_asdict": "namedtuple's API",
    "_fields": "namedtuple's API",
    "_make": "namedtuple's API",
    "_field_defaults": "namedtuple's API",
}
# (module, attribute): a library's private name one module must reach, with why.
THIRD_PARTY_REACH_INS = {
    # aiohttp's web.Server keeps the runner's handler settings (access log, keep-alive) only there, and GuardedSite
    # makes its own handlers with them.
    ("server.api.edge", "_kwargs"),
}


def _private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def _own_names(tree: ast.AST) -> set[str]:
    """The names a module defines: its functions, classes, variables, arguments and attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def reach_ins(modules: dict[str, str]) -> list[str]:
    """Where a module uses a private name (``_x``, not a dunder) of another module of the product (pure): imported
    (``from server.cli import _data``), through a module or a class it imported (``store_module._fsync_dir``,
    ``ChunkStore._insert_point_disk``), or through an object that is not its own ``self`` or ``cls``: an attribute's
    (``self.store._transaction()``) always, a variable's (``other._open_pack``) unless this module defines that name
    (another instance of its own class). Libraries' privates are allowed only as THIRD_PARTY_PRIVATES and
    THIRD_PARTY_REACH_INS say."""
    found = []
    for module, source in modules.items():
        tree = ast.parse(source)
        own = _own_names(tree)
        bound: dict[str, str] = {}  # local name -> the product module it came from
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in modules:  # a module (packages without an __init__ included)
                        bound[alias.asname or alias.name] = sub
                    elif node.module in modules:
                        private = alias.name.startswith("_") and not alias.name.startswith("__")
                        if private and node.module != module:
                            found.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
                        bound[alias.asname or alias.name] = node.module
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and bound.get(node.value.id, module) != module
            ):
                found.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr} of {bound[node.value.id]}")
            elif (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and node.attr not in THIRD_PARTY_PRIVATES
                and (module, node.attr) not in THIRD_PARTY_REACH_INS
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and not (isinstance(node.value, ast.Name) and node.value.id in bound)  # the rule above
                and not (isinstance(node.value, ast.Name) and node.attr in own)
            ):
                found.append(f"{module}:{node.lineno} uses {ast.unparse(node)} of another object")
    return found


def test_no_module_reaches_into_another_modules_private_names() -> None:
    """What another module needs is public (the garbage collector once called the store's _fsync_dir and repair
    its _insert_point_disk): a private name may change with its module alone."""
    found = reach_ins(_modules())
    assert not found, "\n".join(found)


def test_the_reach_in_check_sees_each_way_in() -> None:
    modules = {
        "server.a": "def _f(): ...\nclass A:\n    def _g(self): ...\n",
        "server.b": "from server.a import _f\n",
        "server.c": "from server import a as a_module\na_module._f()\n",
        "server.d": "from server.a import A\nA._g(None)\nA.__name__\n",
        "server.e": "from server.a import A\nclass B:\n    def _h(self): self._h()\n",  # its own: fine
        "server.f": "class F:\n    def g(self): return self.store._transaction()\n",
        "server.g": "def gc(other): return other._open_pack(1)\n",
        "server.h": "class H:\n    def _k(self): ...\n    def __eq__(self, other): return other._k()\n",  # its own
        "server.i": "import os, sys\nsys._getframe(0)\nos._exit(1)\nfor r in rows: r._mapping\np = p._replace(a=1)\n",
        "server.j": "class J:\n    _k = 1\n    def m(self): return self.store._k\n",  # an attribute's: never
        "server": "",
    }
    assert reach_ins(modules) == [
        "server.b:1 imports server.a._f",
        "server.c:2 uses a_module._f of server.a",
        "server.d:2 uses A._g of server.a",
        "server.f:2 uses self.store._transaction of another object",
        "server.g:1 uses other._open_pack of another object",
        "server.j:3 uses self.store._k of another object",
    ]


# Module names a package may repeat, because each names that package's own part of the same role. Any other name
# says what its module does, once: the agent's checks.py, local.py and transport.py were three pairs of different
# things under one name each (now check_report, prereq/prerequisites, health/self_checks, recovery/runner;
# status_commands, replication/local_commands; api_client, replication/stream).
REPEATED_NAMES = {
    "__init__",
    "__main__",
    "cli",  # each program's and each command package's command line (agent/shared/cli.py: what they share)
    "errors",  # the agent's, the server's, and agent/shared/'s root
    "failover",  # the agent's record of being a failover; the process server's images
    "fetch",  # the bootstrapper's bundle fetch; self-update's
    "metrics",  # the daemon's own figures; the server's /metrics
    "progress",  # a command's progress lines; push's per-host progress
    "state",  # replication's state directory; self-update's records
}


def test_module_names_say_what_they_are() -> None:
    names: dict[str, list[str]] = {}
    for module in _modules():
        names.setdefault(module.split(".")[-1], []).append(module)
    for package in [m for m in _modules() if any(k.startswith(m + ".") for k in _modules())]:
        names[package.split(".")[-1]].remove(package)  # a package's own __init__ is not a second module of the name
    repeated = {name: found for name, found in names.items() if len(found) > 1 and name not in REPEATED_NAMES}
    assert not repeated, repeated
