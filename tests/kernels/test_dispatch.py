"""The kernels' structure and dispatch: no import cycles, one place that picks the kernel.

The import graph is read from the sources with `ast` (every `import`, at module level or inside
a function), so a lazy import that closes a cycle counts as one.
"""

import ast
import pathlib

import jax.numpy as jnp
import pytest

from statejax import cache
from statejax.errors import InputError
from statejax.kernels import cascade_attention as ca
from statejax.kernels import dispatch

KERNELS = pathlib.Path(dispatch.__file__).parent


def import_graph(directory: pathlib.Path, package: str = "statejax.kernels") -> dict:
    """{module: set of sibling modules it imports} for the .py files of one package."""
    modules = {p.stem for p in directory.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        edges = set()
        for node in ast.walk(ast.parse((directory / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1 and not base:  # from . import x
                    edges |= {a.name for a in node.names}
                elif node.level == 1:  # from .x import y
                    edges.add(base.split(".")[0])
                elif base == package:  # from statejax.kernels import x
                    edges |= {a.name for a in node.names}
                elif base.startswith(package + "."):
                    edges.add(base[len(package) + 1:].split(".")[0])
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(package + "."):
                        edges.add(a.name[len(package) + 1:].split(".")[0])
        graph[name] = edges & modules
    return graph


def cycles(graph: dict) -> list[list[str]]:
    """Every module that is in an import cycle, with one cycle through it."""
    found = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append(path + [start])
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_cycle_finder_finds_a_lazy_import_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from statejax.kernels import a\n")
    (tmp_path / "c.py").write_text("from .a import x\n")
    assert cycles(import_graph(tmp_path)) == [["a", "b", "a"], ["b", "a", "b"]]


def test_no_module_of_the_kernels_is_in_an_import_cycle():
    assert cycles(import_graph(KERNELS)) == []


def test_portable_kernels_do_not_import_the_mosaic_variants():
    graph = import_graph(KERNELS)
    for portable in ("paged_flash", "append_attention", "decode_attention"):
        assert not graph[portable] & {"append_attention_mgpu", "decode_attention_mgpu",
                                      "mosaic_common", "dispatch"}, portable
    assert not any("dispatch" in edges for edges in graph.values())  # chosen from above


def test_impls_have_one_home():
    assert cache.IMPLS is dispatch.IMPLS
    assert cache.pallas_interpret() == dispatch.interpret()


@pytest.mark.parametrize("impl", ["Pallas", "reference", "triton", ""])
def test_an_unknown_or_misrouted_impl_raises(impl):
    with pytest.raises(InputError, match=r"impl=.*allowed here: \('pallas', 'pallas-mosaic'\)"):
        dispatch.plan_append(impl, batch=1, tokens=1, heads=4, k_heads=1, head_dim=64,
                             cells=1024, window=1024, itemsize=2)


def test_a_view_with_an_unknown_impl_raises():
    cells = jnp.zeros((1, 1, 16, 1, 16))
    view = cache.AppendView(k=cells, v=cells, lengths=jnp.zeros((1,), jnp.int32),
                            num_new=jnp.ones((1,), jnp.int32), window=16, impl="pallas-gpu")
    new = jnp.ones((1, 1, 1, 16))
    with pytest.raises(ValueError, match="allowed here"):
        view.update_and_attend(0, new, new, new)


def _plan(impl="pallas", **shape):
    shape = dict(batch=1, tokens=32, heads=32, k_heads=8, head_dim=64, cells=32768,
                 window=32768, itemsize=2) | shape
    return dispatch.plan_append(impl, **shape)


def test_append_plan_splits_long_windows_only():
    """A chunk whose decode tiles split a window of >= SPLIT_APPEND_BLOCKS KV blocks goes to
    the split decode kernel; a short window, or many rows, to the append kernel."""
    long = _plan()
    assert (long.kernel, long.backend) == ("decode", "triton")
    assert long.block_sizes.num_splits > 1
    blocks = long.block_sizes.block_k * dispatch.SPLIT_APPEND_BLOCKS
    short = _plan(cells=blocks // 2, window=blocks // 2)
    assert (short.kernel, short.block_sizes) == ("append", None)
    assert _plan(batch=64, tokens=512).kernel == "append"  # enough programs unsplit


def test_mosaic_impl_plans_the_hopper_append_compiled():
    plan = _plan("pallas-mosaic")
    assert (plan.kernel, plan.backend, plan.interpret) == ("append", "mosaic_gpu", False)


def test_every_view_declares_the_model_interface():
    cells = jnp.zeros((1, 1, 16, 1, 16))
    n = jnp.zeros((1,), jnp.int32)
    views = [cache.FullView(),
             cache.AppendView(k=cells, v=cells, lengths=n, num_new=n, window=16),
             cache.BranchView(shared_k=cells, shared_v=cells, row=n[0], shared_len=n[0],
                              branch_kv=None, branch_lengths=n, num_new=n, window=16,
                              impl="pallas")]
    assert all(isinstance(v, cache.View) for v in views)
    assert [v.one_qkv_buffer for v in views] == [False, False, True]
    assert not dataclass_fields_named(views[0], "one_qkv_buffer")  # not a pytree field


def dataclass_fields_named(obj, name: str) -> bool:
    import dataclasses  # noqa: PLC0415

    return any(f.name == name for f in dataclasses.fields(obj))


def test_branch_plan_is_the_cascade_default():
    """`plan_branch` decides what `cascade_attention_cells` would pick by itself (backend
    None): on CPU, Triton tiles in interpret mode."""
    shape = dict(branches=1, tokens=32, heads=32, k_heads=8, head_dim=64, cells=2048,
                 branch_cells=32, window=2048, itemsize=2)
    plan = dispatch.plan_branch("pallas", **shape)
    assert (plan.backend, plan.interpret) == ("triton", True)
    assert plan.block_sizes == ca.BlockSizes.for_cells(
        branches=1, tokens=32, group=4, k_heads=8, head_dim=64, cells=2048, branch_cells=32,
        shared_window=2048, itemsize=2, backend=None, interpret=True)
    with pytest.raises(InputError, match="allowed here"):
        dispatch.plan_branch("reference", **shape)
