"""Generated gRPC code is exactly what `make proto` produces from proto/ (no drift, no hand edits)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """Regenerating into a temporary folder gives byte-identical files."""
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generated = module.generate(tmp_path)
    committed = ROOT / "src" / "keybroker" / "v1"
    names = sorted(p.name for p in generated if p.is_file())
    assert names == sorted(
        p.name for p in committed.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"}
    )
    for name in names:
        assert (tmp_path / "keybroker" / "v1" / name).read_bytes() == (
            committed / name
        ).read_bytes(), name
