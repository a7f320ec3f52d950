"""Ray worker setup hooks for the crash tests: a marked input kills the worker process.

`os._exit` is what a segfaulting decoder or the kernel's OOM killer looks like from the driver: the task
never returns, Ray retries it (restarting an actor), then reports a crashed worker or a dead actor.
"""
from __future__ import annotations

import os
from typing import Any

MARK = "crash-me"


def crash_on_decode() -> None:
    """Decoding an image whose file name starts with `crash-me` kills the decode worker."""
    from vlmixer.pipeline.gallery import work

    real = work.load_item

    def load_item(item: Any, policy: Any) -> Any:
        if os.path.basename(item.path).startswith(MARK):
            os._exit(13)
        return real(item, policy)

    work.load_item = load_item


def crash_on_text_shard() -> None:
    """Tagging a shard that holds a line with `crash-me` kills the tagging actor."""
    from vlmixer.pipeline.text import job

    real = job.TagShard.__call__

    def call(self: Any, task: Any) -> Any:
        if any(MARK.encode() in item[1] for item in task.items if isinstance(item[1], bytes)):
            os._exit(13)
        return real(self, task)

    job.TagShard.__call__ = call
