"""Flash queries on a trained model: accuracy, agreement with fresh evaluation, staleness.

The embedded default model (`statejax.pretrained`) watches a stream of synthetic bars. One
question per type is registered as a flash query. After every data update the stream is
flushed (ingest + idle-time re-evaluation) and each cached answer is scored three ways:

- against the ground truth computed from the bars (`statejax.train.tasks.answer`);
- against a fresh query on the same data (a flash answer must equal it exactly);
- by its age: how many items the cache was behind when asked right after the push, and how
  long the idle-time refresh took.

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


def run_flash_study(config) -> dict:
    """Runs the study in the module docstring.

    Args:
      config: ConfigDict with `model` ("default" or a folder written by
        `statejax.pretrained.save`), `seed`, `warmup_bars` (bars before the first question),
        `updates`, `bars_per_update`, `k` (window of the windowed questions), `cells`.

    Returns:
      {"model", "questions": per type {question, accuracy, agreement, mean_confidence_correct,
       mean_confidence_wrong, answer_changes}, "accuracy", "agreement", "hit_ms",
       "refresh_ms", "items_behind_before_refresh", "updates"}.
    """
    if config.model == "default":
        cfg, params, tokenizer, info = pretrained.load_default()
    else:
        cfg, params, tokenizer, info = pretrained.load(config.model)
    budget = Budget(cells=config.cells, chunk_sizes=(16, 32, 64, 256), question_cells=32,
                    max_new_tokens=16)
    session = Session(params, cfg, budget, tokenizer, prefix=info["prompt_prefix"],
                      stop_token=info["stop_token"], overflow="slide")
    questions = {q: tasks.format_question(q, 1 if q == "last_close" else config.k)
                 for q in tasks.QUESTION_TYPES}
    bars_stream = iter_synthetic_bars(seed=config.seed)
    bars = [next(bars_stream) for _ in range(config.warmup_bars)]
    scores = {q: {"correct": [], "agree": [], "confidence": [], "changes": 0}
              for q in questions}
    hit_s, refresh_s, behind = [], [], []
    with StreamingSession(session) as stream:
        ids = {stream.register(text, budget.max_new_tokens): q for q, text in questions.items()}
        stream.subscribe(lambda event: _count_change(scores, ids, event))
        for bar in bars:
            stream.push(bar)
        stream.flush()
        for _ in range(config.updates):
            new = [next(bars_stream) for _ in range(config.bars_per_update)]
            bars += new
            with stream.flash_paused():
                for bar in new:
                    stream.push(bar)
                stream.flush()
                # Asked now, the cache answers at once but is one update behind.
                behind.append(stream.ask(next(iter(ids))).items_behind)
            start = time.perf_counter()
            stream.flush()  # the idle-time re-evaluation of every registered question
            refresh_s.append(time.perf_counter() - start)
            for flash_id, q in ids.items():
                start = time.perf_counter()
                cached = stream.ask(flash_id)
                hit_s.append(time.perf_counter() - start)
                fresh = session.query(questions[q], budget.max_new_tokens)
                k = 1 if q == "last_close" else config.k
                s = scores[q]
                s["correct"].append(cached.answer.text.strip() == tasks.answer(q, bars, k))
                s["agree"].append(cached.hit and cached.answer.text == fresh.text)
                s["confidence"].append(cached.answer.confidence)
    per_type = {q: _summary(questions[q], s) for q, s in scores.items()}
    return {
        "model": {"name": cfg.name, "params": cfg.num_params,
                  "recorded_heldout_accuracy": info.get("heldout_accuracy")},
        "questions": per_type,
        "accuracy": float(np.mean([v["accuracy"] for v in per_type.values()])),
        "agreement": float(np.mean([v["agreement"] for v in per_type.values()])),
        "hit_ms": float(np.median(hit_s) * 1e3),
        "refresh_ms": float(np.median(refresh_s) * 1e3),
        "items_behind_before_refresh": int(np.median(behind)),
        "updates": config.updates,
        "context_tokens": session.length,
    }


def _count_change(scores, ids, event):
    if event.previous is not None:
        scores[ids[event.flash_id]]["changes"] += 1


def _summary(question: str, s: dict) -> dict:
    correct = np.asarray(s["correct"])
    confidence = np.asarray(s["confidence"])
    mean = lambda x: float(x.mean()) if x.size else None  # None: no such answers
    return {"question": question, "accuracy": float(correct.mean()),
            "agreement": float(np.mean(s["agree"])),
            "mean_confidence_correct": mean(confidence[correct]),
            "mean_confidence_wrong": mean(confidence[~correct]),
            "answer_changes": s["changes"]}


def flash_markdown(flash: dict) -> str:
    """The study as a markdown section."""
    lines = [
        "## Flash queries on the embedded model",
        "",
        f"- model `{flash['model']['name']}` ({flash['model']['params'] / 1e6:.2f}M params); "
        f"{flash['updates']} data updates, {flash['context_tokens']} context tokens at the end",
        f"- cached answer served in {flash['hit_ms']:.3f} ms (median); idle-time refresh of all "
        f"registered questions {flash['refresh_ms']:.1f} ms; asked between a push and its "
        f"refresh, the cache is {flash['items_behind_before_refresh']} item(s) behind",
        f"- mean accuracy vs ground truth {flash['accuracy']:.2f}; flash == fresh query "
        f"{flash['agreement']:.2f}",
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
