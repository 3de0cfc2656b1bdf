"""Regenerate the Python code for proto/keybroker/v1 (the one command: `make proto`).

Generated modules land in src/keybroker/v1/ and are never edited by hand; the test suite runs this
script into a temporary directory and fails if the committed files drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto under proto/ into out_dir; return the generated files."""
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out_dir / "keybroker" / "v1"
    (package / "__init__.py").write_text(
        '"""Generated gRPC code: run `make proto`, never edit."""\n'
    )
    return sorted(package.iterdir())


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "src"
    for path in generate(target):
        print(path.relative_to(target))
