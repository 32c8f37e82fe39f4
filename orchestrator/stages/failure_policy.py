"""Ray Train failure handling that does not retry bad input.

Ray Train (2.60, Train V2) retries every worker-group failure up to `FailureConfig.max_failures` times and has no
setting to exempt an exception type: its `DefaultFailurePolicy` counts a `WorkerGroupError` as retryable whatever
the workers raised. A worker that raised `BadInputError` (a damaged shard, a budget the data cannot fill) would
fail the same way on every retry, so this policy raises at once when any worker failed with it; every other
failure (a killed worker, a lost node) is still retried as `max_failures` says.

The policy is handed to the controller the way `DataParallelTrainer.fit` does it; the hook is a private method
of Ray Train, so `tests/test_faults.py` checks both the decision and the whole path on a real Ray instance.
"""

from __future__ import annotations

from ray.train import FailureConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2.api.exceptions import WorkerGroupError

from actors.store.errors import BadInputError


def _raised_bad_input(err: BaseException) -> bool:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, BadInputError):
            return True
        err = getattr(err, "_base_exc", None) or getattr(err, "cause", None) or err.__cause__
    return False


class NoRetryOnBadInput(DefaultFailurePolicy):
    def _is_retryable_error(self, training_failed_error) -> bool:
        if isinstance(training_failed_error, WorkerGroupError) and any(
                _raised_bad_input(e) for e in training_failed_error.worker_failures.values()):
            return False
        return super()._is_retryable_error(training_failed_error)


class SAETrainer(TorchTrainer):
    """`TorchTrainer` whose failure handling is `NoRetryOnBadInput`."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        failure_config = self.run_config.failure_config or FailureConfig()
        controller_init_kwargs["failure_policy"] = NoRetryOnBadInput(failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
