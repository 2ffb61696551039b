"""The code base stays ruff-clean (rules in pyproject.toml)."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def llmbench_imports() -> dict[str, set[str]]:
    """Each llmbench module -> the llmbench modules it imports, at the top or inside functions
    ("from package import submodule" counts as the submodule only)."""
    import ast

    package = ROOT / "llmbench"

    def module_name(path) -> str:
        return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")

    def is_module(name: str) -> bool:
        path = ROOT / name.replace(".", "/")
        return path.with_suffix(".py").exists() or (path / "__init__.py").exists()

    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        if "build" in path.relative_to(package).parts:
            continue
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmbench"):
                subs = [f"{node.module}.{alias.name}" for alias in node.names]
                found.update(sub for sub in subs if is_module(sub))
                if not all(is_module(sub) for sub in subs):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names
                             if alias.name.startswith("llmbench"))
        graph[module_name(path)] = found - {module_name(path)}
    return graph


def test_no_import_cycles():
    """The library's modules import each other without cycles (function-level imports count)."""
    graph = llmbench_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_run_py_plans_its_steps_without_torch(tmp_path):
    """run.py checks the whole command line and plans its steps before any step starts; torch
    and transformers take seconds to import, and each step imports them itself, so the
    dispatcher must not (text, quantized, multimodal, --autotp and accuracy command lines)."""
    code = """
import sys
from llmbench.cli import run as dispatch
parser = dispatch.build_parser()
for argv in (["--benchmark", "--backend", "native"],
             ["--benchmark", "--ipex-weight-only-quantization", "--weight-dtype", "INT4"],
             ["--benchmark", "--ipex-smooth-quant", "--accuracy-only"],
             ["--benchmark", "--autotp", "--ipex-weight-only-quantization"],
             ["--benchmark", "--input-mode", "1", "-m", sys.argv[1]],
             ["--accuracy-only", "--tasks", "lambada_openai"]):
    try:
        dispatch.plan_steps(parser, parser.parse_args(argv))
    except Exception as exc:  # a refusal is fine here: what it imported is the point
        print("refused:", argv, exc, file=sys.stderr)
heavy = sorted(m for m in ("torch", "transformers", "deepspeed") if m in sys.modules)
print(",".join(heavy))
"""
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')  # what run.py reads
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", (result.stdout, result.stderr)


def test_only_the_cli_package_reads_the_command_line():
    """argparse is imported, and a parsed namespace (`args.x`) read, only in llmbench.cli: the
    flags' definitions, Settings built from them with the cross-flag checks, run.py's planner
    and each program's or tool's own main. Everything else takes llmbench.settings.Settings
    (or plain values)."""
    import ast

    readers = set()
    for path in (ROOT / "llmbench").rglob("*.py"):
        if "build" in path.relative_to(ROOT / "llmbench").parts:
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module == "llmbench.cli" or module.startswith("llmbench.cli."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names)
                    or isinstance(node, ast.ImportFrom) and node.module == "argparse"):
                readers.add(f"{module} imports argparse")
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "args"):
                readers.add(f"{module}:{node.lineno} reads args.{node.attr}")
    assert not readers, sorted(readers)
