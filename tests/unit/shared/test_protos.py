"""The committed stubs in shared/v1 are exactly what `make proto` generates from protos/."""

import re
from pathlib import Path

from cadence.app import protogen


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = {path.name: path.read_bytes() for path in protogen.generate(tmp_path)}
    committed = {path.name: path.read_bytes() for path in protogen.STUB_DIR.glob("*_pb2*")}
    assert sorted(fresh) == sorted(committed), "stub files differ: run `make proto` and commit shared/v1"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit shared/v1"


def test_every_rpc_has_a_comment() -> None:
    for proto in (protogen.PROTO_ROOT / "cadence" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for index, line in enumerate(lines):
            if re.match(r"\s*rpc ", line):
                assert lines[index - 1].strip().startswith("//"), f"{proto.name}: {line.strip()} has no comment"
