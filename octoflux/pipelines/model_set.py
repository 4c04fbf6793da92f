"""The models one process serves, by id, and the one entry point the worker calls.

Each model is an `Engine` (its own transformer, LoRA adapters and views); models whose encoders are the
same objects also share one prompt-embedding cache.
"""

from __future__ import annotations

from octoflux.pipelines.engine import Engine, GenerationResult, GenerationSpec, StepListener, StopCheck
from octoflux.pipelines.family import Family


class UnknownModel(LookupError):
    """A spec names a model this process does not serve."""


class ModelSet:
    def __init__(self, engines: dict[str, Engine], shared_with: dict[str, dict[str, str]] | None = None):
        if not engines:
            raise ValueError("a model set needs at least one model")
        self.engines = engines
        # model id -> component -> the model id whose loaded object it uses
        self.shared_with = shared_with or {}

    @classmethod
    def of(cls, engine: Engine) -> ModelSet:
        return cls({engine.family: engine})

    @property
    def default(self) -> Engine:
        """The first model named (the one a request without a model goes to)."""
        return next(iter(self.engines.values()))

    @property
    def families(self) -> dict[str, Family]:
        return {model_id: engine.family_info for model_id, engine in self.engines.items()}

    def engine(self, model_id: str | None) -> Engine:
        if model_id is None:
            return self.default
        try:
            return self.engines[model_id]
        except KeyError:
            raise UnknownModel(f"{model_id} is not served here (serving {', '.join(self.engines)})") from None

    def generate(
        self, spec: GenerationSpec, should_stop: StopCheck | None = None, on_step: StepListener | None = None
    ) -> GenerationResult:
        engine = self.engine(spec.model)
        if should_stop is None:
            return engine.generate(spec, on_step=on_step)
        return engine.generate(spec, should_stop=should_stop, on_step=on_step)

    def free_memory(self) -> None:
        self.default.free_memory()


def distinct_tensor_bytes(modules) -> int:
    """Bytes of the distinct tensor storages the modules hold: a shared module or tied weight counts once."""
    storages = {}
    for module in modules:
        for tensor in module.state_dict().values():
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())
