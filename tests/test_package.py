import subprocess
import sys


def test_import_is_light():
    """Importing the library, even the modules that use Ray, DeepSpeed or MLflow, imports none of them (nor
    TRL or matplotlib): they load inside the functions that need them (trait_guard/extras.py). That Ray and
    the rest need not even be installed is tests/test_extras.py's."""
    code = ("import sys, trait_guard, trait_guard.persona, trait_guard.activations, trait_guard.models, "
            "trait_guard.chat, trait_guard.cli, trait_guard.guard, trait_guard.integrations.torch_loop, "
            "trait_guard.screen, trait_guard.importer, trait_guard.signing, trait_guard.extras, trait_guard.train, "
            "trait_guard.tracking, trait_guard.generation, trait_guard.pipeline, trait_guard.report; "
            "heavy = [m for m in ('ray', 'deepspeed', 'mlflow', 'trl', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def _import_graph():
    """Module -> the trait_guard modules it imports anywhere in its text (top level or inside a function)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    modules = {}
    for path in (root / "trait_guard").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trait_guard"):
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert len(graph) > 30 and "trait_guard.guard" in graph["trait_guard.train"]  # the scan sees the imports
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path, target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
