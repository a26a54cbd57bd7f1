"""Which code a result came from: the git commit recorded in every benchmark and eval JSON."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty): KASCADE_COMMIT if set (the device machine gets a copy of the tree without a
    usable .git), else the checkout's HEAD and whether tracked files differ from it; ("", None) without git."""
    commit = os.environ.get("KASCADE_COMMIT", "")
    if commit:
        return commit, None
    here = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        commit = out.stdout.strip() if out.returncode == 0 and len(out.stdout.strip()) == 40 else ""
        if not commit:
            return "", None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=5, cwd=here).stdout.strip())
        return commit, dirty
    except Exception:  # noqa: BLE001 - no git where it runs
        return "", None
