"""What the pipeline raises for a job it cannot finish; importable without torch.

`PipelineError` is the one base: the HTTP side catches it, `octoflux.core.errors.problem` words it.
"""

from __future__ import annotations


class PipelineError(Exception):
    """The pipeline could not finish a job; a subclass says why."""


class GenerationFailed(PipelineError):
    """The pipeline raised while running a job."""


class OutOfMemory(GenerationFailed):
    """The device ran out of memory for this job; fewer images may fit."""


class LoraError(PipelineError):
    """A LoRA named by a request or an upload cannot be used; `str()` says why and names it."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
