"""Query latency vs accumulated context: stateful vs stateless vs prefix-cache vs flash hit.

Run from the repo root; each variant writes to runs/stream_latency/<variant> by default.
The CPU run (a few minutes on 2 cores):
  python -m experiments.stream_latency
GPU, Llama-3.2-1B shape in bf16, contexts 1k..32k tokens (add --config.impl=pallas for the
attention kernels):
  python -m experiments.stream_latency --config=configs/stream_latency.py:gpu
GPU, the end-to-end targets only (stateful query vs its floor and the HF peer, Pallas kernels;
no stateless / prefix-cache baselines; about half the time of :gpu):
  python -m experiments.stream_latency --config=configs/stream_latency.py:gpu-floor
Test size (seconds; the targets are not checked at this shape):
  python -m experiments.stream_latency --config=configs/stream_latency.py:tiny
"""

import ml_collections
from ml_collections import config_dict

# 32 byte tokens: the peer measurements' query is 32 question tokens on top of the context.
QUESTION = "Will the next bar close higher?\n"
SYSTEM_PROMPT = ("You are a market analyst. Each line below is one OHLCV bar: "
                 "index open high low close volume.\n")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: None (CPU run), "gpu", "gpu-floor" or "tiny"."""
    variant = arg or "cpu"
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.model = "cpu-small"  # statejax.model.config preset; random weights
    c.dtype = "float32"
    c.seed = 0
    c.impl = "reference"  # attention: "reference", "pallas" or "pallas-mosaic" (Session impl)
    # The session's weights layout (statejax.model.layouts): "per_layer", or "stacked" /
    # "packed" (fewer argument buffers per call; with linear_impl "xla" first-token queries
    # only; stacked compiles longer, docs/studies.md).
    c.weights_layout = "per_layer"
    # The blocks' linear layers (statejax.model.llama.LINEAR_IMPLS): "xla", or "pallas" for
    # the fused kernels (kernels/fused_linear.py; they read stacked or packed weights in
    # place, and those then generate too).
    c.linear_impl = "xla"
    c.baselines = True  # time the stateless and prefix-cache engines too
    c.system_prompt = SYSTEM_PROMPT  # the session's frozen prefix
    c.question = QUESTION
    c.flash_max_new_tokens = 32  # the registered flash query's answer length
    c.bars_per_update = 4  # one data batch; the prefix-cache baseline recomputes about this
    c.context_sizes = (256, 512, 1024, 2048, 4096)
    c.warmup = 1  # untimed runs of each identical call (compiles every shape first)
    c.repeats = 5  # timed runs; the median is reported
    c.budget = ml_collections.ConfigDict(dict(
        cells=4096 + 512,
        page_size=16,
        # 32: the question is exactly one bucket, so it is not padded (docs/studies.md). The
        # stateless re-prefill runs in chunks of the largest.
        chunk_sizes=(16, 32, 64, 256),
        windows=(),  # () = the Budget's default ladder
        question_cells=64,
        max_new_tokens=32,
    ))

    # The query's memory floor (weights + K/V read once at the copy bandwidth measured in the
    # same run; on a GPU only, where it is a lower bound) and, optionally, the HF transformers
    # peer's JSON from the same device call (experiments/gpu_session.sh passes it).
    c.roofline = ml_collections.ConfigDict(dict(
        copy_mib=256,
        floor_bound=config_dict.placeholder(float),  # target: stateful <= bound x floor
        peer_json="",
        peer_bound=config_dict.placeholder(float),  # target: HF kept-cache >= bound x stateful
    ))

    # The variants whose shapes the targets were set for; elsewhere the report gives the
    # ratios without PASS / FAIL (statejax.studies.latency.targets_note).
    c.targets_set_for = ("cpu", "gpu", "gpu-floor")

    # Flash queries on the embedded trained model (statejax.pretrained): accuracy vs ground
    # truth, agreement with fresh queries, staleness. Runs after the latency study.
    c.flash = ml_collections.ConfigDict(dict(
        enabled=True, model="default", seed=7, warmup_bars=40, updates=12, bars_per_update=4,
        k=5, cells=4096))

    if variant in ("gpu", "gpu-floor"):
        c.model = "llama-3.2-1b"
        c.dtype = "bfloat16"
        c.context_sizes = (1024, 2048, 4096, 8192, 16384, 32768)
        c.warmup = 2
        c.repeats = 10
        c.budget.cells = 32768 + 1024
        # Large chunks so the stateless re-prefill is not launch-bound; windows in powers of
        # two only, to keep the number of compiles down.
        c.budget.chunk_sizes = (16, 32, 64, 256, 1024, 2048)
        c.budget.windows = tuple(2**i for i in range(8, 16)) + (c.budget.cells,)
        c.flash.enabled = False  # a CPU-sized model; the CPU run covers it
        # The end-to-end targets for the Llama-3.2-1B shape.
        c.roofline.update(copy_mib=2048, floor_bound=1.3, peer_bound=8.0)
        if variant == "gpu-floor":
            c.impl = "pallas"
            c.baselines = False
            c.context_sizes = (1024, 4096, 16384, 32768)
            c.repeats = 5
            # A one-token flash answer runs the query's own compiled first-token step; at 32
            # tokens its refresh compiles a generation loop per context, too long for a short
            # device run (docs/studies.md).
            c.flash_max_new_tokens = 1
    elif variant == "tiny":
        c.model = "tiny"
        c.system_prompt = "OHLCV bars:\n"
        c.bars_per_update = 1
        c.context_sizes = (64, 128, 256)
        c.repeats = 1
        c.budget.cells = 512
        c.flash.updates = 2
        c.roofline.copy_mib = 16
    elif variant != "cpu":
        raise ValueError(f"unknown variant {arg!r}; allowed: None (cpu), 'gpu', 'gpu-floor', "
                         "'tiny'")
    return c
