"""Training: exact ground truth, packed sequences in serving form, learning, exact resume."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.train import get_config
from statejax import attention, pretrained, steps
from statejax.checkpoint import orbax_io
from statejax.data.market import Bar, parse_bar
from statejax.errors import InputError
from statejax.model.llama import init_params
from statejax.tokenizer import ByteTokenizer
from statejax.train import data, evaluate, tasks, trainer

TOK = ByteTokenizer()

# Hand-made bars: (index, open, high, low, close); up = close > open.
_ROWS = [
    (10, 100.0, 101.0, 99.5, 100.5),  # up
    (11, 100.5, 103.0, 100.2, 101.8),  # up; highest high of the last 5
    (12, 101.8, 101.9, 100.0, 100.1),  # down
    (13, 100.1, 100.9, 99.0, 99.2),  # down
    (14, 99.2, 102.5, 99.1, 102.25),  # up; high ties with bar 15
    (15, 102.3, 102.5, 101.0, 101.5),  # down
]
BARS = [Bar(i, o, h, lo, c, 1000.0) for i, o, h, lo, c in _ROWS]


@pytest.mark.parametrize("qtype, bars, k, expected", [
    ("last_close", BARS, 1, "101.5"),
    ("last_close", BARS[:5], 1, "102.25"),
    ("direction", BARS, 3, "up"),  # 101.5 vs 100.1 (bar 12)
    ("direction", BARS[:4], 3, "down"),  # 99.2 vs 100.5 (bar 10)
    ("direction", BARS, 5, "up"),  # 101.5 vs 100.5 (bar 10)
    ("high_index", BARS, 3, "15"),  # 102.5 at bars 14 and 15: the latest
    ("high_index", BARS, 5, "11"),
    ("ma_side", BARS, 3, "above"),  # 101.5 vs mean(99.2, 102.25, 101.5) = 100.98
    ("ma_side", BARS[:4], 3, "below"),  # 99.2 vs mean(101.8, 100.1, 99.2) = 100.37
    ("ma_side", BARS, 5, "above"),  # 101.5 vs 100.97
    ("up_count", BARS, 3, "1"),
    ("up_count", BARS, 5, "2"),
])
def test_ground_truth_on_hand_made_bars(qtype, bars, k, expected):
    assert tasks.answer(qtype, bars, k) == expected


def test_ground_truth_is_exact_decimal():
    # Closes 0.1, 0.7, 0.4: the mean is exactly 0.4, but in floats 3 * 0.4 > 0.1 + 0.7 + 0.4.
    bars = [Bar(i, c, c, c, c, 1.0) for i, c in enumerate((0.1, 0.7, 0.4))]
    assert 3 * 0.4 > 0.1 + 0.7 + 0.4
    assert tasks.answer("ma_side", bars, 3) == "below"
    flat = [Bar(0, 5.0, 5.5, 4.5, 5.25, 1.0)] * 4
    assert tasks.answer("direction", flat, 3) == "flat"


def test_questions_need_enough_bars():
    assert tasks.valid_ks("direction", 5) == (3,)  # k=5 needs 6 bars
    assert tasks.valid_ks("up_count", 2) == ()
    with pytest.raises(InputError, match="needs 6 bars"):
        tasks.answer("direction", BARS[:5], 5)
    with pytest.raises(InputError, match="unknown question type"):
        tasks.format_question("volatility", 3)
    q, a = tasks.make_question("up_count", BARS[:4], np.random.default_rng(0))
    assert (q, a) == ("Q: up bars in last 3?\nA: ", "1")


# ---------------------------------------------------------------- packed sequences

SPEC = data.PackSpec(context_tokens=256, num_branches=6, branch_tokens=48)


def test_packed_sequences_are_well_formed():
    batch = data.make_batch(SPEC, seed=3, step=7, batch_size=4)
    c, tb = SPEC.context_tokens, SPEC.branch_tokens
    assert all(x.shape == (4, SPEC.seq_len) for x in batch[:6])
    assert batch.qtypes.shape == (4, SPEC.num_branches)
    for b in range(4):
        context = TOK.decode(batch.tokens[b, :c])
        assert context.startswith(tasks.prompt_prefix())
        assert np.allclose(batch.weights[b, :c][batch.tokens[b, 1:c + 1] != TOK.pad_id][:-1],
                           SPEC.context_weight)
        for j in np.flatnonzero(batch.qtypes[b] >= 0):
            s = c + j * tb
            slot = slice(s, s + tb)
            n_j = int(batch.context_limit[b, s])
            text = TOK.decode(batch.tokens[b, slot])
            question, rest = text.split("\nA: ")
            assert question.startswith("Q: ")
            answer_text = rest.split("\n")[0]
            # The loss covers exactly the answer and its newline, in order.
            assert TOK.decode(batch.targets[b, slot][batch.weights[b, slot] > 0]) == (
                answer_text + "\n")
            # The answer is the ground truth of the bars before the cut, which ends a line.
            lines = TOK.decode(batch.tokens[b, :n_j]).splitlines()
            assert context[n_j - 1] == "\n"
            bars = [parse_bar(line) for line in lines[1:]]
            qtype = tasks.QUESTION_TYPES[batch.qtypes[b, j]]
            k = int(re.findall(r"\d+", question)[0]) if qtype != "last_close" else 1
            assert answer_text == tasks.answer(qtype, bars, k)
            np.testing.assert_array_equal(batch.positions[b, slot], n_j + np.arange(tb))
            assert (batch.segments[b, slot] == j + 1).all()


def test_far_context_jump_leaves_question_windows_whole():
    spec = dataclasses.replace(SPEC, context_tokens=384, jump_prob=1.0, jump_max=4096)
    batch = data.make_batch(spec, seed=2, step=0, batch_size=4)
    c, tb = spec.context_tokens, spec.branch_tokens
    for b in range(4):
        steps_C = np.diff(batch.positions[b, :c])
        (jump,) = np.flatnonzero(steps_C != 1)  # exactly one gap, at a line boundary
        gap, jump_at = int(steps_C[jump]) - 1, int(jump) + 1
        assert gap >= 1 and batch.tokens[b, jump_at - 1] == ord("\n")
        for j in np.flatnonzero(batch.qtypes[b] >= 0):
            s = c + j * tb
            n_j = int(batch.context_limit[b, s])
            assert batch.positions[b, s] == n_j + gap
            # Every question reads at most 6 bars; all of them lie after the gap.
            assert np.sum(batch.tokens[b, jump_at:n_j] == ord("\n")) >= 6


def test_batches_are_pure_and_splits_differ():
    a = data.make_batch(SPEC, seed=1, step=5, batch_size=2)
    b = data.make_batch(SPEC, seed=1, step=5, batch_size=2)
    held = data.make_batch(SPEC, seed=1, step=5, batch_size=2, split=data.HELDOUT)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens, held.tokens)


def test_packed_view_matches_dense_mask_and_serving_forward(tiny):
    cfg, params = tiny
    batch = data.make_batch(SPEC, seed=0, step=0, batch_size=2)
    t = SPEC.seq_len
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, t, 4, 16))
    k, v = (jax.random.normal(key, (2, t, 2, 16)) for key in keys[1:])
    dense, _ = attention.attend(q, k, v, data.packed_mask(jnp.asarray(batch.segments),
                                                          jnp.asarray(batch.context_limit)))
    blocked, _ = data.PackedView.for_batch(batch, SPEC).update_and_attend(0, q, k, v)
    np.testing.assert_allclose(blocked, dense, atol=1e-5)

    # A branch sees exactly what a session query sees: context[:n_j] + branch, same positions.
    logits = jax.jit(evaluate.packed_logits, static_argnums=(2, 3))(params, batch, cfg, SPEC)
    s = SPEC.context_tokens + SPEC.branch_tokens  # branch 1 of row 0
    n_j = int(batch.context_limit[0, s])
    branch = batch.tokens[0, s:s + SPEC.branch_tokens]
    plain = steps.forward(params, jnp.asarray(
        np.concatenate([batch.tokens[0, :n_j], branch])[None]), cfg=cfg)
    np.testing.assert_allclose(logits[0, s:s + SPEC.branch_tokens], plain[0, n_j:], atol=2e-5)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An uninterrupted 12-step run of the test config (no evaluation yet)."""
    c = get_config("test")
    c.train.update(num_steps=12, checkpoint_every=4)
    workdir = tmp_path_factory.mktemp("whole")
    state, _ = trainer.train(c, workdir, evaluate=False)
    return c, workdir, state


def test_train_steps_reduce_loss(run):
    c, _, state = run
    cfg, spec = trainer.model_config(c), trainer.pack_spec(c)
    probe = data.make_batch(spec, seed=9, step=0, batch_size=4, split=data.HELDOUT)
    loss = lambda params: float(evaluate._eval_step(params, probe, cfg=cfg, spec=spec)[0])
    init = trainer.init_train_state(cfg, trainer.make_optimizer(c), c.train.seed)
    assert int(state.step) == c.train.num_steps
    assert loss(state.params) < loss(init.params) - 0.5


def test_resume_continues_to_the_identical_state(run, tmp_path):
    c, whole_dir, whole = run
    part, results = trainer.train(c, tmp_path, stop_after=5)  # "preempted" after step 5
    assert int(part.step) == 5 and results == {}
    log = tmp_path / "metrics.jsonl"
    with open(log, "a") as f:  # what a run killed at step 8, past that checkpoint, had logged
        f.writelines(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (6, 7))
        f.write('{"step": 8, "lo')  # the line the kill cut
    resumed, _ = trainer.train(c, tmp_path, evaluate=False)
    assert int(resumed.step) == c.train.num_steps
    # Each step logged once: the uninterrupted run's rows and the stop at step 5 (the killed
    # run's rows past its checkpoint are dropped).
    logged = lambda d: [json.loads(r)["step"] for r in (d / "metrics.jsonl").read_text()
                        .splitlines() if "loss" in json.loads(r)]  # noqa: E731
    assert logged(tmp_path) == sorted({5, *logged(whole_dir)}) and 9.0 not in [
        json.loads(r).get("loss") for r in log.read_text().splitlines()]
    for a, b in zip(jax.tree.leaves((whole.params, whole.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_finished_run_evaluates_and_exports(run):
    c, workdir, trained = run
    state, results = trainer.train(c, workdir)  # nothing left to train: evaluate, export
    assert int(state.step) == c.train.num_steps
    ev = results["serving"]["in_range"]
    assert sum(ev["count"].values()) == c.eval.serving.in_range[1]
    assert set(ev["accuracy"]) == set(tasks.QUESTION_TYPES)
    cfg, params, tok, info = pretrained.load(workdir / "export")
    assert cfg == trainer.model_config(c) and tok.name == TOK.name
    assert info["stop_token"] == 10 and info["prompt_prefix"] == tasks.prompt_prefix()
    assert info["heldout_accuracy"] == ev["accuracy"]
    assert sum(info["check_eval"]["accuracy"][q] >= 0 for q in tasks.QUESTION_TYPES) == 5
    restored, restored_cfg, tok_name = orbax_io.restore(workdir / "params")
    assert restored_cfg == cfg and tok_name == TOK.name
    for a, b, r in zip(jax.tree.leaves(params), jax.tree.leaves(trained.params),
                       jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(r, b)


def test_init_params_shape_of_ladder_configs():
    for rung in ("ladder-s", "ladder-m", "ladder-l"):
        cfg = trainer.model_config(get_config(rung))
        assert cfg.vocab_size >= TOK.vocab_size
        params = jax.eval_shape(lambda cfg=cfg: init_params(cfg, 0))
        assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params


def test_continued_run_starts_from_trained_params(run, tmp_path):
    c, workdir, trained = run
    trainer.train(c, workdir)  # (idempotent) evaluates and writes params/<step>
    cont = get_config("test")
    cont.train.update(num_steps=3, init_from=str(workdir / "params"),
                      first_batch=c.train.num_steps)
    first, _ = trainer.train(cont, tmp_path / "cont", stop_after=0, evaluate=False)
    assert int(first.step) == 0
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(trained.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    cfg, spec = trainer.model_config(c), trainer.pack_spec(c)
    probe = data.make_batch(spec, seed=9, step=0, batch_size=4, split=data.HELDOUT)
    loss = lambda params: float(evaluate._eval_step(params, probe, cfg=cfg, spec=spec)[0])
    done, _ = trainer.train(cont, tmp_path / "cont", evaluate=False)
    assert int(done.step) == 3
    init = trainer.init_train_state(cfg, trainer.make_optimizer(c), c.train.seed)
    assert loss(done.params) < loss(init.params) - 0.5  # kept what the base run learned


def test_continued_rung_config():
    c = get_config("ladder-l-long")
    base = get_config("ladder-l")
    assert c.model.to_dict() | {"name": "ladder-l"} == base.model.to_dict()
    assert c.train.init_from == "runs/ladder-l/params"
    assert c.train.first_batch == base.train.num_steps


def _results(config, accs, consts):
    serving = {name: {"context_tokens": ctx, "accuracy": {"last_close": a},
                      "best_constant": {"last_close": k}}
               for (name, ctx), a, k in zip((("long", 2048), ("in_range", 384)), accs, consts,
                                            strict=True)}
    return {"config": config, "serving": serving}


def test_context_table_orders_contexts_and_adds_chance():
    table = evaluate.context_table([_results("s", (0.4, 0.7), (0.01, 0.02)),
                                    _results("l", (0.8, 0.9), (0.03, 0.04))], "last_close")
    lines = table.splitlines()
    assert lines[0] == "| rung | <= 384 tokens | <= 2048 tokens |"
    assert lines[2:] == ["| s | 0.70 | 0.40 |", "| l | 0.90 | 0.80 |",
                         "| best constant answer | 0.02 | 0.01 |"]
    with pytest.raises(InputError, match="unknown question type"):
        evaluate.context_table([], "close")
