"""How a model's layer weights are laid out in argument buffers: per layer, stacked, packed.

A jitted step passes every leaf of its params as its own argument buffer, and the host's
dispatch costs per buffer (measurements in docs/kernels.md, "Weight layouts"). Two layouts
with fewer buffers, both read in place by the compiled steps (no weight is copied;
`statejax.perf.step_census` checks it):

- `"stacked"` (`stack_layers`): one [L, ...] leaf per kind of layer weight. Each layer's
  fusions read their own slice, so XLA compiles (and on a GPU autotunes) them per layer
  (a longer compile than per layer).
- `"packed"` (`pack_layers`): each layer's tree as whole rows of one [R, W] buffer (W the
  embedding width), plus the leaves that are not rows of W (Llama: `down_proj`, [E, F]).
  Every layer's leaves sit at the same rows of its own buffer, so the layers' fusions stay
  identical and compile once, as per layer. Only leaves whose own trailing axes make rows
  of W read in place: packed as one flat buffer, or with the down projection as rows of W
  (reshaped or transposed back), XLA copies their slices out every call.

Neither runs XLA's generation loop: there the one-token GEMMs do not read slices in place
and XLA copies the weights (every turn, or once per query before the loop), so `steps.query`
refuses both with `max_new_cap` > 1 unless the fused linear kernels compute the layers. The
steps take every layout (`per_layer` turns each into the tree the model applies); a laid-out
tree is a copy: keep one of the two.

Kernels read laid-out weights in place: a Pallas call takes whole buffers (handed a slice,
XLA copies it out first), so `per_layer(params, in_place=paths)` leaves the leaves at those
paths in their buffers as `LaidOutLeaf`s, which give the kernels a [rows, width] view of the
buffer and the rows to read (`kernels.fused_linear.BufferRows`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from statejax.errors import InputError
from statejax.kernels.fused_linear import BufferRows

LAYOUTS = ("per_layer", "stacked", "packed")
STACKED = "layers"  # the key of the stacked layers' tree (`stack_layers`)


@struct.dataclass
class LaidOutLeaf:
    """A layer's leaf left in its laid-out buffer: elements [offset, offset + size) of it in
    row-major order (a layer's slice of a stacked leaf, or rows of a packed layer).

    Attributes:
      buffer: the whole buffer ([L, ...] stacked, [R, W] packed).
      offset: static, the leaf's first element in the buffer.
      shape: static, the leaf's shape.
    """

    buffer: jax.Array
    offset: int = struct.field(pytree_node=False)
    shape: tuple = struct.field(pytree_node=False)

    @property
    def dtype(self):
        return self.buffer.dtype

    def rows(self, width: int) -> BufferRows:
        """The leaf as a [size / width, width] matrix read in place: rows of the buffer seen
        as [buffer size / width, width] (a free reshape). A vector leaf of `width` is one
        row. Raises unless the leaf is whole rows of `width`."""
        size = math.prod(self.shape)
        if size % width or self.offset % width or self.buffer.size % width:
            raise InputError(f"a leaf {self.shape} at element {self.offset} of a buffer "
                             f"{self.buffer.shape} is not whole rows of {width}")
        return BufferRows(self.buffer.reshape(-1, width), self.offset // width,
                          size // width)


@struct.dataclass
class PackedLayer:
    """One layer's weights as whole rows of one [R, W] buffer (`pack_layers`).

    Attributes:
      rows: [R, W] the layer's leaves that are whole rows of W by their own trailing axes.
      rest: the layer's other leaves, as they are (Llama: `mlp.down_proj.weight`, [E, F]).
      layout: static ((path, shape, first row), ...) of each leaf in `rows`; path: its keys
        in the layer's tree, e.g. ("attn", "q_proj", "weight").
    """

    rows: jax.Array
    rest: dict
    layout: tuple = struct.field(pytree_node=False)

    def unpack(self, in_place: frozenset = frozenset()) -> dict:
        """The layer's tree: each packed leaf a static slice of whole rows, reshaped (a view:
        inside a jitted step an XLA fusion reads it in place), or a `LaidOutLeaf` of `rows`
        where its path is in `in_place`."""
        tree = jax.tree.map(lambda x: x, self.rest)  # new dicts: `rest` stays as it is
        width = self.rows.shape[1]
        for path, shape, first in self.layout:
            if path in in_place:
                _put(tree, path, LaidOutLeaf(self.rows, first * width, shape))
                continue
            count = math.prod(shape) // width
            _put(tree, path, jax.lax.slice_in_dim(self.rows, first, first + count).reshape(shape))
        return tree


def _put(tree: dict, path: tuple, leaf):
    """tree[path[0]][path[1]]... = leaf, making the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = leaf


def layout_of(params) -> str:
    """Which of `LAYOUTS` params are in."""
    if STACKED in params:
        return "stacked"
    if any(isinstance(v, PackedLayer) for v in params.values()):
        return "packed"
    return "per_layer"


def lay_out(params, layout: str) -> dict:
    """Per-layer params in `layout` (`LAYOUTS`; "per_layer" returns them as they are)."""
    if layout not in LAYOUTS:
        raise InputError(f"weights layout {layout!r}; allowed: {LAYOUTS}")
    return {"per_layer": lambda p: p, "stacked": stack_layers, "packed": pack_layers}[layout](
        params)


def _layer_names(params, verb: str) -> list[str]:
    if layout_of(params) != "per_layer":
        raise ValueError(f"params are already {layout_of(params)}; {verb} takes per-layer "
                         "params")
    names = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))
    if not names:
        raise ValueError(f"no 'layer_<i>' entries to {verb}; params hold {sorted(params)}")
    return names


def stack_layers(params) -> dict:
    """Per-layer params -> one tree of [L, ...] leaves under "layers" in place of "layer_0"
    ... "layer_{L-1}" (the rest as is). Llama-3.2-1B: 22 argument buffers per query call."""
    names = _layer_names(params, "stack")
    rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
    return {**rest, STACKED: jax.tree.map(lambda *xs: jnp.stack(xs),
                                          *[params[k] for k in names])}


def pack_layers(params) -> dict:
    """Per-layer params -> each "layer_<i>" a `PackedLayer` (the rest as is).

    The row width W is the layer's embedding width (the size of its `input_norm` scale); a
    leaf goes into the rows when it has the layer's dtype and its trailing axes multiply to
    W (a [2048, 8192] weight as rows of 2048 does not: XLA copies such a slice out every
    call), in the layer's tree order, the one-row leaves (norm scales, biases) after the
    others: so a weight starts at a row that a kernel's row tile divides.
    """
    names = _layer_names(params, "pack")
    return {**params, **{k: _pack(params[k], k) for k in names}}


def _pack(layer, name: str) -> PackedLayer:
    try:
        norm = layer["input_norm"]["scale"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{name} has no input_norm scale to take the row width from") from e
    width, dtype = norm.shape[-1], norm.dtype
    leaves, rest = [], {}
    for path, x in jax.tree_util.tree_flatten_with_path(layer)[0]:
        keys = tuple(k.key for k in path)
        if x.dtype != dtype or not any(math.prod(x.shape[k:]) == width
                                       for k in range(x.ndim)):
            _put(rest, keys, x)
        else:
            leaves.append((keys, x))
    leaves.sort(key=lambda leaf: leaf[1].size == width)  # stable: one-row leaves last
    layout, first = [], 0
    for keys, x in leaves:
        layout.append((keys, tuple(x.shape), first))
        first += x.size // width
    rows = jnp.concatenate([jnp.reshape(x, (-1, width)) for _, x in leaves])
    return PackedLayer(rows=rows, rest=rest, layout=tuple(layout))


def per_layer(params, in_place: frozenset = frozenset()) -> dict:
    """The per-layer tree the model applies, from params in any layout (per-layer params come
    back as they are). Inside a jitted step each layer's leaves are static slices of the
    stacked or packed buffers; those at the paths in `in_place` (keys within a layer, e.g.
    ("attn", "q_proj", "weight")) are `LaidOutLeaf`s of their buffers instead, for kernels
    that read them in place (packed: the leaves in the rows; the rest are whole buffers)."""
    layout = layout_of(params)
    if layout == "packed":
        return {k: v.unpack(in_place) if isinstance(v, PackedLayer) else v
                for k, v in params.items()}
    if layout == "per_layer":
        return params
    stacked = params[STACKED]
    layers = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != STACKED}

    def layer_leaf(i, path, x):
        if tuple(k.key for k in path) in in_place:
            return LaidOutLeaf(x, i * math.prod(x.shape[1:]), tuple(x.shape[1:]))
        return x[i]

    return {**rest, **{f"layer_{i}": jax.tree_util.tree_map_with_path(
        functools.partial(layer_leaf, i), stacked) for i in range(layers)}}
