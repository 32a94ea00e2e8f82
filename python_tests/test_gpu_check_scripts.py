"""The GPU check's scripts (scripts/gpu_check.sh, gpu_sanitize.py, gpu_e2e.py) run only on a lent GPU machine; here
their CPU paths run, so that they keep working between GPU runs (and check the CPU kernels and models once more)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import etc_ext

ROOT = Path(__file__).resolve().parent.parent


def _run(args, timeout=600):
    package_parent = str(Path(etc_ext.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_gpu_check_script_is_valid_bash():
    out = _run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")])
    assert out.returncode == 0, out.stderr


def test_sanitizer_driver_passes_on_the_cpu():
    out = _run([sys.executable, str(ROOT / "scripts" / "gpu_sanitize.py"), "cpu"])
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "all ok"
    checked = [line for line in lines if line.startswith("ok ")]
    assert len(checked) >= 30 and not any(line.startswith("FAIL") for line in lines)


def test_end_to_end_script_on_the_cpu(tmp_path):
    """Both "devices" are the CPU here: every answer must agree, and the short training run must finish its steps."""
    report = tmp_path / "e2e.json"
    out = _run([sys.executable, str(ROOT / "scripts" / "gpu_e2e.py"), "--device", "cpu", "--questions", "8",
                "--train-steps", "2", "--out", str(report)])  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads(report.read_text())
    assert set(results["rows"]) == {"full", "etc-m1-vid", "etc-m16-vid", "fastv-k4"}
    assert all(row["agree"] == 1.0 for row in results["rows"].values())
    assert results["train"]["global_step"] == 2
