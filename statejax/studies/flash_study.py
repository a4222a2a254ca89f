"""Flash queries on a trained model: accuracy, agreement with fresh evaluation, staleness.

A trained model (by default the embedded one, `statejax.pretrained`) watches a stream of
synthetic bars. One question per type is registered as a flash query. After every data update
the stream is flushed (ingest + idle-time re-evaluation) and each cached answer is scored three
ways:

- against the ground truth computed from the bars (`statejax.train.tasks.answer`);
- against a fresh answer from a second session that shares nothing with the flash path: it
  prefills the same token history from scratch in one append (other chunks, other cells) and
  answers each question alone (the flash path answers them as one batch);
- by its age: asked after a push and before its refresh, how many items the cache is behind,
  beside the count of items pushed since the last refresh (from the push sequence numbers).

Every scored answer is returned as a record, so the scores can be recomputed from the data.
`experiments/stream_latency.py` runs this after the latency study, so the main job shows
registered questions answered from cache out of the box.
"""

import time

import numpy as np

from statejax import pretrained
from statejax.budget import Budget
from statejax.data.market import iter_synthetic_bars
from statejax.serving.session import Session
from statejax.serving.streaming import StreamingSession
from statejax.train import tasks


def window(question_type: str, k: int) -> int:
    """The bars a question type reads: 1 for the last close, else the config's window `k`."""
    return 1 if question_type == "last_close" else k


def run_flash_study(config) -> dict:
    """Runs the study in the module docstring.

    Args:
      config: ConfigDict with `model` ("default" or a folder written by
        `statejax.pretrained.save`), `seed`, `warmup_bars` (bars before the first question),
        `updates`, `bars_per_update`, `k` (window of the windowed questions), `cells` (the
        stream must fit: nothing slides, so the fresh session holds the same history).

    Returns:
      {"model", "questions": per type {question, accuracy, agreement, mean_confidence_correct,
       mean_confidence_wrong, answer_changes}, "accuracy", "agreement", "hit_ms", "refresh_ms",
       "items_behind_before_refresh" (median), "staleness": per update {items_behind,
       pushed_since_refresh, hit}, "records": per update and question {update, bars,
       question_type, text, fresh_text, hit, items_behind, confidence}, "updates",
       "context_tokens", "seed", "k"}.

    Raises:
      ItemsRefusedError: the bars outgrew `cells` (no answer is scored on partial data).
    """
    if config.model == "default":
        cfg, params, tokenizer, info = pretrained.load_default()
    else:
        cfg, params, tokenizer, info = pretrained.load(config.model)
    budget = Budget(cells=config.cells, chunk_sizes=(16, 32, 64, 256), question_cells=32,
                    max_new_tokens=16)
    stop = info["stop_token"]
    session = Session(params, cfg, budget, tokenizer, prefix=info["prompt_prefix"],
                      stop_token=stop)
    fresh = Session(params, cfg, budget, tokenizer, stop_token=stop)
    questions = {q: tasks.format_question(q, window(q, config.k)) for q in tasks.QUESTION_TYPES}
    bars_stream = iter_synthetic_bars(seed=config.seed)
    bars = [next(bars_stream) for _ in range(config.warmup_bars)]
    changes = dict.fromkeys(questions, 0)
    records, staleness, hit_s, refresh_s = [], [], [], []
    with StreamingSession(session) as stream:
        ids = {stream.register(text, budget.max_new_tokens): q for q, text in questions.items()}
        stream.subscribe(lambda event: _count_change(changes, ids, event))
        for bar in bars:
            last_seq = stream.push(bar)
        stream.flush()
        refreshed_seq = last_seq  # the newest item every cached answer reflects
        for update in range(config.updates):
            new = [next(bars_stream) for _ in range(config.bars_per_update)]
            bars += new
            with stream.flash_paused():
                for bar in new:
                    last_seq = stream.push(bar)
                stream.flush()
                stale = stream.ask(next(iter(ids)))
            staleness.append({"items_behind": stale.items_behind,
                              "pushed_since_refresh": last_seq - refreshed_seq,
                              "hit": stale.hit})
            start = time.perf_counter()
            stream.flush()  # the idle-time re-evaluation of every registered question
            refresh_s.append(time.perf_counter() - start)
            refreshed_seq = last_seq
            fresh.truncate(0)
            fresh.append(session.tokens)
            for flash_id, q in ids.items():
                start = time.perf_counter()
                cached = stream.ask(flash_id)
                hit_s.append(time.perf_counter() - start)
                records.append({
                    "update": update, "bars": len(bars), "question_type": q,
                    "text": cached.answer.text,
                    "fresh_text": fresh.query(questions[q], budget.max_new_tokens).text,
                    "hit": cached.hit, "items_behind": cached.items_behind,
                    "confidence": cached.answer.confidence})
    per_type = {q: _summary(questions[q], [r for r in records if r["question_type"] == q],
                            bars, config.k, changes[q]) for q in questions}
    return {
        "model": {"name": cfg.name, "params": cfg.num_params,
                  "recorded_heldout_accuracy": info.get("heldout_accuracy")},
        "questions": per_type,
        "accuracy": float(np.mean([v["accuracy"] for v in per_type.values()])),
        "agreement": float(np.mean([v["agreement"] for v in per_type.values()])),
        "hit_ms": float(np.median(hit_s) * 1e3),
        "refresh_ms": float(np.median(refresh_s) * 1e3),
        "items_behind_before_refresh": int(np.median([s["items_behind"] for s in staleness])),
        "staleness": staleness,
        "records": records,
        "updates": config.updates,
        "context_tokens": session.length,
        "seed": config.seed,
        "k": config.k,
    }


def _count_change(changes, ids, event):
    if event.previous is not None:
        changes[ids[event.flash_id]] += 1


def is_correct(record: dict, bars, k: int) -> bool:
    """Whether a record's cached answer equals the ground truth over its first
    `record["bars"]` bars (`bars`: the stream's bars, at least that many)."""
    q = record["question_type"]
    return record["text"].strip() == tasks.answer(q, bars[:record["bars"]], window(q, k))


def _summary(question: str, records: list[dict], bars, k: int, changes: int) -> dict:
    correct = np.asarray([is_correct(r, bars, k) for r in records], bool)
    confidence = np.asarray([r["confidence"] for r in records])
    mean = lambda x: float(x.mean()) if x.size else None  # None: no such answers
    # A miss agrees with nothing: it was not served from the cache.
    agree = [r["hit"] and r["text"] == r["fresh_text"] for r in records]
    return {"question": question, "accuracy": float(correct.mean()),
            "agreement": float(np.mean(agree)),
            "mean_confidence_correct": mean(confidence[correct]),
            "mean_confidence_wrong": mean(confidence[~correct]),
            "answer_changes": changes}


def flash_markdown(flash: dict) -> str:
    """The study as a markdown section."""
    pushed = flash.get("staleness", [{}])[-1].get("pushed_since_refresh")
    of_pushed = "" if pushed is None else f" ({pushed} pushed since its refresh)"
    lines = [
        "## Flash queries on the embedded model",
        "",
        f"- model `{flash['model']['name']}` ({flash['model']['params'] / 1e6:.2f}M params); "
        f"{flash['updates']} data updates, {flash['context_tokens']} context tokens at the end",
        f"- cached answer served in {flash['hit_ms']:.3f} ms (median); idle-time refresh of all "
        f"registered questions {flash['refresh_ms']:.1f} ms; asked between a push and its "
        f"refresh, the cache is {flash['items_behind_before_refresh']} item(s) behind"
        f"{of_pushed}",
        f"- mean accuracy vs ground truth {flash['accuracy']:.2f}; flash == fresh query "
        f"{flash['agreement']:.2f} (a second session prefilled from scratch)",
        "",
        "| question | accuracy | flash == fresh | confidence (right / wrong) | answer changes |",
        "|---|---:|---:|---|---:|",
    ]
    for q in flash["questions"].values():
        question = " ".join(q["question"].split())  # one table line: "Q: ... A:"
        right, wrong = (_fmt(q[f"mean_confidence_{k}"]) for k in ("correct", "wrong"))
        lines.append(f"| `{question}` | {q['accuracy']:.2f} | {q['agreement']:.2f} "
                     f"| {right} / {wrong} | {q['answer_changes']} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
