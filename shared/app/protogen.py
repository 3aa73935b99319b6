"""Generate the gRPC/protobuf Python stubs (with mypy stubs) from `protos/` into `shared/v1/`.

Run with `make proto`. A test regenerates into a temporary folder and fails when the committed stubs
differ, so the contract and the code never drift apart.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
STUB_DIR = REPO / "shared" / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs of every `protos/cadence/v1/*.proto` into `out_dir`; return the files written."""
    from grpc_tools import protoc  # dev-only dependency

    # protoc finds its mypy plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "cadence" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}"]
        args += [f"--{kind}_out={tmp}" for kind in ("python", "grpc_python", "mypy", "mypy_grpc")]
        if protoc.main([*args, *protos]) != 0:
            raise RuntimeError("protoc failed; see its message above")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "cadence" / "v1").iterdir()):
            shutil.copyfile(src, out_dir / src.name)
            written.append(out_dir / src.name)
    return written


def main() -> None:
    for path in generate(STUB_DIR):
        print(path.relative_to(REPO))


if __name__ == "__main__":
    main()
