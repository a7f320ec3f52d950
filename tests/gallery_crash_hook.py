"""Ray worker setup hook for the crash-isolation test: decoding `crash-me*` kills the worker process.

`os._exit` is what a segfaulting decoder or the kernel's OOM killer looks like from the driver: the task
never returns, Ray retries it, then reports a crashed worker.
"""
from __future__ import annotations

import os
from typing import Any


def install() -> None:
    from pipeline.gallery import work

    real = work.load_rgb

    def load_rgb(path: str, policy: Any) -> Any:
        if os.path.basename(path).startswith("crash-me"):
            os._exit(13)
        return real(path, policy)

    work.load_rgb = load_rgb
