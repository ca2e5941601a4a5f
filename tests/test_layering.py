"""The structure: layers that only point down, and per-vocabulary caches that go with their vocabulary."""

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import steer
from steer.constraints.canonical import Canonical
from steer.constraints.target import base_mask, ending_tokens, healed_view
from steer.constraints.tokens import TokenTable
from steer.context import LMContext

ROOT = Path(__file__).resolve().parent.parent


def test_imports_point_down_and_form_no_cycle():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 problems" in out.stdout


def test_the_import_check_reports_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import import_graph
    finally:
        sys.path.pop(0)
    package = tmp_path / "steer"
    (package / "lm").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "lm" / "__init__.py").write_text("")
    (package / "lm" / "base.py").write_text("def f():\n    from ..distributions import x\n")
    (package / "distributions.py").write_text("from .lm.base import f\nx = 1\n")
    monkeypatch.setattr(import_graph, "ROOT", tmp_path)
    monkeypatch.setattr(import_graph, "PACKAGES", ("steer",))
    found = import_graph.problems(import_graph.imports(import_graph.modules()), import_graph.modules())
    assert any("steer/lm/base.py:2" in p and "higher layer" in p for p in found), found
    assert any(p.startswith("import cycle:") and "steer.lm.base" in p for p in found), found


def test_a_vocabulary_and_its_views_are_freed():
    """Token tables, canonical pairs, healed views, ending tokens, base masks and the engine's
    tokenizer are all cached per vocabulary: dropping the model frees every one of them."""

    def use_once() -> tuple[weakref.ref, weakref.ref]:
        lm = steer.tiny_model("ab ", seed=1, merges=[("a", "b")])
        ctx = LMContext(lm, "ab a", end="\n")  # healing pending, an end string
        view = healed_view(ctx)
        ending_tokens(ctx)
        base_mask(ctx)
        Canonical.of(lm.vocab)
        TokenTable.of(lm.vocab)
        mask = steer.patterns.regex("(ab| )+").allowed_in(ctx)
        assert mask.any()
        return weakref.ref(lm.vocab), weakref.ref(view.lm.vocab)

    vocab, view = use_once()
    gc.collect()
    assert vocab() is None, "a vocabulary outlived its model"
    assert view() is None, "a view of a vocabulary outlived it"
