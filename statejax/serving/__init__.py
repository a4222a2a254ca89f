"""Serving: a `Session` (session.py) and its streaming planes (streaming.py).

Pieces: `Question` (a question checked once), results (`Answer` and what wraps it), packing
(host arrays of a query step), the device lock, the flash registry, event fan-out, and item
encoders.
"""
