"""sp-serve: sequence-parallel serving of long prompts."""
from sp_serve.engine.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing sp_serve should not pull in the engine
        from sp_serve.llm import LLM
        return LLM
    raise AttributeError(name)
