"""Errors every layer can raise and the orchestrator recognises.

`BadInputError` is bad data or bad input found where only a worker can see it (a damaged activation shard, a
training budget the data cannot fill). Retrying cannot fix it, so Ray Train's failure handling does not retry it
(orchestrator/stages/failure_policy.py) and the CLI prints it once, as bad input (exit code 2).
"""


class BadInputError(ValueError):
    """Bad data or input that a retry cannot fix; the message names the file or field and the remedy."""
