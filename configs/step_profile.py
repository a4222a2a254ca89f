"""Where a query step's time goes outside attention, against the weight-read floor.

Run from the repo root; each variant writes to runs/step_profile/<variant> by default:
  python -m experiments.step_profile                                   # CPU, cpu-small f32
  python -m experiments.step_profile --config=configs/step_profile.py:gpu
  python -m experiments.step_profile --config=configs/step_profile.py:tiny
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: None (CPU), "gpu" (Llama-3.2-1B shape, bf16), "gpu-linear" (the 1B block's fused
    linear calls over a grid of tiles, nothing else), "tiny" (tests) or "tiny-linear" (tiny's
    tiles alone, as gpu-linear: the device script's `linear` part dry-run on a CPU)."""
    variant = arg or "cpu"
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.model = "cpu-small"  # statejax.model.config preset; random weights
    c.dtype = "float32"
    c.tokens = 32  # the query's new tokens (batch 1), as in the peer measurements (docs/results.md)
    c.copy_mib = 256  # the copy that measures the bandwidth (read + write)
    c.warmup = 2
    c.repeats = 10
    c.context = 1024  # session cells behind the query rows (query_step, session_query)
    c.extra_contexts = ()  # larger sessions whose query rows come last (named query_step@N)
    # The query rows again per weights layout (statejax.model.layouts; [packed], [stacked]).
    c.layout_rows = ("packed", "stacked")
    # The query rows again with the blocks' linear layers by these linear_impls
    # (statejax.model.llama.LINEAR_IMPLS; "pallas": kernels/fused_linear.py, whose interpret
    # mode on a CPU times nothing of use: GPU and tests only).
    c.linear_rows = ()
    # fused_linear[call,...] rows: each fused call of a block, once per layer's weights in
    # one program, per entry: an output strip width N (the other tiles follow from it), or
    # (block_n, block_k, num_warps, num_stages) with None for the default's
    # (`statejax.perf.fused_linear_tiles.linear_tiles`): which tiles stream the weights fastest.
    c.linear_tile_rows = ()
    c.query_rows = True  # False: no query rows, no pieces but the tiles and GEMM chains
    # Where the fastest matching tiles of each fused call are recorded as "linear" entries of
    # this GPU model's table (`statejax.kernels.tuned`; "" records nothing), which the fused
    # kernels' defaults then read (`fused_linear.blocks_for`).
    c.tuned_dir = ""
    c.impl = "reference"  # their attention: "reference", "pallas" or "pallas-mosaic"
    c.decode_tokens = 32  # decode_token row: tokens a generating query makes (>= 2)
    c.trace_calls = 5  # calls traced by the profiler for a kernel breakdown
    # Query steps whose kernels are traced, by their rows' suffix ("": query_step,
    # "@32768", "[linear=pallas]", "[packed]" ...): a table of kernels each.
    c.trace_steps = ("",)
    # Query steps (by row suffix) whose lone calls (`query_step_host_io`, `session_query`)
    # are traced on the host (`device_trace.trace_lone_calls`): their threads' events by self
    # time, where a lone query's wait beyond its device work goes (docs/studies.md).
    c.trace_lone_steps = ("",)
    # The pieces' rows (projections, MLP, fused calls, GEMM chains) also get their kernels'
    # device time per call from a trace: a piece of one small kernel is timed by its host
    # dispatch otherwise (docs/studies.md).
    c.trace_pieces = False
    # weights_in_N_gemms rows: chain_mib MiB of weights read by N dependent GEMMs each (what a
    # kernel boundary costs); chain_mib must split into 64 [E, E x m] weights (cpu-small f32:
    # 4 MiB each, the 1B shape in bf16: 8 MiB, tiny f32: 16 KiB).
    c.chain_gemms = (1, 4, 16, 64)
    c.chain_mib = 256
    if variant in ("gpu", "gpu-linear"):
        c.model = "llama-3.2-1b"
        c.dtype = "bfloat16"
        c.copy_mib = 2048
        c.impl = "pallas"
        c.extra_contexts = (32768,)
        c.chain_mib = 512
        c.linear_rows = ("pallas",)
        c.trace_steps = ("", "[linear=pallas]", "@32768")
        c.trace_lone_steps = ("", "@32768")
        c.trace_pieces = True
        if variant == "gpu-linear":
            # Around each call's default tiles: more stages and warps, longer K steps (two
            # stages, to stay in shared memory), then the strip widths.
            c.query_rows = False
            c.linear_rows = c.layout_rows = c.chain_gemms = ()
            c.linear_tile_rows = ((None, None, None, None), (None, None, None, 4),
                                  (None, None, None, 5), (None, None, 8, None),
                                  (None, None, 8, 4), (None, 512, None, 2),
                                  (None, 1024, 8, 2), 16, 32, 64)
    elif variant in ("tiny", "tiny-linear"):
        c.model = "tiny"
        c.context = 64
        c.extra_contexts = (128,)
        c.copy_mib = 8
        c.chain_mib = 1
        c.linear_rows = ("pallas",)
        c.linear_tile_rows = (16, 32)
        c.trace_steps = ("", "[linear=pallas]")
        c.trace_lone_steps = ("", "[linear=pallas]")
        c.trace_pieces = True
        c.warmup = 1
        c.repeats = 2
        if variant == "tiny-linear":  # the `linear` part's plumbing on a CPU: tiles only
            c.query_rows = False
            c.linear_rows = c.layout_rows = c.chain_gemms = ()
    elif variant != "cpu":
        raise ValueError(f"unknown variant {arg!r}; allowed: None (cpu), 'gpu', 'gpu-linear', "
                         "'tiny', 'tiny-linear'")
    return c
