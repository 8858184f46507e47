"""fewbench.running.cpu_heap: glibc keeps large blocks on its heap in processes that train cells."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# In a fresh process: configure (or not), allocate an 80 MB block in the main thread and one in
# a second thread, and report how many more blocks glibc then maps straight from the kernel.
PROBE = """
import ctypes, json, sys, threading
from fewbench.running import cpu_heap
state = cpu_heap.keep_large_blocks_on_heap() if sys.argv[1] == "configure" else cpu_heap.state()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks
main_block = bytearray(80 << 20)
mapped_in_main = libc.mallinfo2().hblks - before
held = []
thread = threading.Thread(target=lambda: held.append(bytearray(80 << 20)))
thread.start(); thread.join()
print(json.dumps({"state": state, "main": mapped_in_main, "both": libc.mallinfo2().hblks - before}))
"""

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only"
)


def probe(monkeypatch, action: str, setting: str | None) -> dict:
    if setting is None:
        monkeypatch.delenv("FEWBENCH_MALLOC", raising=False)
    else:
        monkeypatch.setenv("FEWBENCH_MALLOC", setting)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, action], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


@linux_glibc
def test_a_training_process_keeps_large_blocks_on_the_main_heap(monkeypatch):
    """The main thread's 80 MB block comes from the heap; another thread's arena still maps
    one (why choose_engine runs mini-ImageNet-sized tasks one at a time)."""
    configured = probe(monkeypatch, "configure", None)
    assert configured["state"] == "heap (glibc: no mmap for large blocks, trim above 1 GiB)"
    assert configured["main"] == 0 and configured["both"] == 1


@linux_glibc
def test_glibcs_defaults_map_large_blocks_and_fewbench_malloc_system_keeps_them(monkeypatch):
    untouched = probe(monkeypatch, "leave", None)
    assert untouched["state"].startswith("system (not configured")
    assert untouched["main"] == 1 and untouched["both"] == 2
    opted_out = probe(monkeypatch, "configure", "system")
    assert opted_out["state"] == "system (FEWBENCH_MALLOC=system)"
    assert opted_out["main"] == 1 and opted_out["both"] == 2


def test_an_unknown_setting_is_one_line_and_exit_2_before_anything_runs(tmp_path):
    from helpers import run_cli

    result = run_cli(
        "run",
        "suites/sinusoid.yaml",
        "--out",
        str(tmp_path / "run"),
        env={"FEWBENCH_MALLOC": "jemalloc"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "fewbench: error: environment variable FEWBENCH_MALLOC is 'jemalloc': use heap (the "
        "default: glibc keeps large blocks on its heap) or system (glibc's own defaults)"
    )
    assert not (tmp_path / "run").exists()
