"""The wheel (what the images install) contains every module, and each one imports from it."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_wheel_contains_and_imports_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("cadence-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith("cadence/") and n.endswith(".py")]
        archive.extractall(tmp_path / "site")
    sources = {
        Path("shared"): "cadence",
        Path("services/inference"): "cadence/inference",
        Path("services/reward"): "cadence/reward",
        Path("services/trainer"): "cadence/trainer",
        Path("services/broker"): "cadence/broker",
    }
    for src, dest in sources.items():
        for path in (REPO / src).rglob("*.py"):
            rel = path.relative_to(REPO / src)
            if rel.parts[0] in {"inference", "reward", "trainer", "broker"} and src == Path("shared"):
                continue
            assert f"{dest}/{rel.as_posix()}" in names, f"{src / rel} is missing from the wheel: list its package"
    modules = sorted(n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in names)
    script = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
        f"for m in {modules!r}:\n"
        "    mod = importlib.import_module(m)\n"
        f"    assert mod.__file__.startswith({str(tmp_path / 'site')!r}), (m, mod.__file__)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
