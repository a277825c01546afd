"""The scratch folder where a build spills what it cannot hold in memory.

Blocks in float32, rounded codes and the reference's log-probabilities go to files under
``<cache>/spill/pid-<pid>/``; each file goes when its owner is collected, the folder when the
process exits (SIGTERM included: the command line unwinds it as Ctrl-C). A process killed outright
(SIGKILL, a machine that went down) leaves its folder behind; the next process that spills removes
the folders of processes that no longer exist.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
from pathlib import Path

from .assets import cache_dir


def spill_dir() -> Path:
    """This process's spill folder (made on first use, after sweeping those of dead processes)."""
    return _made(cache_dir() / "spill", os.getpid())


@functools.cache
def _made(root: Path, pid: int) -> Path:
    """Once per process and cache folder: a folder left under our pid by a dead process that had it
    before is taken over, and removed at our exit too."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.glob("pid-*"):
        if not _alive(folder.name.removeprefix("pid-")):
            shutil.rmtree(folder, ignore_errors=True)
    mine = root / f"pid-{pid}"
    mine.mkdir(exist_ok=True)
    atexit.register(shutil.rmtree, mine, True)
    return mine


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
