"""The layout's import direction (pyproject.toml `[tool.importlinter]`, docs/design.md
"Layout"): the CLI composes; the web console builds on the admin side; the delivery side
(`worker`) and the operators' side (`outbox.admin`) never import each other; both build on
the store and the pure decision core, which does no I/O."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_every_layering_contract_is_kept(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=str(tmp_path)) == 0
