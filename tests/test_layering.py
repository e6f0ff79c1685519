"""Import layering: services/common is imported by the services and imports none of them."""

import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "services" / "common"


def _service_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n.startswith("services.") and not n.startswith("services.common")}


def test_common_imports_no_service():
    found = {p.name: _service_imports(p) for p in COMMON.rglob("*.py")}
    assert not {name: mods for name, mods in found.items() if mods}
