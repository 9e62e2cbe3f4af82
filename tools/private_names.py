"""An import-linter contract: no module imports an underscore name from another package of the project.

import-linter's own contracts see modules, not names; this one reads each module's `from X import _name`
statements (relative or absolute) and refuses those where X belongs to another package than the importer
(a package: a direct subpackage such as `sourcetrace.methods`, or a top-level module such as
`sourcetrace.scores`). A helper used by two packages is made public in the lower one.
"""

from __future__ import annotations

import ast
import importlib.util

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _owner(module: str) -> str:
    return ".".join(module.split(".")[:2])


class PrivateNamesContract(Contract):
    type_name = "private_names"
    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:  # type: ignore[no-untyped-def]
        found = []
        roots = list(self.containers)  # type: ignore[arg-type]
        for module in sorted(graph.modules):
            if not any(module == r or module.startswith(r + ".") for r in roots):
                continue
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
                continue
            package = module if spec.origin.endswith("__init__.py") else module.rpartition(".")[0]
            with open(spec.origin, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom):
                    continue
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                named = [node.module] if node.module else []
                target = (".".join(base + named) if node.level else node.module) or ""
                if not any(target == r or target.startswith(r + ".") for r in roots):
                    continue
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and _owner(target) != _owner(module):
                        found.append(f"{module}:{node.lineno} imports {alias.name} from {target}")
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["found"]:
            output.print_error(line)
