"""Joining Ray and reading its errors, the same way for the gallery and the text job.

Why one place: both jobs must tell a user mistake (our own VlmixerError raised
inside a task) from a dead process (a worker that segfaulted, was OOM-killed or
lost its node), and report either without a Ray traceback; the committed
shards survive both, so the advice is always to rerun the same command.
"""
from __future__ import annotations

from typing import Any

from vlmixer.errors import VlmixerError

RESUME_ADVICE = "the committed shards are kept: rerun the same command to resume"


def connect(address: str, num_cpus: int | None = None) -> tuple[Any, bool]:
    """(the ray module, True when this call started Ray and must shut it down).

    `address` "local" starts Ray here with `num_cpus`; anything else ("auto",
    "HOST:PORT", "ray://...") joins a running cluster. An initialised Ray is reused.
    """
    try:
        import ray
    except ImportError:
        raise VlmixerError("Ray is not installed: pip install 'ray[data]' (or run without --ray-address)") from None
    if ray.is_initialized():
        return ray, False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise VlmixerError(f"cannot connect to Ray at {address!r} ({e}); start one with `ray start --head` "
                           "or use --ray-address local") from None
    return ray, True


def worker_crash(e: BaseException) -> str | None:
    """The kind of process death behind a Ray error (a worker that segfaulted or was killed, ran out
    of memory, lost its node or its result), or None for an exception raised by our own code."""
    from ray.exceptions import NodeDiedError, ObjectLostError, OutOfMemoryError, WorkerCrashedError

    kinds = (WorkerCrashedError, OutOfMemoryError, NodeDiedError, ObjectLostError)
    for err in (e, getattr(e, "cause", None)):  # RayTaskError(WorkerCrashedError) is both
        for kind in kinds:
            if isinstance(err, kind):
                return kind.__name__
    return None


def user_error(e: BaseException) -> BaseException:
    """The VlmixerError raised inside a Ray task, when that is what `e` carries, else `e`."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, VlmixerError) else e


def readable(e: BaseException, what: str) -> BaseException:
    """What to raise for a Ray error that ends a job: a dead actor or a crashed worker becomes a
    VlmixerError naming `what` with the resume advice, our own error inside a task itself."""
    from ray.exceptions import RayActorError

    if isinstance(e, RayActorError):
        return VlmixerError(f"{what} died and could not be restarted ({str(e).splitlines()[0][:300]}); "
                            f"{RESUME_ADVICE}")
    crash = worker_crash(e)
    if crash is not None:
        return VlmixerError(f"{what} crashed ({crash}) on every retry; {RESUME_ADVICE}")
    return user_error(e)


def get(ref: Any, what: str = "a worker") -> Any:
    """`ray.get` that raises what `readable` makes of a Ray error."""
    import ray
    from ray.exceptions import RayError

    try:
        return ray.get(ref)
    except RayError as e:
        raise readable(e, what) from None


def close_writer(writer: Any) -> None:
    """Close a store-writer actor and kill it. Best effort: every commit it acknowledged is
    already durable, so a writer that cannot close cleanly loses nothing."""
    import ray

    try:
        ray.get(writer.close.remote(), timeout=60)
    except Exception:  # noqa: BLE001  see the docstring
        pass
    ray.kill(writer)
