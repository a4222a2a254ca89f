"""Pallas attention kernels, installed as `statejax.kernels`.

Each kernel file holds its wrapper, its plain-JAX reference beside it, and the validation; the
attention contract they implement is `statejax.attention` (docs/kernels.md):

- `paged_flash`: the shared paged flash engine (online softmax over pages, `BlockSizes`,
  contiguous cells viewed as pages) and its reference;
- `append_attention`: a T-token chunk, causal (Triton lowering; interpret mode on CPU);
- `decode_attention`: split-sequence (flash-decoding) for T = 1 .. a few;
- `cascade_attention`: branches over one session's shared cells, merged by log-sum-exp;
- `append_attention_mgpu`, `decode_attention_mgpu`: Hopper variants (Mosaic GPU, compiled);
  `mosaic_common`: what they share;
- `dispatch`: which implementation, backend and tiles each attention call site runs; the only
  module that picks a Mosaic variant for a portable kernel;
- `tuned`: tiles measured by the benchmark per GPU model (`kernels/tuned/*.json`), which the
  defaults read first; `fused_linear`: the blocks' linear layers.
"""
