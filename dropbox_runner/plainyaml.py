"""YAML limited to what JSON can say: no aliases, no tags beyond the core ones, bounded depth.

Manifests and models.yaml come from users; an alias bomb, a `!!binary` or `!!set` value, or a
document nested thousands deep is refused with a YAMLError instead of expanding or crashing.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 64
CORE_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"aliases (*{event.anchor}) are not accepted, at {event.start_mark}")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node.tag not in CORE_TAGS:
            raise yaml.YAMLError(f"the tag {node.tag} is not accepted, at {node.start_mark}")
        return node


# Dates stay strings, as they would in JSON.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load(text: str) -> Any:
    """The document as plain JSON values; raises yaml.YAMLError for anything else."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader, narrowed further
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
