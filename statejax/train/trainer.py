"""Next-token training with optax on packed question sequences; orbax checkpoints.

`train(config, workdir)` runs the whole job: it resumes from the latest checkpoint in
`workdir/checkpoints` if there is one (batches are a pure function of the step, so a resumed
run reaches bit-identical params), logs progress, checkpoints periodically (with teacher-forced
held-out evaluation every `eval_every` steps), and ends with the held-out evaluation of
`statejax.train.evaluate` (teacher-forced and through the serving path) and an export.
"""

import dataclasses
import datetime
import functools
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct

from statejax import pretrained
from statejax.checkpoint import orbax_io
from statejax.model.config import ModelConfig
from statejax.model.llama import init_params
from statejax.tokenizer import ByteTokenizer
from statejax.train import data, tasks
from statejax.train.evaluate import packed_loss, serving_eval, teacher_forced_eval


@struct.dataclass
class TrainState:
    """Everything a resumed run needs (the data stream is a function of `step`).

    Attributes:
      step: [] int32 optimizer steps taken.
      params: model parameters.
      opt_state: optax state (adamw moments, schedule count).
    """

    step: jax.Array
    params: Any
    opt_state: Any


# ---------------------------------------------------------------- config -> typed objects


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    """The `model` block of a train config as a `ModelConfig`."""
    return ModelConfig(**c.model.to_dict())


def pack_spec(c: ml_collections.ConfigDict) -> data.PackSpec:
    """The `data` block of a train config (minus the batch size) as a `PackSpec`."""
    fields = c.data.to_dict()
    fields.pop("batch_size")
    return data.PackSpec(**fields)


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to 10%, after global-norm clipping.

    Weight decay applies to matrices only (not to norm scales).
    """
    return _optimizer(**c.optim.to_dict(), num_steps=c.train.num_steps)


def _optimizer(*, learning_rate, warmup_steps, b1, b2, weight_decay, grad_clip, num_steps):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(num_steps, warmup_steps + 1),
        end_value=learning_rate * 0.1)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int):
    """A fresh `TrainState`: step 0, `init_params(cfg, seed)`, `tx`'s optimizer state."""
    params = init_params(cfg, seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# ---------------------------------------------------------------- steps


def make_train_step(cfg: ModelConfig, spec: data.PackSpec, tx: optax.GradientTransformation):
    """Returns `train_step(state, batch) -> (state, metrics)`, jitted. Donates `state`.

    metrics: {"loss", "answer_loss", "grad_norm"} float32 scalars.
    """

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(state: TrainState, batch: data.Batch):
        (loss, (_, answer_loss)), grads = jax.value_and_grad(packed_loss, has_aux=True)(
            state.params, batch, cfg, spec)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "answer_loss": answer_loss,
                   "grad_norm": optax.tree.norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


# ---------------------------------------------------------------- the job


def checkpoint_manager(workdir, every: int) -> ocp.CheckpointManager:
    """orbax manager for `workdir/checkpoints`: a save every `every` steps, the last two kept."""
    # Synchronous saves: the next train step donates the state's buffers.
    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=every,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def train(c: ml_collections.ConfigDict, workdir, *, stop_after: int | None = None,
          evaluate: bool = True):
    """Trains (or resumes) to `c.train.num_steps`, then evaluates and exports.

    Args:
      c: a config from configs/train.py.
      workdir: checkpoints, metrics.jsonl, results.json and export/ go here.
      stop_after: end this run after that many total steps, without the final evaluation
        (simulates a preemption; a later call resumes).
      evaluate: run the final evaluation and export when `c.train.num_steps` is reached.

    Returns:
      (final TrainState, results dict; empty when stopped early or not evaluating).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, spec, t = model_config(c), pack_spec(c), c.train
    tx, train_step = _compiled(cfg, spec, tuple(sorted(c.optim.to_dict().items())),
                               t.num_steps)
    mngr = checkpoint_manager(workdir, t.checkpoint_every)
    # One device, committed either way, so a resumed run hits the same compiled step.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if mngr.latest_step() is None:
        state = jax.device_put(init_train_state(cfg, tx, t.seed), device)
        if t.get("init_from"):
            # Continue from trained params (same shapes) with a fresh optimizer and schedule.
            params, _, _ = orbax_io.restore(t.init_from, cfg=cfg)
            state = state.replace(params=jax.device_put(params, device),
                                  opt_state=jax.device_put(tx.init(params), device))
            logging.info("params initialised from %s", t.init_from)
    else:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(lambda: init_train_state(cfg, tx, t.seed)))
        state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    logging.info("model %s: %d params; T=%d tokens, batch %d", cfg.name, cfg.num_params,
                 spec.seq_len, c.data.batch_size)
    end = t.num_steps if stop_after is None else min(stop_after, t.num_steps)
    step = int(state.step)
    start_time, start_step = time.perf_counter(), step
    # Training wall time, summed over resumed runs (as of the latest checkpoint).
    timing = workdir / "train_seconds.json"
    seconds_before = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
    elapsed = lambda: seconds_before + time.perf_counter() - start_time
    first = t.get("first_batch", 0)  # a continued run draws batches after its base run's
    batches = _batches(spec, t.seed, c.data.batch_size, first + step, first + end,
                       t.data_workers)
    _drop_rows_after(workdir / "metrics.jsonl", step)  # a run killed after its checkpoint
    with open(workdir / "metrics.jsonl", "a") as log:
        while step < end:
            state, metrics = train_step(state, next(batches))
            step += 1
            if step % t.log_every == 0 or step == end:
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                rate = (step - start_step) / (time.perf_counter() - start_time)
                logging.info("step %d/%d loss %.4f answer_loss %.4f (%.2f steps/s)", step,
                             t.num_steps, row["loss"], row["answer_loss"], rate)
                log.write(json.dumps({"step": step, **row}) + "\n")
                log.flush()
            if t.eval_every and step % t.eval_every == 0 and step < t.num_steps:
                ev = teacher_forced_eval(state.params, cfg, spec, seed=t.seed,
                                         num_batches=t.eval_batches,
                                         batch_size=c.data.batch_size)
                logging.info("step %d held-out loss %.4f, teacher-forced accuracy %s", step,
                             ev["loss"], _fmt(ev["accuracy"]))
                log.write(json.dumps({"step": step, "heldout": ev}) + "\n")
            if mngr.save(step, args=ocp.args.StandardSave(state), force=step == end):
                timing.write_text(json.dumps({"step": step, "seconds": elapsed()}))
    mngr.wait_until_finished()
    if step < t.num_steps or not evaluate:
        return state, {}
    return state, finish(c, workdir, state, elapsed())


def _drop_rows_after(path: Path, step: int):
    """Keeps the metric rows of steps <= `step` (the checkpoint resumed from): the rows a
    killed run logged after its last checkpoint are logged again by the resumed run."""
    if not path.exists():
        return
    rows = path.read_text().splitlines(keepends=True)
    kept = [r for r in rows if _logged_step(r) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(kept))


def _logged_step(row: str) -> float:
    """The step of a metrics row; inf for a line a killed run left half written."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


@functools.lru_cache(maxsize=4)
def _compiled(cfg: ModelConfig, spec: data.PackSpec, optim: tuple, num_steps: int):
    """(optimizer, jitted train step), cached so that repeated runs (resume, notebooks,
    tests) in one process compile once."""
    tx = _optimizer(**dict(optim), num_steps=num_steps)
    return tx, make_train_step(cfg, spec, tx)


def _batches(spec: data.PackSpec, seed: int, batch_size: int, start: int, end: int,
             workers: int):
    """Training batches for steps [start, end), made by `workers` processes if > 0.

    Workers only speed up the host side (a GPU step is faster than making a batch in
    Python); batch i is the same either way.
    """
    jobs = ((spec, seed, step, batch_size) for step in range(start, end))
    if workers <= 0:
        yield from map(_batch_at, jobs)
        return
    # spawn, not fork: forking a process that runs JAX's threads can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_batch_at, jobs, chunksize=4)


def _batch_at(job) -> data.Batch:
    spec, seed, step, batch_size = job
    return data.make_batch(spec, seed=seed, step=step, batch_size=batch_size)


def finish(c, workdir, state: TrainState, train_seconds: float):
    """Final evaluation; writes results.json, params/<step> (orbax) and export/ (shippable)."""
    cfg, spec, t, e = model_config(c), pack_spec(c), c.train, c.eval
    tf = teacher_forced_eval(state.params, cfg, spec, seed=t.seed, num_batches=t.eval_batches,
                             batch_size=c.data.batch_size)
    logging.info("final teacher-forced accuracy %s", _fmt(tf["accuracy"]))
    results = {
        "config": c.variant, "model": dataclasses.asdict(cfg), "num_params": cfg.num_params,
        "steps": int(state.step), "batch_size": c.data.batch_size, "seq_len": spec.seq_len,
        "train_seconds": round(train_seconds, 1),
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
        "date": datetime.date.today().isoformat(), "teacher_forced": tf, "serving": {},
    }
    for name, (context, num_questions) in e.serving.items():
        t0 = time.perf_counter()
        ev = serving_eval(state.params, cfg, spec, seed=e.seed, num_questions=num_questions,
                          context_tokens=context, max_new_tokens=e.max_new_tokens)
        ev["context_tokens"], ev["seconds"] = context, round(time.perf_counter() - t0, 1)
        results["serving"][name] = ev
        logging.info("serving accuracy (%s, %d questions, contexts <= %d tokens) %s", name,
                     num_questions, context, _fmt(ev["accuracy"]))
    # A small fixed held-out stream, rerun on the shipped model by
    # tests/pretrained/test_pretrained.py.
    check_context = e.serving["in_range"][0]
    check = serving_eval(state.params, cfg, spec, seed=e.seed, num_questions=e.check_questions,
                         context_tokens=check_context, max_new_tokens=e.max_new_tokens)
    workdir = Path(workdir)
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    # The final params twice: a statejax orbax checkpoint (params + config + tokenizer) and
    # the msgpack folder format that ships inside the package.
    if not (workdir / "params" / str(results["steps"])).exists():
        orbax_io.save(workdir / "params", state.params, cfg, ByteTokenizer.name,
                      step=results["steps"])
    pretrained.save(workdir / "export", state.params, cfg, {
        "prompt_prefix": tasks.prompt_prefix(), "stop_token": tasks.STOP_TOKEN,
        "question_template": "Q: <question>\nA: ", "question_types": list(tasks.QUESTION_TYPES),
        "heldout_accuracy": results["serving"]["in_range"]["accuracy"],
        "heldout_accuracy_long_context": {
            name: ev["accuracy"] for name, ev in results["serving"].items()
            if name != "in_range"},
        # Enough to rerun the same small held-out evaluation (as
        # tests/pretrained/test_pretrained.py does).
        "check_eval": {"seed": e.seed, "num_questions": e.check_questions,
                       "context_tokens": check_context, "max_new_tokens": e.max_new_tokens,
                       "pack_spec": dataclasses.asdict(spec), "accuracy": check["accuracy"]},
        "heldout_count": results["serving"]["in_range"]["count"],
        "training": {k: results[k] for k in ("config", "num_params", "steps", "batch_size",
                                               "seq_len", "train_seconds", "device", "jax",
                                               "date")},
    })
    return results


def quiet_checkpoint_logs():
    """Drops orbax's INFO lines (a dozen per save) from the absl log; warnings stay."""
    import logging as py_logging

    keep = lambda record: record.levelno > py_logging.INFO or "orbax" not in record.pathname
    logging.get_absl_handler().addFilter(keep)


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{q}={a:.2f}" for q, a in acc.items())
