"""Attention and training past one device: 8 virtual CPU devices in a process of their
own (tests/parallel/checks.py), and two processes talking over the loopback interface."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent.parent


def run(*args, env=None, timeout=300):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


# Three processes, each starting JAX once: the layouts (the most programs to compile) alone.
@pytest.mark.parametrize("checks", ["ring ring_logits zigzag", "sharded_step checkpoint", "layouts"])
def test_on_eight_virtual_devices(checks):
    output = run("-m", "tests.parallel.checks", *checks.split())
    for check in checks.split():
        assert f"{check}: ok" in output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(output: str) -> list[float]:
    line = next(line for line in output.splitlines() if line.startswith("Train loss (bits/byte) by step:"))
    return [float(x) for x in re.findall(r"\d+: ([\d.]+)", line)]


@pytest.mark.multiprocess
def test_two_processes_train_like_one_process_with_all_devices(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The next day is bright and the sky is clear; the night is short. " * 40)
    common = ["-m", "jaxattn.cli", "train", "--data", str(text), "--mesh", "data=2,model=2,seq=2", "--layers", "2",
              "--width", "32", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--log-every", "1",
              "--eval-every", "1000", "--checkpoint-every", "1000"]
    one = losses(run(*common, "--out", str(tmp_path / "one"), "--cpu-devices", "8"))
    port = free_port()
    four = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    processes = [
        subprocess.Popen([sys.executable, *common, "--out", str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}",
                          "--num-processes", "2", "--process-id", str(i)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, **four})
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, f"{out[-3000:]}\n{err[-6000:]}"
    two = losses(outputs[0][0])  # process 0 reports
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-6)
    assert "Mesh: {'data': 2, 'model': 2, 'seq': 2} over 8 devices of 2 process(es)" in outputs[0][0]
