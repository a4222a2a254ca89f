"""Training a rung of the capability ladder on synthetic market streams with questions.

Run from the repo root (each rung writes checkpoints, metrics.jsonl, results.json, export/
into runs/<variant> unless --workdir says otherwise):
  python -m experiments.train --config=configs/train.py:ladder-s         # runs/ladder-s
  python -m experiments.train --config=configs/train.py:ladder-m
  python -m experiments.train --config=configs/train.py:ladder-l
  python -m experiments.train --config=configs/train.py:ladder-l-long
(ladder-l-long continues from runs/ladder-l/params: run it after ladder-l.)
Seconds-long test run:
  python -m experiments.train --config=configs/train.py:test          # runs/test
Append ",quick" to any rung (e.g. `:ladder-l,quick`, into runs/ladder-l-quick) for a
1/20-length smoke run of the same shapes. Rerunning a command with the same workdir resumes
from its latest checkpoint.
"""

import ml_collections

# Model shapes of the ladder: Llama-style decoders over byte ids (vocab 259, padded to 320).
# Few, wide heads: on CPU the attention's softmax passes cost more than its matmuls.
LADDER = {
    "test": dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16,
                 mlp_dim=64),
    "ladder-s": dict(num_layers=2, embed_dim=64, num_heads=2, num_kv_heads=1, head_dim=32,
                     mlp_dim=192),
    "ladder-m": dict(num_layers=3, embed_dim=96, num_heads=3, num_kv_heads=1, head_dim=32,
                     mlp_dim=288),
    "ladder-l": dict(num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
                     mlp_dim=384),
}
# s and m see the same 1200 batches (~150k questions), l the same and 400 more: the ladder
# varies capacity, and the largest rung also gets the longest run (timings: docs/ladder.md).
STEPS = {"test": 30, "ladder-s": 1200, "ladder-m": 1200, "ladder-l": 1600}
LEARNING_RATE = {"test": 3e-3, "ladder-s": 5e-3, "ladder-m": 4e-3, "ladder-l": 3e-3}
# Continued rungs: (base rung, its workdir's params to start from, further steps, peak lr).
# The optimizer and schedule start fresh; the batches continue the base run's stream.
CONTINUED = {"ladder-l-long": ("ladder-l", "runs/ladder-l/params", 3000, 1.5e-3)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "<rung>[,quick]", rung in LADDER (default "ladder-s")."""
    name, *flags = (arg or "ladder-s").split(",")
    rung = CONTINUED[name][0] if name in CONTINUED else name
    if rung not in LADDER or set(flags) - {"quick"}:
        raise ValueError(f"unknown variant {arg!r}; allowed: one of "
                         f"{sorted(LADDER) + sorted(CONTINUED)}, optionally followed by "
                         "',quick'")
    c = ml_collections.ConfigDict()
    c.variant = arg or name
    c.model = ml_collections.ConfigDict(dict(
        name=name, vocab_size=320, rope_theta=10_000.0, tie_embeddings=True,
        dtype="float32", **LADDER[rung]))
    # statejax.train.data.PackSpec fields, plus the batch size.
    c.data = ml_collections.ConfigDict(dict(
        context_tokens=384,  # ~9 bars after the prefix
        num_branches=16,  # questions per sequence, each on its own branch
        branch_tokens=40,
        context_weight=0.1,  # answers weigh 1; see statejax/train/data.py
        min_price=20.0, max_price=500.0, max_index=10_000,
        jump_prob=0.5, jump_max=4096,  # far-context augmentation, see PackSpec
        batch_size=8,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=LEARNING_RATE[rung], warmup_steps=100, b1=0.9, b2=0.95, weight_decay=0.1,
        grad_clip=1.0))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=STEPS[rung], seed=0, log_every=100, eval_every=400, eval_batches=4,
        checkpoint_every=300,
        data_workers=0,  # processes making batches; >0 on a GPU host, 0 on a 2-core CPU
        init_from="",  # an orbax_io params checkpoint to start from ("" = random init)
        first_batch=0,  # index of the first batch (a continued run skips its base's batches)
    ))
    # Final held-out evaluation through the serving path (Session + query branches).
    c.eval = ml_collections.ConfigDict(dict(
        seed=1234, max_new_tokens=12,
        # name -> (longest session context in tokens, questions); "in_range" is what training
        # saw, "long" is ~5x longer (~55 bars), "4k" reaches the farthest distance training
        # showed (the far-context jumps go to 4096 positions), "8k" goes beyond it.
        serving={"in_range": (384, 1000), "long": (2048, 500), "4k": (4096, 500),
                 "8k": (8192, 250)},
        check_questions=100,  # shipped with the export; tests/pretrained/ reruns it
    ))

    if name in CONTINUED:
        _, init_from, steps, lr = CONTINUED[name]
        c.train.update(num_steps=steps, init_from=init_from, first_batch=STEPS[rung])
        c.optim.learning_rate = lr
    if rung == "test":
        c.data.update(context_tokens=256, num_branches=4, batch_size=4)
        c.train.update(log_every=10, eval_every=0, eval_batches=1, checkpoint_every=10)
        c.optim.warmup_steps = 5
        c.eval.serving = ml_collections.ConfigDict({"in_range": (256, 10)})
        c.eval.check_questions = 5
    if "quick" in flags:
        c.train.num_steps = max(c.train.num_steps // 20, 10)
        c.train.update(log_every=5, eval_every=0, checkpoint_every=c.train.num_steps)
        c.optim.warmup_steps = min(c.optim.warmup_steps, c.train.num_steps // 2)
        c.eval.serving = ml_collections.ConfigDict({"in_range": (384, 50)})
        c.eval.check_questions = 10
    return c
