"""From whatever reached the driver to the one error a user needs to read.

Ray wraps an exception raised in a task, actor or training worker (`RayTaskError`, Ray Data's `UserCodeException`,
Ray Train's `WorkerGroupError` / `ControllerError`); `root_cause` unwraps those layers to the exception the code
raised, and `is_bad_input` says whether it is bad input (exit code 2) rather than a failure (exit code 1).
"""

from __future__ import annotations

from actors.store.errors import BadInputError

from .config import ConfigError


def _unwrap_once(err: BaseException) -> BaseException | None:
    """The exception `err` wraps, if `err` is one of Ray's wrappers; else None."""
    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(err, WorkerGroupError):
        failures = [e for _, e in sorted(err.worker_failures.items())]
        # A worker whose own code raised explains more than a worker killed because another one failed.
        return next((e for e in failures if not _is_ray_error(root_cause(e))), failures[0] if failures else None)
    if isinstance(err, ControllerError):
        return err.controller_failure
    if isinstance(err, RayTaskError):
        return err.cause if isinstance(err.cause, BaseException) else None
    if isinstance(err, UserCodeException):
        return err.__cause__
    base = getattr(err, "_base_exc", None)  # Ray Train's UserExceptionWithTraceback
    return base if isinstance(base, BaseException) else None


def _is_ray_error(err: BaseException) -> bool:
    from ray.exceptions import RayError

    return isinstance(err, RayError)


def root_cause(err: BaseException) -> BaseException:
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = _unwrap_once(err)
        if inner is None:
            break
        err = inner
    return err


def is_bad_input(err: BaseException) -> bool:
    return isinstance(err, (ConfigError, BadInputError))
