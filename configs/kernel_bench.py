"""Attention kernel benchmark: time, bytes/s and FLOP/s vs the device's measured peaks.

Run from the repo root; each variant writes to runs/kernel_bench/<variant> by default.
GPU (the shapes of the kernels' targets and a grid around them):
  python -m experiments.kernel_bench --config=configs/kernel_bench.py:gpu
CPU check (interpret mode, tiny shapes, a minute):
  python -m experiments.kernel_bench --config=configs/kernel_bench.py:cpu
Block-size tuning on the GPU (the two target shapes, default tiles, then each grid entry):
  python -m experiments.kernel_bench --config=configs/kernel_bench.py:gpu-tune
The end-to-end query's attention (Llama-3.2-1B: one session, 32 question tokens, H = 32, K = 8,
D = 64: the cascade call with one branch), its tiles tuned:
  python -m experiments.kernel_bench --config=configs/kernel_bench.py:gpu-query

Shape tuples, one per benchmarked call:
  decode  (B sessions, S cached cells per session, T new tokens, H, K, D)
  append  (B sessions, S cached cells per session, T new tokens, H, K, D)
  cascade (R branches, S shared cells, T tokens per branch, H, K, D); private cells = T
Cached cells are the same for every session; K/V live in a shuffled page pool (cascade
rows with `cascade_form="cells"`, as in gpu-query: contiguous cells, as the model's step).

Tuning grids: `tune_decode` / `tune_append` hold `BlockSizes` tuples (block_q, block_k,
num_splits, num_warps, num_stages[, preload_pages]) timed on the FIRST decode / append shape
(`tune_cascade` / `tune_cascade_second`: cascade tiles on the first / second cascade shape, see
`_query_grid`); the targets report the fastest row of each target shape. With `tuned_dir`, the
fastest tiles of each decode or cascade shape timed with a grid are recorded there for this GPU
model (`statejax.kernels.tuned`), and become that shape's defaults.
Mosaic GPU (Hopper) variants: with `mosaic`, the cascade with its shared part on the Mosaic
decode kernel (shapes of <= 128 shared rows) and the `tune_cascade_mosaic` grid of (block_k,
max_concurrent_steps, num_splits[, private block_q]) on the first cascade shape, their
default tiles on every decode and append shape, the `tune_decode_mosaic` grid of (block_k,
max_concurrent_steps, num_splits) on the first decode shape and the `tune_append_mosaic` grid
of (block_q, block_k, max_concurrent_steps) on the first append shape; these rows run after
the default rows, before the Triton grids.
"""

import itertools

import ml_collections


def _decode_grid():
    # 8 sessions x 16k, G = 4: one query block of 16 rows; 8 x 8 = 64 (row, kv-head) programs
    # before splitting, so 4..32 splits give 256..2048 programs. First, tiles that read each
    # program's page-table entries before its KV loop (`preload_pages`; the bench's pools are
    # shuffled pages): with 3 or 4 stages their loops keep blocks in flight, which a table
    # read in the loop prevents (docs/studies.md); at most 64 entries a program (the GPU
    # configs' 64-cell pages: 256 a row at 16k, so >= 4 splits).
    preloaded = tuple((16, bk, s, w, st, True) for bk, s, (w, st) in (
        (64, 16, (4, 3)), (64, 32, (4, 3)), (64, 16, (4, 4)), (64, 16, (8, 3)),
        (128, 32, (4, 3)), (128, 32, (8, 3))))
    return preloaded + tuple((16, bk, s, w, st) for bk, s, (w, st) in itertools.product(
        (64, 128, 256), (4, 8, 16, 32), ((4, 2), (4, 3), (4, 4), (8, 3))))


def _append_grid():
    # 8 x 512 tokens, G = 4: 2048 query rows per (row, kv-head).
    return tuple((bq, bk, 1, w, st) for bq, bk, (w, st) in itertools.product(
        (64, 128), (64, 128), ((4, 2), (4, 3), (8, 2), (8, 3))))


def _query_grid(splits, private_block_q=(32, 128)):
    # The end-to-end query's cascade call: 1 session x 8 kv-heads x 128 shared rows (T = 32,
    # G = 4), the private kernel merging the shared splits of its rows in its epilogue (8
    # programs at 128-row private tiles, 32 at 32). Entries: (shared block_q, block_k, splits,
    # warps; private block_q). The rule's shared tiles (128 x 128, 4 warps) spill registers;
    # 8 warps or 64-row tiles do not (docs/studies.md).
    # Ordered most promising first, since the part's time budget may end the grid early: all
    # 128 rows in one tile (the shared cells read once per kv-head), then 64-cell KV steps
    # (no spills at either warp count), the middle split count, 8 warps, 32-row private tiles.
    return tuple(itertools.product((128, 64), (64, 128), _middle_first(splits), (8, 4),
                                   private_block_q))


def _one_kernel_grid():
    # One shared split: the cascade is one kernel (`cascade_attention.fuses`), each program
    # over the shared cells then its branch's own, with the shared tiles (query rows, KV step,
    # warps; the private entry, 128, is unused). At 1k cells it saves the private kernel's
    # launch and the shared partials: 8 programs of 128 rows reading all 8-16 KV blocks, or
    # 16 / 32 programs of 64 / 32 rows (each reading the layer's 2 MiB of cells).
    return tuple((q, k, 1, warps, 128) for q in (128, 64, 32) for k in (128, 64)
                 for warps in (4, 8))


def _pipelined_first(cells: str):
    # Three or four stages, which the model's contiguous cells pipeline: each KV loop keeps a
    # block (two) in flight while it computes on one, where 2 stages wait for every copy at
    # each step (tests/kernels/test_kernels.py, "keep a block in flight"). Entries: (shared
    # block_q, block_k, splits, warps, private block_q, stages).
    if cells == "1k":  # the call as one kernel (one split), then split into 2 and 4
        return (tuple((q, 64, 1, 8 if q == 128 else 4, 128, 3) for q in (128, 64, 32))
                + ((128, 128, 1, 8, 128, 3), (128, 64, 4, 8, 32, 3), (128, 64, 2, 8, 32, 3),
                   (64, 64, 4, 4, 32, 3)))
    return (tuple((128, 64, s, 8, 32, st) for s in (16, 8, 32) for st in (3, 4))
            + ((128, 128, 16, 8, 32, 3),))


def _middle_first(values):
    """The middle value, then the rest in order: (8, 16, 32) -> (16, 8, 32)."""
    middle = values[len(values) // 2]
    return (middle, *(v for v in values if v != middle))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "gpu" (default), "gpu-tune" (target shapes + block-size grids), "gpu-query" (the
    end-to-end query's attention + its tiles grid) or "cpu" (the shrink switch: tiny shapes,
    interpret mode, a two-entry grid)."""
    variant = arg or "gpu"
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.dtype = "bfloat16"
    c.page_size = 64  # cells per page of the benchmark's pool
    # Cascade rows' form: "paged" (shared cells in the shuffled pool) or "cells" (as the
    # model calls it: contiguous session cells viewed as pages of one KV block;
    # `statejax.perf.kernel_bench._cells_cascade_call`).
    c.cascade_form = "paged"
    c.interpret = False
    c.baselines = True  # jax's Pallas decode kernel, cuDNN, the XLA reference (GPU only)
    c.warmup = 2  # untimed calls after compilation
    c.repeats = 10  # timed samples (of 5 calls each); the median is reported
    # Device time per call: this many calls chained in one program, minus one call (0: time
    # pipelined Python calls instead, whose dispatch bounds kernels of a few microseconds).
    c.chain_calls = 8
    c.time_budget_s = 150.0  # shapes not started by then are recorded as skipped
    c.copy_mib = 2048  # device-to-device copy that measures the bandwidth (read + write)
    c.matmul_size = 8192  # N of the bf16 N x N x N matmul that measures the matrix rate
    # Llama-3.2-1B attention is H=32, K=8, D=64; Llama-3.1-8B is H=32, K=8, D=128.
    c.decode = (
        (8, 16384, 1, 32, 8, 128),  # target: >= 75% of copy bandwidth
        (1, 1024, 1, 32, 8, 64), (1, 8192, 1, 32, 8, 64), (1, 32768, 1, 32, 8, 64),
        (8, 4096, 1, 32, 8, 128), (8, 32768, 1, 32, 8, 128), (64, 4096, 1, 32, 8, 128),
        (8, 16384, 1, 64, 8, 128),  # GQA 8
        (8, 16384, 4, 32, 8, 128),  # speculative verification, 4 tokens
    )
    c.append = (
        (8, 8192, 512, 32, 8, 128),  # target: >= 40% of the bf16 matrix rate
        (1, 1024, 32, 32, 8, 64), (1, 8192, 32, 32, 8, 64), (1, 32768, 32, 32, 8, 64),
        (1, 8192, 512, 32, 8, 64), (8, 8192, 512, 64, 8, 128), (64, 1024, 64, 32, 8, 64),
    )
    c.cascade = (
        (1, 16384, 32, 32, 8, 64), (8, 16384, 32, 32, 8, 64),  # target: R=8 < 1.5x R=1
        (1, 4096, 32, 32, 8, 128), (8, 4096, 32, 32, 8, 128), (64, 4096, 8, 32, 8, 128),
    )
    # Cascade shapes timed with the default Triton tiles only, after `cascade` (no Mosaic row,
    # no grid): a target's rows that should not slow a tuning run's other work.
    c.cascade_targets = ()
    c.tune_decode = ()
    c.tune_append = ()
    c.tune_cascade = ()  # cascade grids, on the first / second cascade shape: see _query_grid
    c.tune_cascade_second = ()
    # Where to record the fastest tiles of each decode shape timed with a grid
    # (`statejax.kernels.tuned`: the kernels' defaults read them on this GPU model). "" = off;
    # experiments/gpu_session.sh passes kernels/tuned.
    c.tuned_dir = ""
    # Backends whose entries this run records (() = all). A run that times one backend's grid
    # in its own process records only that backend, so the other's default row in it does not
    # replace the grid winner a process before it recorded (experiments/gpu_session.sh).
    c.record_backends = ()
    c.mosaic = True  # time the Mosaic GPU variants too (compiled only: GPU variants)
    c.tune_decode_mosaic = ()
    c.tune_append_mosaic = ()
    c.tune_cascade_mosaic = ()

    if variant == "cpu":
        c.dtype = "float32"
        c.page_size = 16
        c.interpret = True
        c.baselines = False
        c.warmup = 1
        c.repeats = 2
        c.chain_calls = 0  # interpreted kernels: milliseconds per call, no dispatch question
        c.time_budget_s = 600.0
        c.copy_mib = 16
        c.matmul_size = 256
        c.decode = ((2, 128, 1, 8, 2, 16), (1, 256, 2, 8, 1, 32))
        c.append = ((2, 64, 16, 8, 2, 16),)
        c.cascade = ((1, 128, 4, 8, 2, 16), (4, 128, 4, 8, 2, 16))
        c.tune_decode = ((16, 32, 2, 4, 2), (16, 64, 1, 4, 2))
        c.tune_append = ((16, 16, 1, 4, 2),)
        c.tune_cascade = ((16, 32, 2, 4, 16), (16, 16, 1, 4, 16))
        c.mosaic = False
    elif variant == "gpu-tune":
        c.decode, c.append, c.cascade = c.decode[:1], c.append[:1], ()
        c.baselines = False
        c.repeats = 5
        c.time_budget_s = 300.0
        c.tune_decode = _decode_grid()
        c.tune_append = _append_grid()
        # D = 128: (64, 128, 3) does not fit in shared memory; 64-cell blocks go deeper.
        c.tune_append_mosaic = ((64, 128, 2), (64, 64, 2), (64, 64, 3), (64, 64, 4))
        # 8 x 8 (row, kv-head) programs per split; at D = 128 shared memory holds 5 slots of
        # 64 cells or 2 of 128 (beside the Q and float32 out tiles).
        c.tune_decode_mosaic = tuple(itertools.product((64,), (3, 5), (4, 8, 16))) + tuple(
            itertools.product((128,), (2,), (4, 8, 16)))
    elif variant == "gpu-query":
        # The stateful query's attention at 32k and 1k cells: the whole cascade call with one
        # branch, with a tiles grid on each (the rows that decide the tuned table), and its
        # shared part alone (the decode kernel at T = 32, default tiles, its splits merged
        # by XLA instead).
        c.decode = ((1, 32768, 32, 32, 8, 64), (1, 1024, 32, 32, 8, 64))
        c.append = ()
        # The cascade rows as the model's step calls them: its session cells read as 128-cell
        # pages (a budget of whole 128-cell blocks) where the pool's are 64, shuffled.
        c.cascade_form = "cells"
        c.cascade = ((1, 32768, 32, 32, 8, 64), (1, 1024, 32, 32, 8, 64))
        # The cascade target: 8 branches vs one over 16k shared cells. With 32-token branches
        # eight do 8x the matmuls (docs/studies.md); a flash query's generation step (T = 1)
        # is the shape the target fits.
        c.cascade_targets = ((1, 16384, 1, 32, 8, 64), (8, 16384, 1, 32, 8, 64),
                             (1, 16384, 32, 32, 8, 64), (8, 16384, 32, 32, 8, 64))
        c.baselines = False
        c.repeats = 5
        c.time_budget_s = 170.0
        # The shared part on the Mosaic GPU decode kernel (two compute warpgroups for the 128
        # rows): its defaults (64 splits at 32k), then (block_k, slots, splits, private
        # block_q) at 32k: fewer splits, and 32-row private tiles (32 programs merging the
        # splits instead of 8), as in the Triton grid.
        c.tune_cascade_mosaic = ((128, 4, 8, 32), (128, 4, 16, 32), (128, 4, 32, 32),
                                 (128, 4, 16, 128), (64, 4, 16, 32), (64, 4, 32, 32),
                                 (128, 2, 16, 32))
        # 32k: 256-512 KV blocks; 1k: 8-16. The private kernel reads every split's partial
        # of its rows: more splits, more serial merge work in its few programs. At 1k each
        # attention kernel of the model's step is latency-bound (docs/studies.md): 32-row
        # private tiles give 32 programs instead of 8; one split (`_one_kernel_grid`) makes
        # the call one kernel. Deeper pipelines (`_pipelined_first`) lead each grid. The 1k
        # grid runs before the 32k one (`tuning_work`).
        c.tune_cascade = _pipelined_first("32k") + _query_grid((8, 16, 32))
        c.tune_cascade_second = (_pipelined_first("1k") + _one_kernel_grid()
                                 + _query_grid((2, 4)))
    elif variant != "gpu":
        raise ValueError(f"unknown variant {arg!r}; allowed: 'gpu' (default), 'gpu-tune', "
                         "'gpu-query', 'cpu'")
    return c
