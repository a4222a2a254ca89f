"""Kernels a session's steps launch on a GPU target, compiled on any machine (no GPU needed).

Run from the repo root (needs jax's CUDA plugin; see statejax/perf/gpu_target.py); each
variant writes to runs/step_census/<variant> by default:
  python -m experiments.step_census                     # Llama-3.2-1B, compiled for an H100
  python -m experiments.step_census --config=configs/step_census.py:tiny
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: None (Llama-3.2-1B shape, bf16, 1k and 32k cells) or "tiny" (tests)."""
    variant = arg or "default"
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.target = "h100"  # statejax.perf.gpu_target.TARGETS
    c.model = "llama-3.2-1b"  # statejax.model.config preset; only shapes are used
    c.dtype = "bfloat16"
    c.tokens = 32  # the question's tokens (batch 1), as in the peer measurements (docs/results.md)
    c.branch_cells = 96  # private cells of the question's branch (question + answer)
    c.contexts = (1024, 32768)  # session cells behind the question
    c.impls = ("reference", "pallas")
    c.max_new_caps = (1, 32)  # steps.query's static generation width (1: first token only)
    c.append_chunks = (256,)  # steps.append chunk sizes (the data plane's ingestion)
    # Weight layouts (statejax.model.layouts): "per_layer", "stacked" and "packed" (fewer
    # argument buffers; with XLA's linear layers their query rows are first-token only, as
    # steps.query takes them).
    c.layouts = ("per_layer", "stacked", "packed")
    # The blocks' linear layers (statejax.model.llama.LINEAR_IMPLS): "xla", and "pallas"
    # (kernels/fused_linear.py; stacked or packed weights read in place).
    c.linear_impls = ("xla", "pallas")
    if variant == "tiny":
        c.model = "tiny"
        c.dtype = "float32"
        c.contexts = (256,)
        c.append_chunks = (16,)
    elif variant != "default":
        raise ValueError(f"unknown variant {arg!r}; allowed: None, 'tiny'")
    return c
