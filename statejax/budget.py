"""One frozen budget from which every array shape the device sees is derived.

The host pads work into these few shapes, so steady-state serving never recompiles:

- append steps: chunk length T in `chunk_sizes` x attention window S in `windows`;
- query steps: question length in `chunk_sizes` (<= `question_cells`) x branch rows R in
  `branch_rows` x window S; generation buffers are [R, max_new_tokens].
"""

import dataclasses

import numpy as np

from statejax.errors import InputError


def _default_windows(cells: int, page_size: int) -> tuple[int, ...]:
    # Powers of two and 1.5x powers of two: at most ~1.5x wasted attention, two shapes per
    # octave of context.
    sizes = set()
    w = max(page_size, 128)
    while w < cells:
        sizes.update({w, w * 3 // 2})
        w *= 2
    sizes.add(cells)
    return tuple(sorted(s for s in sizes if s <= cells and s % page_size == 0) or (cells,))


@dataclasses.dataclass(frozen=True)
class Budget:
    """Capacities of one session row.

    Attributes:
      cells: C, KV cells per session row (frozen prefix + data region). The Pallas
        attention kernels view a row's cells as pages of the largest power of two up
        to their KV step (128 cells at D = 64) that divides C: a multiple of 128 lets
        them read one page per step (`kernels.paged_flash.cells_page_size`).
      page_size: cells per page (prefix-cache hashing and window granularity).
      chunk_sizes: T buckets for appends and questions, ascending.
      windows: S buckets for attention over session cells; default derived from `cells`.
      branch_rows: R buckets for query branches evaluated together, ascending.
      question_cells: longest question, in tokens.
      max_new_tokens: longest generation; also the width of generation buffers.
    """

    cells: int = 4096
    page_size: int = 16
    chunk_sizes: tuple[int, ...] = (16, 64, 256)
    windows: tuple[int, ...] | None = None
    branch_rows: tuple[int, ...] = (1, 4, 16)
    question_cells: int = 64
    max_new_tokens: int = 256

    def __post_init__(self):
        for name in ("cells", "page_size", "question_cells", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise InputError(f"{name}={value!r}; allowed: a positive int")
        for name in ("chunk_sizes", "branch_rows", "windows"):
            values = getattr(self, name)
            if values is not None and any(isinstance(v, bool) or not isinstance(
                    v, int | np.integer) for v in values):
                raise InputError(f"{name}={values!r}; allowed: a tuple of ints")
        if self.cells % self.page_size:
            raise InputError(f"cells={self.cells} must be a multiple of page_size="
                             f"{self.page_size}")
        for name in ("chunk_sizes", "branch_rows"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise InputError(f"{name}={values} must be ascending positive integers")
        if self.windows is None:
            object.__setattr__(self, "windows", _default_windows(self.cells, self.page_size))
        if (not self.windows or self.windows[-1] != self.cells or self.windows[0] < 1
                or list(self.windows) != sorted(set(self.windows))):
            raise InputError(f"windows={self.windows} must be positive, ascend and end at "
                             f"cells={self.cells}")
        if self.question_cells > self.chunk_sizes[-1]:
            raise InputError(f"question_cells={self.question_cells} exceeds the largest chunk "
                             f"size {self.chunk_sizes[-1]}")

    @property
    def branch_cells(self) -> int:
        """Tb, private cells per branch: question plus generated tokens."""
        return self.question_cells + self.max_new_tokens

    @property
    def max_chunk(self) -> int:
        """The largest chunk an append step takes (`chunk_sizes[-1]`), in tokens."""
        return self.chunk_sizes[-1]

    def chunk_bucket(self, num_tokens: int) -> int:
        """Smallest chunk size >= num_tokens."""
        return _bucket(self.chunk_sizes, num_tokens, "chunk")

    def window_for(self, num_cells: int) -> int:
        """Smallest attention window >= num_cells."""
        return _bucket(self.windows, max(num_cells, 1), "window")

    def rows_bucket(self, num_rows: int) -> int:
        """Smallest branch-row bucket >= num_rows."""
        return _bucket(self.branch_rows, num_rows, "branch rows")

    def compiled_shapes(self) -> dict[str, int]:
        """Upper bound on the number of distinct step shapes (the compile budget)."""
        n_q = len([c for c in self.chunk_sizes if c <= self.question_cells]) + 1
        widths = 1 if self.max_new_tokens == 1 else 2  # first token only, or generation
        return {
            "append": len(self.chunk_sizes) * len(self.windows),
            "query": n_q * len(self.branch_rows) * len(self.windows) * widths,
        }


def _bucket(sizes: tuple[int, ...], n: int, what: str) -> int:
    for s in sizes:
        if s >= n:
            return s
    raise InputError(f"{n} exceeds the largest {what} bucket {sizes[-1]}")
