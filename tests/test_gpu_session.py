"""benchmarks/gpu_session.sh, rehearsed on the CPU: GPU time comes in one call of a few minutes, so a
step that dies of a misspelt option, or a pytest ``-k`` that selects nothing, loses it.

The script runs with stand-ins for ``python3`` and ``nvidia-smi`` that only record what they were
asked to do; then every recorded Python command is checked here: a benchmark's or trainer's
arguments against its own argument parser (in this process, stopped right after parsing), and
every pytest call's files and ``-k`` by collecting what it would run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scripts_support import Refused, command_main, parse_only

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

_RECORDER = """#!/bin/sh
exec "{python}" - "$@" <<'EOF'
import json, os, sys
keep = ("LIDAR_COMPLETION_TRITON_TUNE", "LIDAR_COMPLETION_TRITON_MAPS", "LIDAR_COMPLETION_TRITON_LOOP",
        "LIDAR_COMPLETION_TRITON_CACHE")
with open(os.environ["GPU_SESSION_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keep}}}}) + "\\n")
EOF
"""


def _rehearse(tmp_path: Path, **env) -> tuple[list[dict], str]:
    """Run the session script with recording stand-ins; (the recorded python3 calls, its output)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    python3 = bin_dir / "python3"
    python3.write_text(_RECORDER.format(python=sys.executable))
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    for f in (python3, smi):
        f.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    run_env = {k: v for k, v in os.environ.items() if k not in ("ONLY", "BUDGET", "TESTS_K", "OUT")}
    run_env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", GPU_SESSION_RECORD=str(record),
                   OUT=str(tmp_path / "out"), **env)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=run_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return calls, proc.stdout


def _steps_run(calls: list[dict]) -> list[dict]:
    """The recorded calls that are session steps: not the version print (``-c``) nor the install of
    wheels from ``.whl/`` (``-m pip``)."""
    return [c for c in calls if c["argv"][:1] != ["-c"] and c["argv"][:2] != ["-m", "pip"]]


def _collected(selections: list[list[str]]) -> list[int]:
    """How many tests each ``pytest args`` of ``selections`` would run (collection only, all in one
    fresh process: the test modules import torch and Triton once)."""
    code = ("import json, sys, pytest\n"
            "class C:\n"
            "    def pytest_collection_finish(self, session):\n"
            "        C.n = len(session.items)\n"
            "out = []\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    C.n = -1\n"
            "    rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider'] + args, plugins=[C()])\n"
            "    out.append((C.n, int(rc)))\n"
            "print('COLLECTED', json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(selections)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    last = [line for line in proc.stdout.splitlines() if line.startswith("COLLECTED ")]
    assert last, proc.stdout[-2000:] + proc.stderr[-2000:]
    counts = json.loads(last[-1][len("COLLECTED "):])
    # exit 5: nothing collected (the caller's assertion names the selection); anything else is an error
    assert all(rc in (0, 5) for _, rc in counts), proc.stdout[-3000:]
    return [n for n, _ in counts]


def _pytest_args(argv: list[str]) -> list[str]:
    """The files and selection of a recorded ``python3 -m pytest ...`` call (without the options
    that only matter when tests run)."""
    args, rest = [], list(argv[2:])
    while rest:
        a = rest.pop(0)
        if a == "--timeout":          # pytest-timeout's option and its value
            rest.pop(0)
        elif a not in ("-q", "-rf") and not a.startswith("--timeout="):
            args.append(a)
    return args


def test_the_session_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_step_of_the_gpu_session_parses_and_selects_tests(tmp_path):
    calls, out = _rehearse(tmp_path)
    steps = [line for line in out.splitlines() if line.startswith("=== [") and " step " in line]
    assert len(steps) >= 10 and "=== session done" in out, out
    assert "skipped" not in out, out               # the stand-ins take no time: every step runs
    commands = _steps_run(calls)
    assert len(commands) == len(steps), (len(commands), len(steps))
    selections = []
    for call in commands:
        argv = call["argv"]
        assert call["env"]["LIDAR_COMPLETION_TRITON_CACHE"], "the tuned tiles must come back with the logs"
        if argv[:2] == ["-m", "pytest"]:
            args = _pytest_args(argv)
            files = [a for a in args if a.endswith(".py")]
            assert files and all((ROOT / f).is_file() for f in files), argv
            selections.append(args)
            continue
        try:
            main, rest = command_main(argv)
            ns = parse_only(main, rest)
        except Refused as exc:
            pytest.fail(f"step {argv}: {exc}")
        if "--device" in rest:
            assert ns.device == "cuda", argv
    assert len(selections) >= 2
    for args, n in zip(selections, _collected(selections)):
        assert n > 0, f"pytest would run nothing: {args}"


def test_only_and_budget_choose_the_steps(tmp_path):
    calls, out = _rehearse(tmp_path, ONLY="1 5")
    ran = [c["argv"] for c in _steps_run(calls)]
    assert len(ran) == 2 and ran[0][0] == "benchmarks/backends.py" and ran[1][:2] == ["-m", "pytest"], ran
    calls, out = _rehearse(tmp_path / "short", BUDGET="10")
    assert _steps_run(calls) == [] and "skipped: out of budget" in out


PREPARE = ROOT / "benchmarks" / "gpu_prepare.sh"


def test_the_preparation_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(PREPARE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_preparation_fetches_fpsample_as_setup_requires_it_for_the_gpu_hosts_python(tmp_path):
    """With REHEARSE=0 the script only downloads wheels: for the GPU host's Python (3.12), binary
    only, the fpsample requirement of setup.py (not a copy of it that could drift), into WHEELS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(_RECORDER.format(python=sys.executable))
    python3.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    wheels = tmp_path / "wheels"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GPU_SESSION_RECORD=str(record),
               REHEARSE="0", WHEELS=str(wheels), PYTHON_SYS="python3")
    env.pop("GPU_PY", None)
    proc = subprocess.run(["bash", str(PREPARE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line)["argv"] for line in record.read_text().splitlines()]
    assert len(calls) == 1, calls                    # the download, and no venv without REHEARSE
    argv = calls[0]
    assert argv[:3] == ["-m", "pip", "download"]
    setup = (ROOT / "lidar_completion_pkg" / "setup.py").read_text()
    required = [s for s in setup.split('"') if s.startswith("fpsample")]
    assert len(required) == 1 and argv[-1] == required[0]
    assert argv[argv.index("--python-version") + 1] == "3.12"
    assert "--only-binary=:all:" in argv and "--no-deps" in argv
    assert argv[argv.index("-d") + 1] == str(wheels) and wheels.is_dir()
