"""`python -m phi3`: the generate and chat commands."""

import subprocess
import sys


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "phi3", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_help():
    r = run("--help")
    assert r.returncode == 0
    assert "generate" in r.stdout and "chat" in r.stdout
    r = run("generate", "--help")
    assert r.returncode == 0 and "--max-tokens" in r.stdout


def test_generate_with_demo_model():
    r = run("generate", "-n", "8", "--stats", "Hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "generated" in r.stderr


def test_chat_reads_lines():
    r = run("chat", "-n", "4", stdin="Hello\n/reset\nAgain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) >= 2


def test_errors_exit_nonzero():
    r = run("generate", "--model", "/nonexistent/model", "Hi")
    assert r.returncode == 1 and "error:" in r.stderr
    r = run("generate", "--device", "tpu", "Hi")
    assert r.returncode == 1 and "tpu" in r.stderr
