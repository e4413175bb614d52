"""A bad ``bench`` command line is one clear line on stderr and exit status 2, whether the
benchmark is run as ``ultraedit-fast bench`` or ``python -m ultraedit_fast.bench``: asking
for CUDA on a machine without it says so (not a traceback or a failed int parse), and so
does every other usage error the benchmark finds after parsing its flags."""

import os
import subprocess
import sys

import pytest
import torch

from ultraedit_fast.bench import cli as bench_cli
from ultraedit_fast.cli import commands

BAD = {
    "cuda": (["--device", "cuda"], "CUDA is not available on this machine"),
    "cases": (["--device", "cpu", "--cases", "nonsense"], "--cases"),
    "tie": (["--device", "cpu", "--cases", "turn", "--tie-below-edited"], "memory alone"),
}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_clear_line(err: str, says: str):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert says in lines[0], err
    assert "Traceback" not in err and "invalid literal" not in err and "int()" not in err


@pytest.mark.parametrize("case", list(BAD))
def test_the_package_cli_reports_a_bench_usage_error(case, no_cuda, capsys):
    argv, says = BAD[case]
    rc = commands.main(["bench", *argv])
    assert rc == 2
    _one_clear_line(capsys.readouterr().err, says)


@pytest.mark.parametrize("case", list(BAD))
def test_bench_main_exits_with_status_2_and_says_why(case, no_cuda, capsys):
    argv, says = BAD[case]
    with pytest.raises(SystemExit) as e:
        bench_cli.main(argv)
    assert e.value.code == 2
    _one_clear_line(capsys.readouterr().err, says)


@pytest.mark.parametrize("module", ["ultraedit_fast", "ultraedit_fast.bench"])
def test_device_cuda_without_cuda_from_a_shell(module, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no CUDA device, whatever the machine
    pre = ["bench"] if module == "ultraedit_fast" else []
    out = subprocess.run(
        [sys.executable, "-m", module, *pre, "--device", "cuda", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    _one_clear_line(out.stderr, "CUDA is not available on this machine")
    assert not os.listdir(tmp_path)  # nothing was started
