"""A worker killed while building the C++ kernels must not wedge the next start (torch's build lock)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.worker.engine.layers import kernels

LOAD = "from services.worker.engine.layers import kernels; assert kernels.load() is not None; print('loaded')"


@pytest.mark.skipif(kernels.load() is None, reason="no C++ kernels on this machine")
def test_a_build_killed_holding_the_lock_does_not_wedge_the_next(tmp_path: Path) -> None:
    from services.common.config import cache_dir

    key = kernels._build_key()
    build_dir = tmp_path / "kernels" / key
    shutil.copytree(cache_dir() / "kernels" / key, build_dir)  # built already: the next load only links
    (build_dir / "lock").unlink(missing_ok=True)
    # the state a killed build leaves: torch's FileBaton taken by a process that died holding it
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from torch.utils.file_baton import FileBaton; "
        f"assert FileBaton({str(build_dir / 'lock')!r}).try_acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (build_dir / "lock").exists()

    env = {**os.environ, "TOKENMILL_CACHE": str(tmp_path)}
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "loaded" in run.stdout, run.stderr[-2000:]
    assert "left by a kernel build that was killed" in run.stderr, run.stderr[-2000:]
    assert not (build_dir / "lock").exists()
    print(f"next start loaded the kernels in {time.monotonic() - t0:.1f} s")
