"""The axis legend used in names and docstrings across statejax.

Arrays carry their shape in their name (`k_LxBxCxKxD`) or in the docstring. Letters:

  L  layers                      B  session rows (batch of sessions)
  T  new tokens in this step     S  cached tokens attended to (a KV window)
  C  cells per session row       R  branch rows (queries evaluated together)
  G  generated tokens            Tb cells per branch row
  H  query heads                 K  key/value heads (GQA: H % K == 0)
  D  head dim                    E  model width (embedding dim)
  F  MLP hidden width            V  vocabulary
"""

import jax

Array = jax.Array
