"""Every sampling setting is declared once, on `SamplingParams` (runner/engine/types.py): the per-row
overrides, the spec's `sampling:` section and the step's tensors derive from it. This test reads the
source and fails where a list of its field names is written out again, outside types.py and the
sampler (which names the step's per-row tensors)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from runner.engine.types import SamplingParams

REPO = Path(__file__).resolve().parents[1]
FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
ALLOWED = {"runner/engine/types.py", "runner/engine/sample/sampler.py"}
# names that are someone else's, not a copy of ours: transformers' GenerationConfig arguments (the
# fallback backend), and OpenAI's documented ranges of its Batch API's body fields (their names, their
# limits: the accepted bounds are derived from them and SamplingParams, runner/openai/batch.py)
THEIRS = {("runner/hf_backend.py", "GenerationConfig"), ("runner/openai/batch.py", "OPENAI_NUMBERS")}
AT_MOST = 3  # a few names together are a use; more are a list


def _listed(node: ast.AST) -> tuple[str, set[str]]:
    """(what the node is called, the sampling field names it lists)."""
    if isinstance(node, (ast.Set, ast.List, ast.Tuple)):
        return "", {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in FIELDS}
    if isinstance(node, ast.Dict):
        return "", {k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in FIELDS}
    if isinstance(node, ast.Call):
        called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        return called, {k.arg for k in node.keywords if k.arg in FIELDS}
    if isinstance(node, ast.ClassDef):
        names = {
            s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        }
        return node.name, names & FIELDS
    return "", set()


def lists_of_sampling_fields(source: str, path: str) -> list[str]:
    tree = ast.parse(source)
    theirs = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and node.value is not None
        and any(
            isinstance(t, ast.Name) and (path, t.id) in THEIRS
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
        for inner in ast.walk(node.value)
    }
    found = []
    for node in ast.walk(tree):
        name, names = _listed(node)
        if len(names) > AT_MOST and (path, name) not in THEIRS and id(node) not in theirs:
            found.append(f"{path}:{node.lineno}: {sorted(names)}")
    return found


def test_no_list_of_the_sampling_fields_outside_types_and_the_sampler():
    found = [
        hit
        for top in ("jobs", "runner")
        for p in sorted((REPO / top).rglob("*.py"))
        if (path := str(p.relative_to(REPO))) not in ALLOWED
        for hit in lists_of_sampling_fields(p.read_text(), path)
    ]
    assert not found, "sampling fields listed again (derive them from SamplingParams):\n" + "\n".join(found)


def test_the_check_sees_a_list():
    source = (
        'KEYS = {"temperature", "top_p", "top_k", "min_p"}\nreplace(p, temperature=1, top_p=1, top_k=1, n=2)'
    )
    assert len(lists_of_sampling_fields(source, "x.py")) == 2
    assert lists_of_sampling_fields('KEYS = {"temperature", "top_p"}', "x.py") == []
