"""The contract's names are spelled once (issue 22.5): output names, precisions, backends and bundle file
names live in `madclip_runtime/contract.py`; product code imports them instead of writing the string again.

An AST walk over every string constant of madclip_runtime, madclip_train and madclip_export finds a literal
equal to one of those names. Docstrings are not code and are skipped; text that merely mentions a name (help,
messages) is never equal to it, so it is not matched. Argparse `choices` must come from the contract too
(they are string constants like any other). No file is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

from madclip_runtime import contract

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("madclip_runtime", "madclip_train", "madclip_export")
CONTRACT_FILE = "madclip_runtime/contract.py"


def contract_words() -> set[str]:
    """Every name the contract owns: outputs, precisions, backends, bundle file names."""
    words = set(contract.OUTPUT_NAMES) | set(contract.PRECISIONS) | set(contract.BACKENDS)
    words |= {contract.METADATA_FILE, contract.GOLDEN_FILE, contract.REPORT_FILE, contract.BF16}
    words |= set(contract.MODEL_FILES.values())
    for name in dir(contract):  # file-name tables added later (e.g. other model formats) count as well
        value = getattr(contract, name)
        if name.endswith("_MODEL_FILES") and isinstance(value, dict):
            words |= {v for v in value.values() if isinstance(v, str)}
    return words


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def literals(source: str, words: set[str], filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, value) of every string constant equal to a contract word, docstrings excluded."""
    tree = ast.parse(source, filename)
    docs = _docstrings(tree)
    return sorted(
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in words and id(n) not in docs
    )


def offenders() -> dict[str, list[tuple[int, str]]]:
    words = contract_words()
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == CONTRACT_FILE:
                continue
            hits = literals(path.read_text(), words, rel)
            if hits:
                found[rel] = hits
    return found


def test_no_contract_literals_outside_the_contract():
    bad = []
    for rel, hits in offenders().items():
        where = ", ".join(f"{line}: {value!r}" for line, value in hits)
        bad.append(
            f"{rel}: {len(hits)} literal(s) of contract names at {where}; "
            f"import the name from madclip_runtime.contract"
        )
    assert not bad, "\n".join(bad)


def test_the_walk_catches_what_it_claims():
    words = contract_words()
    src = (
        '"""Docstring naming score and model.onnx."""\n'
        "import argparse\n"
        "def f(out, p: argparse.ArgumentParser):\n"
        '    """score"""\n'
        '    p.add_argument("--precision", choices=["fp32", "fp16"], help="fp16 is half precision")\n'
        '    p.add_argument("--backend", default="ort-cpu")\n'
        '    name = "golden.npz"\n'
        '    return out["anomaly_map"], f"{out}score", "scores"\n'
    )
    hits = literals(src, words)
    # sorted by (line, value); the constant part of an f-string counts ("score" in f"{out}score")
    assert [v for _, v in hits] == ["fp16", "fp32", "ort-cpu", "golden.npz", "anomaly_map", "score"]
    assert all(line > 4 for line, _ in hits)  # the docstrings are skipped
    assert {
        "score",
        "anomaly_map",
        "score_map_max",
        "fp16",
        "int8",
        "ort-cpu",
        "model_fp16.onnx",
        "golden.npz",
        "metadata.json",
    } <= words
