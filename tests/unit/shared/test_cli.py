"""The CLI answers instantly: argument parsing never imports torch, DeepSpeed, vLLM or a service."""

import subprocess
import sys
from pathlib import Path


def test_help_imports_nothing_heavy() -> None:
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cadence.app.cli import app\n"
        "for args in (['--help'], ['serve', '--help'], ['serve', 'broker', '--help'], ['seed-model', '--help']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'vllm', 'transformers', 'cadence.broker') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_console_script_runs() -> None:
    cadence = str(Path(sys.executable).parent / "cadence")
    result = subprocess.run([cadence, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in ("serve", "seed-model"):
        assert command in result.stdout
