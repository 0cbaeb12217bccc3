"""The package's shape, checked from its own imports (docs/architecture.md draws it).

Each room (a top-level module or package of dropbox_runner) has a layer; an import may only go to a
room of a lower layer or to its own room, and no module imports one that imports it back, however
indirectly. Function-level imports count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dropbox_runner"
IMPORT = re.compile(
    r"^\s*(?:from (dropbox_runner[\w.]*) import ([\w, ()]+)|import (dropbox_runner[\w.]*))", re.M
)

# lowest first: a room imports only rooms of lower layers
LAYERS = [
    {"errors", "fsutil", "plainyaml", "protocol"},
    {"layout", "lines"},
    {"config"},
    {"queue"},
    {"status"},
    {"results"},
    {"jobs"},
    {"engine"},
    {"slot"},
    {"intake"},
    {"daemon", "api"},
    {"cli"},
    {"__main__"},
]
LAYER = {room: n for n, rooms in enumerate(LAYERS) for room in rooms}
MAX_TOP_MODULES = 12


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The package's modules this module imports (`from pkg import mod` names the module)."""
    found = set()
    for m in IMPORT.finditer(MODULES[name].read_text()):
        target = m.group(1) or m.group(3)
        names = [n.split(" as ")[0].strip(" ()") for n in (m.group(2) or "").split(",")]
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        found.update(subs or [target])
    found.discard(name)
    return found


def room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_room_has_a_layer():
    rooms = {room(n) for n in MODULES} - {"__init__"}
    assert rooms - set(LAYER) == set(), (
        "a new room: give it a layer in LAYERS and a line in docs/architecture.md"
    )


def test_imports_only_go_down():
    upward = [
        f"{name} imports {target}"
        for name in MODULES
        for target in imports_of(name)
        if room(target) != "__init__"
        and room(name) != room(target)
        and LAYER[room(target)] >= LAYER[room(name)]
    ]
    assert upward == []


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: imports_of(name) for name in MODULES}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt in graph and not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name, [])
    assert cycles == []


def test_at_most_twelve_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_the_checks_see_real_imports():
    """The parser finds what is plainly there (so the checks above are not vacuous)."""
    assert "dropbox_runner.queue.journal" in imports_of("dropbox_runner.queue.scheduler") or any(
        room(t) == "queue" for n in MODULES if room(n) == "slot" for t in imports_of(n)
    )
    assert sum(len(imports_of(n)) for n in MODULES) > 150
