"""The kernels' build as a user meets it: announced and timed once, a failure remembered and explained once per
process, a switch that turns the kernels off, and no fcntl needed. The compiler is replaced by a fake here."""

import logging
import os
import subprocess
import sys

import pytest

from decodekit import InvalidParameter
from decodekit.runtime import cpu


@pytest.fixture
def builds(monkeypatch, tmp_path):
    """Each ``available()`` decides afresh, in an empty extension cache, with a fake compiler that fails while
    ``builds.error`` is set; ``builds.count`` counts its runs."""

    class Builds:
        count, error = 0, None

    def build(directory):
        Builds.count += 1
        if Builds.error:
            raise Builds.error

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv(cpu.SWITCH, raising=False)
    monkeypatch.setattr(cpu, "cpu_supported", lambda: True)
    monkeypatch.setattr(cpu, "_build", build)
    return Builds


def new_process(monkeypatch, caplog) -> bool:
    """``available()`` as a new process sees it (the build cache stays); its warnings are in caplog."""
    monkeypatch.setattr(cpu, "_state", None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        return cpu.available()


def test_first_build_is_announced_and_timed_then_loads_silently(builds, monkeypatch, caplog):
    assert new_process(monkeypatch, caplog)
    first, done = caplog.messages
    assert first.startswith("compiling the CPU decode kernels, once")
    assert done.startswith("compiled the CPU decode kernels in ") and done.endswith(" s")
    assert new_process(monkeypatch, caplog) and caplog.messages == []
    assert builds.count == 2  # the fake build leaves no library to load directly: torch's load runs again


def test_a_failed_build_is_remembered_explained_once_and_retried_when_the_key_or_marker_changes(
    builds, monkeypatch, caplog, tmp_path
):
    builds.error = RuntimeError(
        "Error building extension 'decodekit_cpu': [1/4] c++ -c small_gemm.cpp\nFAILED: small_gemm.o\n"
        "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed."
    )
    assert not new_process(monkeypatch, caplog)
    assert caplog.messages[0].startswith("compiling")
    marker = next(tmp_path.rglob(cpu.FAILED))
    said = (
        "the CPU decode kernels are unavailable (RuntimeError: /bin/sh: 1: c++: not found); decoding takes the "
        f"PyTorch path. The build is not retried while {marker} exists: delete it to retry"
    )
    assert caplog.messages[1:] == [said]
    assert "ninja: build stopped" in marker.read_text()  # the whole error is kept for a closer look

    builds.error = None  # a compiler appears: still not retried until asked
    assert not new_process(monkeypatch, caplog)
    assert caplog.messages == [said] and builds.count == 1

    monkeypatch.setattr(cpu, "CFLAGS", [*cpu.CFLAGS, "-g"])  # other flags (sources, torch): another key, its own
    assert new_process(monkeypatch, caplog) and builds.count == 2  # directory, with no failure recorded
    assert cpu.build_directory() != marker.parent and marker.exists()
    marker = cpu.build_directory() / cpu.FAILED

    builds.error = RuntimeError("one line")
    assert not new_process(monkeypatch, caplog) and builds.count == 3
    marker.unlink()
    builds.error = None
    assert new_process(monkeypatch, caplog) and builds.count == 4


def test_the_switch_turns_the_kernels_off_without_building(builds, monkeypatch, caplog):
    monkeypatch.setenv(cpu.SWITCH, "0")
    assert not new_process(monkeypatch, caplog)
    assert caplog.messages == [] and builds.count == 0
    monkeypatch.setenv(cpu.SWITCH, "off")
    with pytest.raises(InvalidParameter, match=r"DECODEKIT_KERNELS must be 0 .* or 1, not 'off'"):
        new_process(monkeypatch, caplog)


def test_builds_without_fcntl(builds, monkeypatch, caplog):
    monkeypatch.setattr(cpu, "fcntl", None)
    assert new_process(monkeypatch, caplog) and builds.count == 1


def test_import_and_generate_where_fcntl_does_not_exist(tiny_dir):
    """As on Windows: ``import fcntl`` fails; decodekit imports, and generates on the PyTorch path."""
    script = (
        "import sys; sys.modules['fcntl'] = None\n"
        "from decodekit import Engine, load_model\n"
        f"print(len(Engine(load_model({str(tiny_dir)!r}), 'recycling').generate('the fox', 8).token_ids))"
    )
    env = {**os.environ, cpu.SWITCH: "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 1 <= int(done.stdout) <= 8
