"""Where the steps' per-call inputs sit in their argument lists, for the profilers.

A session passes the question's arrays anew on every call and keeps its scalars (row, stop
token, temperature, vocabulary) on the device; the PRNG key is made once per seed. The step
census and profile read these positions to tell the two apart.
"""

# `steps.query(params, state, row, question_RxT, question_len_R, max_new_R, stop_token,
# temperature, rng, valid_vocab)`.
QUERY_PER_CALL_ARGS = (3, 4, 5)
QUERY_SCALAR_ARGS = (2, 6, 7, 9)
# `steps.query_packed(params, state, row, request_RxT2, stop_token, temperature, rng,
# valid_vocab)`: one per-call array (`serving.packing.pack_question`), the same scalars.
QUERY_PACKED_PER_CALL_ARGS = (3,)
QUERY_PACKED_SCALAR_ARGS = (2, 4, 5, 7)
# `steps.append(params, state, tokens_BxT, num_new_B)`: the chunk.
APPEND_PER_CALL_ARGS = (2, 3)
