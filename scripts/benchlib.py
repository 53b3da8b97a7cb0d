"""What every benchmark prints beside its figures: the exact command, the commit and the machine's load."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def machine() -> dict:
    """argv, git commit (``+uncommitted`` when tracked files differ from it), load average and CPUs."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=False).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"argv": sys.argv, "commit": commit + ("+uncommitted" if dirty else ""),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
