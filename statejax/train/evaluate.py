"""Held-out evaluation of a trained model: teacher-forced and through the serving path.

- teacher-forced: loss and exact-match of every answer on packed held-out batches (cheap;
  `trainer.train` also runs it every `eval_every` steps);
- serving: greedy answers through the real path — a `Session` with the prompt prefix, bars
  appended one by one, `query_batch` on branches with stop token "\\n" — compared with ground
  truth, per question type. This is the accuracy recorded in docs/ladder.md.

`packed_loss` is also the training objective (`trainer` imports it from here).
"""

import collections
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from statejax.budget import Budget
from statejax.data.market import format_bar
from statejax.errors import InputError
from statejax.model.config import ModelConfig
from statejax.model.llama import Transformer
from statejax.serving.session import Session
from statejax.tokenizer import ByteTokenizer
from statejax.train import data, tasks

# ---------------------------------------------------------------- packed loss (also training's)


def packed_logits(params, batch: data.Batch, cfg: ModelConfig, spec: data.PackSpec):
    """[B, T, V] float32 logits of packed sequences (context causal, branches isolated)."""
    view = data.PackedView.for_batch(batch, spec)
    logits, _ = Transformer(cfg).apply({"params": params}, batch.tokens, batch.positions,
                                       view)
    return logits


def packed_loss(params, batch: data.Batch, cfg: ModelConfig, spec: data.PackSpec):
    """Next-token loss of packed sequences; what training minimizes.

    Returns:
      (loss: [] float32 mean cross-entropy over tokens weighted by `batch.weights`,
       (logits: [B, T, V] float32, answer_loss: [] float32 mean over answer tokens)).
    """
    logits_BxTxV = packed_logits(params, batch, cfg, spec)
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch.targets)
    loss = jnp.sum(ce_BxT * batch.weights) / jnp.maximum(jnp.sum(batch.weights), 1e-6)
    answer_BxT = (batch.segments > 0) & (batch.weights > 0)
    answer_loss = jnp.sum(jnp.where(answer_BxT, ce_BxT, 0.0)) / jnp.maximum(
        jnp.sum(answer_BxT), 1)
    return loss, (logits_BxTxV, answer_loss)


# ---------------------------------------------------------------- teacher-forced


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _eval_step(params, batch: data.Batch, *, cfg: ModelConfig, spec: data.PackSpec):
    """(loss, answer loss, [B, M] bool: every answer token of branch m is the argmax)."""
    loss, (logits_BxTxV, answer_loss) = packed_loss(params, batch, cfg, spec)
    c, m, tb = spec.context_tokens, spec.num_branches, spec.branch_tokens
    b = batch.tokens.shape[0]
    correct = jnp.argmax(logits_BxTxV, -1) == batch.targets
    answer = (batch.segments > 0) & (batch.weights > 0)
    ok_BxMxTb = (correct | ~answer)[:, c:].reshape(b, m, tb)
    return loss, answer_loss, jnp.all(ok_BxMxTb, axis=-1)


def teacher_forced_eval(params, cfg: ModelConfig, spec: data.PackSpec, *, seed: int,
                        num_batches: int, batch_size: int) -> dict[str, Any]:
    """Loss and per-type exact-match of answers on held-out packed batches.

    Returns:
      {"loss", "answer_loss", "accuracy": {qtype: fraction}, "count": {qtype: n}}.
    """
    hits = np.zeros(len(tasks.QUESTION_TYPES))
    counts = np.zeros(len(tasks.QUESTION_TYPES))
    losses, answer_losses = [], []
    for i in range(num_batches):
        batch = data.make_batch(spec, seed=seed, step=i, batch_size=batch_size,
                                split=data.HELDOUT)
        loss, answer_loss, ok_BxM = jax.device_get(_eval_step(params, batch, cfg=cfg,
                                                              spec=spec))
        losses.append(float(loss))
        answer_losses.append(float(answer_loss))
        used = batch.qtypes >= 0
        np.add.at(hits, batch.qtypes[used], ok_BxM[used])
        np.add.at(counts, batch.qtypes[used], 1)
    return {"loss": float(np.mean(losses)), "answer_loss": float(np.mean(answer_losses)),
            **_per_type(hits, counts)}


# ---------------------------------------------------------------- serving path


def serving_budget(context_tokens: int, max_new_tokens: int = 12) -> Budget:
    """A Budget for evaluation sessions up to `context_tokens` tokens.

    Few shapes on purpose: one chunk size (a bar line or a question fits 64 tokens),
    power-of-two windows from 256, one branch-row bucket holding all question types.
    """
    cells = max(256, 1 << math.ceil(math.log2(context_tokens + 64)))
    windows = tuple(w for w in (256 << i for i in range(16)) if w <= cells)
    return Budget(cells=cells, page_size=16, chunk_sizes=(64,), windows=windows,
                  branch_rows=(8,), question_cells=48, max_new_tokens=max_new_tokens)


def serving_eval(params, cfg: ModelConfig, spec: data.PackSpec, *, seed: int,
                 num_questions: int, context_tokens: int, points_per_session: int = 2,
                 min_bars: int = 6, max_new_tokens: int = 12) -> dict[str, Any]:
    """Held-out answer accuracy per question type through `Session.query_batch` (greedy).

    Sessions hold `tasks.prompt_prefix()` and bars of held-out streams appended one line at a
    time, up to `context_tokens` tokens. At `points_per_session` random bar counts
    (>= `min_bars`) every question type is asked once, on branches, with stop token "\\n";
    the answer text must equal the ground truth exactly.

    Returns:
      {"accuracy": {qtype: fraction}, "count": {qtype: n}, "best_constant": {qtype: accuracy
      of the most common answer on the same questions (the chance level to beat)},
      "examples": first 10 (question, truth, answer) per type}.
    """
    budget = serving_budget(context_tokens, max_new_tokens)
    tok = ByteTokenizer()
    rng = np.random.default_rng([seed, data.HELDOUT])
    types = tasks.QUESTION_TYPES
    hits, counts = np.zeros(len(types)), np.zeros(len(types))
    examples: dict[str, list] = {q: [] for q in types}
    # Truths per type, to score the best constant answer on the same questions (for
    # high_index: the best fixed position in the window, "k bars back").
    truths: dict[str, collections.Counter] = {q: collections.Counter() for q in types}
    asked = 0
    while asked < num_questions:
        session = Session(params, cfg, budget, tok, prefix=tasks.prompt_prefix(),
                          stop_token=tasks.STOP_TOKEN)
        lines, bars, length = [], [], session.length
        for bar in data.bar_stream(rng, spec, data.HELDOUT):
            line = format_bar(bar)  # ASCII: one token per character
            if length + len(line) > context_tokens:
                break
            lines.append(line)
            bars.append(bar)
            length += len(line)
        choices = np.arange(min_bars, len(bars) + 1)
        points = set(rng.choice(choices, min(points_per_session, choices.size), replace=False))
        for n, line in enumerate(lines, start=1):
            session.append(line)
            if n not in points or asked >= num_questions:
                continue
            batch = [tasks.make_question(q, bars[:n], rng) for q in types]
            batch = batch[:num_questions - asked]
            answers = session.query_batch([q for q, _ in batch], [max_new_tokens] * len(batch))
            for i, ((question, truth), got) in enumerate(zip(batch, answers, strict=True)):
                hits[i] += got.text == truth
                counts[i] += 1
                truths[types[i]][str(bars[n - 1].index - int(truth)) if types[i] == "high_index"
                                 else truth] += 1
                if len(examples[types[i]]) < 10:
                    examples[types[i]].append([question, truth, got.text])
            asked += len(batch)
    best_constant = {q: max(c.values()) / sum(c.values()) if c else float("nan")
                     for q, c in truths.items()}
    return {**_per_type(hits, counts), "best_constant": best_constant, "examples": examples}


def _per_type(hits, counts) -> dict[str, Any]:
    acc = {q: (float(h / n) if n else float("nan"))
           for q, h, n in zip(tasks.QUESTION_TYPES, hits, counts, strict=True)}
    return {"accuracy": acc, "count": {q: int(n) for q, n in zip(tasks.QUESTION_TYPES, counts,
                                                                   strict=True)}}


# ---------------------------------------------------------------- reporting


def ladder_table(results: list[dict[str, Any]], context: str = "in_range") -> str:
    """A markdown table of serving accuracy per question type, one row per results.json."""
    types = tasks.QUESTION_TYPES
    head = ["rung", "params", "steps", "train time", "device", *types]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        acc = r["serving"][context]["accuracy"]
        minutes = r["train_seconds"] / 60
        rows.append("| " + " | ".join([
            r["config"], f"{r['num_params'] / 1e6:.2f}M", str(r["steps"]),
            f"{minutes:.0f} min", r["device"], *(f"{acc[q]:.2f}" for q in types)]) + " |")
    return "\n".join(rows)


def context_table(results: list[dict[str, Any]], qtype: str) -> str:
    """A markdown table of one question type's serving accuracy vs session length: one row
    per results.json, one column per evaluated context (shortest first), and the best
    constant answer of the first run as the chance row."""
    if qtype not in tasks.QUESTION_TYPES:
        raise InputError(f"unknown question type {qtype!r}; allowed: {tasks.QUESTION_TYPES}")
    names = sorted(results[0]["serving"],
                   key=lambda n: results[0]["serving"][n]["context_tokens"])
    head = ["rung", *(f"<= {results[0]['serving'][n]['context_tokens']} tokens"
                      for n in names)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rows.append("| " + " | ".join([r["config"], *(
            f"{r['serving'][n]['accuracy'][qtype]:.2f}" if n in r["serving"] else ""
            for n in names)]) + " |")
    chance = results[0]["serving"]
    rows.append("| " + " | ".join(["best constant answer", *(
        f"{chance[n]['best_constant'][qtype]:.2f}" for n in names)]) + " |")
    return "\n".join(rows)
