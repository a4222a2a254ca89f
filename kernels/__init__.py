"""Pallas attention kernels, installed as `statejax.kernels`.

Each kernel file holds the kernel, its plain-JAX reference and a validating wrapper; the
attention contract they implement is `statejax.attention` (docs/kernels.md):

- `append_attention`: paged flash attention of a T-token chunk (Triton lowering, runs in
  interpret mode on CPU); `append_attention_mgpu`: its Hopper variant (Mosaic GPU, compiled);
- `decode_attention`: split-sequence (flash-decoding) paged attention for T = 1 .. a few;
- `cascade_attention`: branches over one session's shared cells, merged by log-sum-exp;
- `decode_attention_mgpu`: the decode kernel's Hopper variant; `mosaic_common`: what the two
  Mosaic GPU kernels share;
- `tuned`: tiles measured by the benchmark per GPU model (`kernels/tuned/*.json`), which the
  decode defaults read first.
"""
