"""Host-side packing of a query batch into `steps.query_packed`'s one array, and back.

Each host transfer has its own fixed cost on a GPU, so a query sends one array in and gets
one array out (`docs/serving.md`).
"""

import numpy as np

from statejax.budget import Budget
from statejax.serving.question import Question


def pack_question(question_RxT, question_len_R, max_new_R) -> np.ndarray:
    """A query's per-call arrays as one host array for `steps.query_packed`.

    Args:
      question_RxT: [R, T] int question tokens, padded.
      question_len_R: [R] int valid tokens per row.
      max_new_R: [R] int tokens to generate per row (0: a padding row).

    Returns:
      [R, T + 2] int32: the question tokens, then its length, then the tokens to generate.
    """
    question_RxT = np.asarray(question_RxT, np.int32)
    return np.concatenate([question_RxT, np.asarray(question_len_R, np.int32)[:, None],
                           np.asarray(max_new_R, np.int32)[:, None]], axis=1)


def pack_questions(questions: list[Question], budget: Budget) -> np.ndarray:
    """Questions padded into the budget's buckets and packed for `steps.query_packed`.

    Args:
      questions: R' prepared questions, 1 <= R' <= budget.branch_rows[-1].

    Returns:
      [R, T + 2] int32 (`pack_question`), R = budget.rows_bucket(R'), T = the chunk bucket of
      the longest question; rows beyond R' are padding (max_new 0).
    """
    r = budget.rows_bucket(len(questions))
    t = budget.chunk_bucket(max(q.ids.size for q in questions))
    request_RxT2 = np.zeros((r, t + 2), np.int32)
    request_RxT2[:, t] = 1  # padding rows: one (ignored) question token, nothing to generate
    for i, q in enumerate(questions):
        request_RxT2[i, :q.ids.size] = q.ids
        request_RxT2[i, t], request_RxT2[i, t + 1] = q.ids.size, q.max_new_tokens
    return request_RxT2


def unpack_answer(answer_Rx2G1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`steps.query_packed`'s answer on the host (one transfer) -> its three arrays.

    Args:
      answer_Rx2G1: [R, 2G + 1] int32: tokens, num_tokens, then gaps as float32 bits.

    Returns:
      (tokens [R, G] int32, num_tokens [R] int32, gaps [R, G] float32), as `steps.Generation`.
    """
    answer = np.asarray(answer_Rx2G1)
    g = (answer.shape[1] - 1) // 2
    return answer[:, :g], answer[:, g], np.ascontiguousarray(answer[:, g + 1:]).view(np.float32)
