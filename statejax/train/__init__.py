"""Training small decoders on synthetic market streams with exactly answerable questions.

`tasks` (questions and ground truth), `data` (packed sequences), `trainer` (optax loop,
orbax checkpoints, evaluation through the serving path).
"""
