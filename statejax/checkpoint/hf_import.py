"""Import a local Hugging Face checkpoint (Llama 3.x, Qwen2.5, Qwen3) into statejax params.

A checkpoint directory holds `config.json`, then either `model.safetensors` or shards
`model-0000x-of-0000y.safetensors` listed by `model.safetensors.index.json`, and optionally
`tokenizer.json`, `tokenizer_config.json` / `chat_template.jinja` (chat template).

Layout notes:
- HF `nn.Linear` stores weight [out, in], as statejax does (`statejax.model.llama.Linear`);
  per-head weights split the head axis: q/k/v `[N*D, E] -> [N, D, E]`, o_proj
  `[E, H*D] -> [E, H, D]`. Every tensor is a reshape of the file's: nothing is transposed.
- RoPE needs no q/k permutation: statejax rotates in the same half-split ("rotate_half")
  layout as HF's Llama/Qwen modelling code (`statejax.model.rope`). Checkpoints converted from
  Meta's original interleaved layout are already permuted by HF's conversion script.

Loading streams one tensor at a time: its bytes are read (large `preadv` calls) into one
aligned host buffer, which becomes the parameter itself on CPU when no cast is needed (XLA
adopts aligned buffers), else is handed to the device and cast there into a fresh buffer.
The next tensor is read while the current one moves, so host RAM holds no copy of the
weights beyond the page cache, the params (on CPU) and two tensors in flight.
"""

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from statejax.checkpoint.safetensors_file import SafetensorsFile
from statejax.errors import InputError
from statejax.model.config import ModelConfig, RopeScaling
from statejax.tokenizer import HFTokenizer, check_fits_vocab

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}
# float16 has no ModelConfig dtype: by default it loads as float32, which holds every float16
# value exactly (pass dtype="bfloat16" to halve memory at a loss of 3 mantissa bits).
_DTYPE_FROM_HF = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}
_ALLOWED_DTYPES = ("float32", "bfloat16")
# Tensors some exporters write that carry nothing statejax loads (recomputed buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Stored dtypes cast to the params' dtype on load; an integer or bool tensor would be cast
# too, silently, so it is refused instead.
_FLOAT_FILE_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An imported checkpoint.

    Attributes:
      cfg: the model shape.
      params: nested-dict params pytree for `statejax.model.llama.Transformer(cfg)`.
      tokenizer: an `HFTokenizer` from the directory's tokenizer.json, or None.
      chat_template: the Jinja chat template string, or None.
      path: the directory it came from.
    """

    cfg: ModelConfig
    params: Any
    tokenizer: HFTokenizer | None
    chat_template: str | None
    path: Path


# ------------------------------------------------------------------ config


def _field(config: dict, key: str, kind: type, default: Any = None):
    """config[key] (or default) checked to be a bool, or a positive int or float."""
    value = config.get(key, default)
    if value is None:
        raise InputError(f"config.json lacks {key!r}; it is required")
    if kind is bool:
        ok, allowed = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, allowed = isinstance(value, int) and not isinstance(value, bool) and value > 0, (
            "a positive int")
    else:
        ok = (isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value) and value > 0)
        allowed = "a positive number"
    if not ok:
        raise InputError(f"config.json {key}={value!r}; allowed: {allowed}")
    return kind(value)


def _architecture(config: dict) -> str:
    archs = config.get("architectures")
    if archs is None and config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[config["model_type"]]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"config.json architectures={archs!r}; allowed: exactly one of "
                         f"{list(SUPPORTED_ARCHITECTURES)}")
    return archs[0]


def check_dtype(dtype) -> str:
    """The name of a dtype the importers may load into ("float32" | "bfloat16").

    Raises:
      InputError: any other dtype, naming the allowed ones.
    """
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _ALLOWED_DTYPES:
        raise InputError(f"dtype={dtype!r}; allowed: {_ALLOWED_DTYPES}")
    return name


def _dtype(config: dict, dtype) -> str:
    if dtype is not None:
        return check_dtype(dtype)
    # As transformers' dtype="auto": the config's dtype (transformers 5) or torch_dtype (4),
    # a null one counting as absent; neither: float32.
    hf = config.get("dtype") or config.get("torch_dtype") or "float32"
    if not isinstance(hf, str) or hf not in _DTYPE_FROM_HF:
        raise InputError(f"config.json dtype {hf!r}; allowed: {sorted(_DTYPE_FROM_HF)}")
    return _DTYPE_FROM_HF[hf]


def _rope(config: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers-4 (`rope_theta` + `rope_scaling`) or transformers-5
    (`rope_parameters`) keys."""
    params = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise InputError(f"config.json {key}={value!r}; allowed: an object or null")
        params.update(value or {})
    theta = _field({**config, **params}, "rope_theta", float, 10_000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise InputError(f"config.json rope type {rope_type!r}; allowed: 'default', 'llama3'")
    return theta, RopeScaling(
        factor=_field(params, "factor", float),
        low_freq_factor=_field(params, "low_freq_factor", float),
        high_freq_factor=_field(params, "high_freq_factor", float),
        original_max_positions=_field(params, "original_max_position_embeddings", int))


def _refuse(config: dict, key: str, allowed, why: str):
    if key in config and config[key] not in allowed:
        raise InputError(f"config.json {key}={config[key]!r}; allowed: {allowed} ({why})")


def config_from_hf(config_json: dict, *, dtype=None, name: str | None = None) -> ModelConfig:
    """Maps a Hugging Face `config.json` dict to a `ModelConfig`.

    Args:
      config_json: the parsed config.json of a LlamaForCausalLM, Qwen2ForCausalLM or
        Qwen3ForCausalLM checkpoint (transformers 4 or 5 layout).
      dtype: "float32" or "bfloat16"; default: config.json's `dtype` (or `torch_dtype`)
        (float16 -> float32; neither key: float32).
      name: `ModelConfig.name`; default "hf-<model_type>".

    Raises InputError for an unsupported architecture, activation, rope type, bias or
    sliding-window setting, or a missing or ill-typed field.
    """
    if not isinstance(config_json, dict):
        raise InputError(f"config.json must be a JSON object; got {type(config_json).__name__}")
    c = config_json
    arch = _architecture(c)
    embed_dim = _field(c, "hidden_size", int)
    num_heads = _field(c, "num_attention_heads", int)
    head_dim = c.get("head_dim")
    if head_dim is None:
        if embed_dim % num_heads:
            raise InputError(f"config.json has no head_dim and hidden_size={embed_dim} is not a "
                             f"multiple of num_attention_heads={num_heads}")
        head_dim = embed_dim // num_heads
    _refuse(c, "hidden_act", ("silu",), "statejax's MLP is SwiGLU")
    _refuse(c, "mlp_bias", (False,), "statejax's MLP has no bias")
    # Llama's and Qwen3's attention_bias also adds an o_proj bias, which statejax lacks.
    _refuse(c, "attention_bias", (False,), "statejax has q/k/v bias only for Qwen2")
    _refuse(c, "use_sliding_window", (False,), "statejax attends to the full context")
    layer_types = c.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise InputError(f"config.json layer_types={layer_types}; allowed: only "
                         "'full_attention' (statejax attends to the full context)")
    theta, scaling = _rope(c)
    return ModelConfig(
        name=name or f"hf-{c.get('model_type', arch)}",
        vocab_size=_field(c, "vocab_size", int),
        num_layers=_field(c, "num_hidden_layers", int),
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=_field(c, "num_key_value_heads", int, num_heads),
        head_dim=_field({"head_dim": head_dim}, "head_dim", int),
        mlp_dim=_field(c, "intermediate_size", int),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=_field(c, "rms_norm_eps", float, 1e-6),
        tie_embeddings=_field(c, "tie_word_embeddings", bool, False),
        qkv_bias=arch == "Qwen2ForCausalLM",
        qk_norm=arch == "Qwen3ForCausalLM",
        dtype=_dtype(c, dtype),
    )


# ------------------------------------------------------------------ tensor layout


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one HF tensor goes: `params[path]` = reshape(hf, shape)."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]


def _norm(hf_name: str, module: tuple[str, ...], width: int) -> TensorSpec:
    return TensorSpec(hf_name, (*module, "scale"), (width,), (width,))


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every HF tensor a checkpoint of `cfg` must hold, with its statejax destination."""
    e, d, f, v = cfg.embed_dim, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    specs = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"), (v, e), (v, e))]
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}", f"layer_{i}"
        specs.append(_norm(f"{hf}.input_layernorm.weight", (me, "input_norm"), e))
        specs.append(_norm(f"{hf}.post_attention_layernorm.weight", (me, "post_norm"), e))
        for proj, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads),
                            ("v", cfg.num_kv_heads)):
            name = f"{hf}.self_attn.{proj}_proj"
            path = (me, "attn", f"{proj}_proj")
            specs.append(TensorSpec(f"{name}.weight", (*path, "weight"), (heads * d, e),
                                    (heads, d, e)))
            if cfg.qkv_bias:
                specs.append(TensorSpec(f"{name}.bias", (*path, "bias"), (heads * d,),
                                        (heads, d)))
        specs.append(TensorSpec(f"{hf}.self_attn.o_proj.weight", (me, "attn", "o_proj",
                                "weight"), (e, cfg.num_heads * d), (e, cfg.num_heads, d)))
        if cfg.qk_norm:
            specs.append(_norm(f"{hf}.self_attn.q_norm.weight", (me, "attn", "q_norm"), d))
            specs.append(_norm(f"{hf}.self_attn.k_norm.weight", (me, "attn", "k_norm"), d))
        for proj, out, inp in (("gate", f, e), ("up", f, e), ("down", e, f)):
            specs.append(TensorSpec(f"{hf}.mlp.{proj}_proj.weight",
                                    (me, "mlp", f"{proj}_proj", "weight"), (out, inp),
                                    (out, inp)))
    specs.append(_norm("model.norm.weight", ("final_norm",), e))
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head", "weight"), (v, e), (v, e)))
    return specs


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _convert(x, *, shape: tuple[int, ...], dtype: str):
    # Cast on the device: on an accelerator the host only ever ships the file's bytes.
    # Round-to-nearest-even, as torch's `.to(bfloat16)`.
    return x.astype(dtype).reshape(shape)


# ------------------------------------------------------------------ files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not readable JSON: {e}") from e


def _open_weights(root: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the mapped file holding it (single file or index + shards)."""
    index_path = root / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()):
            raise InputError(f"{index_path} lacks a 'weight_map' object of tensor -> file name")
        files = {}
        for file_name in sorted(set(weight_map.values())):
            shard = root / file_name
            if Path(file_name).name != file_name or not shard.is_file():
                raise InputError(f"{index_path} names shard {file_name!r}, which is not a file "
                                 f"in {root}")
            files[file_name] = SafetensorsFile(shard)
        for name, file_name in weight_map.items():
            if name not in files[file_name]:
                raise InputError(f"{index_path} places {name!r} in {file_name}, which lacks it")
        return {name: files[file_name] for name, file_name in weight_map.items()}
    single = root / "model.safetensors"
    if single.is_file():
        weights = SafetensorsFile(single)
        return {name: weights for name in weights.keys()}
    found = sorted(p.name for p in root.iterdir())
    raise InputError(f"no model.safetensors or model.safetensors.index.json in {root}; "
                     f"found: {found[:10]}")


def _listing(names: list[str]) -> str:
    return f"{len(names)} tensors: {names[:5]}" + (" ..." if len(names) > 5 else "")


def _check_tensors(cfg: ModelConfig, specs: list[TensorSpec], weights: dict, root: Path):
    expected = {s.hf_name for s in specs}
    missing = [s.hf_name for s in specs if s.hf_name not in weights]
    if missing:
        raise InputError(f"checkpoint {root} lacks {_listing(missing)}, which config.json "
                         f"({cfg.name}) requires")
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = [n for n in weights if n not in expected and n not in ignored
                  and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise InputError(f"checkpoint {root} has {_listing(unexpected)} that config.json "
                         f"({cfg.name}) does not describe; is it for another architecture?")
    for s in specs:
        found = weights[s.hf_name].shape(s.hf_name)
        if found != s.hf_shape:
            raise InputError(f"tensor {s.hf_name!r} has shape {list(found)}; config.json "
                             f"requires {list(s.hf_shape)}")
        stored = weights[s.hf_name].dtype(s.hf_name)
        if stored not in _FLOAT_FILE_DTYPES:
            raise InputError(f"tensor {s.hf_name!r} has dtype {stored}; allowed: "
                             f"{', '.join(_FLOAT_FILE_DTYPES)}")


def _read_ahead(specs: list[TensorSpec], weights: dict):
    """Yields (spec, host array) in order, reading the next tensor on a thread while the caller
    moves this one to the device (`preadv` and XLA release the GIL), so disk and device work
    overlap with at most two tensors on the host."""
    read = lambda s: weights[s.hf_name].read(s.hf_name)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, specs[0]) if specs else None
        for i, s in enumerate(specs):
            host = pending.result()
            pending = pool.submit(read, specs[i + 1]) if i + 1 < len(specs) else None
            yield s, host


def _chat_template(root: Path) -> str | None:
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tok_cfg = root / "tokenizer_config.json"
    if not tok_cfg.is_file():
        return None
    tok_config = _read_json(tok_cfg)
    template = tok_config.get("chat_template") if isinstance(tok_config, dict) else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def load_hf_checkpoint(path: str | os.PathLike, *, dtype=None) -> Checkpoint:
    """Loads a local HF checkpoint directory into statejax params.

    Args:
      path: directory with config.json and safetensors weights (single or sharded).
      dtype: "float32" or "bfloat16"; default: config.json's `dtype` (or `torch_dtype`), as
        transformers' dtype="auto" (float16 -> float32; neither key: float32). Every tensor
        is cast to it from its stored float dtype (F64, F32, F16 or BF16).

    Returns:
      A `Checkpoint`; `params` leaves have the `statejax.model.llama` shapes, e.g.
      `layer_0/attn/q_proj/weight` [H, D, E].

    Raises InputError for: an unsupported architecture or setting, a corrupt or truncated
    safetensors file or index, missing or unexpected tensors, a tensor whose shape does not
    match config.json or whose dtype is not a float, or a tokenizer.json with more ids than the
    model's vocabulary.
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        raise InputError(f"{root} is not a checkpoint directory: it has no config.json")
    cfg = config_from_hf(_read_json(root / "config.json"), dtype=dtype, name=f"hf:{root.name}")
    tokenizer = None
    if (root / "tokenizer.json").is_file():
        tokenizer = HFTokenizer.from_file(root)
        check_fits_vocab(tokenizer, cfg.vocab_size)
    chat_template = _chat_template(root)
    specs = tensor_specs(cfg)
    weights = _open_weights(root)
    _check_tensors(cfg, specs, weights, root)  # before reading any data: fail fast
    params: dict = {}
    for s, host in _read_ahead(specs, weights):
        if host.dtype == cfg.jnp_dtype:
            # Adopted without a copy on CPU (our own buffer, so nothing aliases the file).
            leaf = jax.device_put(host.reshape(s.shape))
        else:
            leaf = _convert(jax.device_put(host), shape=s.shape, dtype=cfg.dtype)
        # Blocking bounds what is in flight: this tensor on the device, the next on the host.
        leaf.block_until_ready()
        del host
        node = params
        for key in s.path[:-1]:
            node = node.setdefault(key, {})
        node[s.path[-1]] = leaf
    return Checkpoint(cfg=cfg, params=params, tokenizer=tokenizer,
                      chat_template=chat_template, path=root)
