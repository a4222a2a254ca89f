"""statejax: stateful transformer inference in JAX.

The names a user starts from, imported on first use so that `import statejax` stays light:

    import statejax
    cfg, params, tokenizer, info = statejax.pretrained.load_default()
    session = statejax.Session(params, cfg, statejax.Budget(cells=4096), tokenizer)
"""

import importlib

# name -> (module, attribute; None for the module itself)
_EXPORTS = {
    "Budget": ("statejax.budget", "Budget"),
    "Session": ("statejax.serving.session", "Session"),
    "StreamingSession": ("statejax.serving.streaming", "StreamingSession"),
    "Question": ("statejax.serving.question", "Question"),
    "Answer": ("statejax.serving.results", "Answer"),
    "QueryResult": ("statejax.serving.results", "QueryResult"),
    "FlashAnswer": ("statejax.serving.results", "FlashAnswer"),
    "FlashEvent": ("statejax.serving.results", "FlashEvent"),
    "FlashResult": ("statejax.serving.results", "FlashResult"),
    "InputError": ("statejax.errors", "InputError"),
    "CapacityError": ("statejax.errors", "CapacityError"),
    "ItemsRefusedError": ("statejax.errors", "ItemsRefusedError"),
    "SessionClosedError": ("statejax.errors", "SessionClosedError"),
    "ByteTokenizer": ("statejax.tokenizer", "ByteTokenizer"),
    "load_hf_checkpoint": ("statejax.checkpoint.hf_import", "load_hf_checkpoint"),
    "load_gguf_checkpoint": ("statejax.checkpoint.gguf_import", "load_gguf_checkpoint"),
    "pretrained": ("statejax.pretrained", None),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'statejax' has no attribute {name!r}; public names: "
                             f"{', '.join(__all__)}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
