"""Pallas attention kernels, installed as `statejax.kernels`.

Each kernel file will hold the kernel, its plain-JAX reference and a validating wrapper; the
attention contract they implement is `statejax.attention` (see docs/design.md). The portable
reference is all that exists so far: selection is explicit (`impl="reference"`).
"""
