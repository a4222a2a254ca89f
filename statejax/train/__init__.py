"""Training small decoders on synthetic market streams with exactly answerable questions.

`tasks` (questions and ground truth), `data` (packed sequences), `trainer` (optax loop,
orbax checkpoints, export), `evaluate` (held-out evaluation, teacher-forced and through the
serving path).
"""
