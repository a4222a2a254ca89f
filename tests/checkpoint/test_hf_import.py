"""Hugging Face import: parity with transformers on tiny random-init checkpoints of each
family (full forward, chunked appends, greedy generation), dtypes, sharding, and bad input."""

import json
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from statejax import steps  # noqa: E402
from statejax.budget import Budget  # noqa: E402
from statejax.checkpoint.hf_import import config_from_hf, load_hf_checkpoint  # noqa: E402
from statejax.checkpoint.safetensors_file import SafetensorsFile  # noqa: E402
from statejax.errors import InputError  # noqa: E402
from statejax.model.config import preset  # noqa: E402
from statejax.model.llama import init_params  # noqa: E402
from statejax.serving.session import Session  # noqa: E402
from tests.checkpoint import parity  # noqa: E402

VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
FAMILIES = {
    "llama-untied": ("Llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500_000.0,
                                   max_position_embeddings=131_072, tie_word_embeddings=False)),
    "llama-tied": ("Llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500_000.0,
                                 max_position_embeddings=131_072, tie_word_embeddings=True)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=1_000_000.0)),
    # head_dim * heads != hidden, as in real Qwen3 models.
    "qwen3": ("Qwen3", dict(head_dim=24, tie_word_embeddings=False)),
}
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 40)).astype(np.int32)
F32_TOL = 1e-4
BF16_TOL = 2e-2
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _hf_model(family: str, seed: int = 0):
    kind, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{kind}Config")(**SMALL, **extra)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    # HF initialises norms to one and biases to zero: randomise them so a swapped or missed
    # tensor shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _write_tokenizer(path, num_ids: int):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, num_ids)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def _save(model, path, **kwargs):
    """save_pretrained plus a tokenizer and chat template; every checkpoint dir is named
    `ckpt` so equal configs give equal `ModelConfig`s (and share compiled steps)."""
    model.save_pretrained(path, **kwargs)
    _write_tokenizer(path, VOCAB)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return path


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, checkpoint dir, HF logits of TOKENS [2, 40, V])."""
    model = _hf_model(request.param)
    path = _save(model, tmp_path_factory.mktemp(request.param) / "ckpt")
    return request.param, model, path, _logits(model, TOKENS)


def test_forward_matches_transformers(family):
    name, _, path, ref = family
    ckpt = load_hf_checkpoint(path)
    expected = jax.eval_shape(lambda: init_params(ckpt.cfg))
    assert jax.tree.structure(ckpt.params) == jax.tree.structure(expected)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
                                     ckpt.params, expected))
    assert ckpt.cfg.tie_embeddings == FAMILIES[name][1]["tie_word_embeddings"]
    assert ckpt.tokenizer is not None and ckpt.tokenizer.vocab_size == VOCAB
    assert ckpt.chat_template == CHAT_TEMPLATE
    logits = steps.forward(ckpt.params, jnp.asarray(TOKENS), cfg=ckpt.cfg)
    diff = parity.max_diff(logits, ref)
    print(f"{name}: forward max |diff| {diff:.2e}")
    assert diff < F32_TOL


def test_chunked_appends_match_transformers(family):
    """steps.append over chunks of 16, 16 and 8 (padded) tokens: logits at every position."""
    name, _, path, ref = family
    ckpt = load_hf_checkpoint(path)
    worst = parity.chunked_append_diff(ckpt, TOKENS, ref)
    print(f"{name}: chunked appends max |diff| {worst:.2e}")
    assert worst < F32_TOL


@pytest.mark.slow
def test_session_greedy_generation_matches_transformers(family):
    """The user path: a Session with a prefix and appended items, then a greedy query of 64
    tokens, against `model.generate(do_sample=False)` on the same prompt."""
    name, model, path, ref = family
    ckpt = load_hf_checkpoint(path)
    prompt = TOKENS[0]
    # One chunk bucket: the prefix, both items and the question share one compiled shape.
    budget = Budget(cells=256, chunk_sizes=(16,), question_cells=16, max_new_tokens=64,
                    branch_rows=(1,))
    session = Session(ckpt.params, ckpt.cfg, budget, ckpt.tokenizer, prefix=prompt[:5],
                      stop_token=-1)
    for start, end in ((5, 20), (20, 32)):
        last = session.append(prompt[start:end])
        assert parity.max_diff(last, ref[0, end - 1]) < F32_TOL
    answer = session.query(prompt[32:], max_new_tokens=64)
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt[None], dtype=torch.long),
                             attention_mask=torch.ones((1, prompt.size), dtype=torch.long),
                             do_sample=False, max_new_tokens=64)
    expected = out[0, prompt.size:].numpy()
    print(f"{name}: greedy min gap {answer.min_gap:.2e}")
    assert expected.size == 64
    np.testing.assert_array_equal(answer.tokens, expected)


# ------------------------------------------------------------------ dtypes and sharding


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """An untied Llama HF model and its f32 checkpoint dir."""
    model = _hf_model("llama-untied", seed=1)
    return model, _save(model, tmp_path_factory.mktemp("llama") / "ckpt")


def _bits(tree):
    return [np.asarray(x).view(np.uint8) for x in jax.tree.leaves(tree)]


def test_sharded_checkpoint_loads_identically(llama, tmp_path):
    model, path = llama
    sharded = _save(model, tmp_path / "ckpt", max_shard_size="100KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_hf_checkpoint(path), load_hf_checkpoint(sharded)
    assert a.cfg == b.cfg
    for x, y in zip(_bits(a.params), _bits(b.params), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(llama, tmp_path, torch_dtype):
    """A bf16/f16 file loaded as float32 matches transformers (on the same rounded weights)
    to the f32 tolerance: the raw 16-bit values are read exactly. bf16 also runs in bf16."""
    model, _ = llama
    path = _save(_hf_model("llama-untied", seed=1).to(getattr(torch, torch_dtype)),
                 tmp_path / "ckpt")
    rounded = type(model).from_pretrained(path, dtype=torch.float32).eval()
    ref = _logits(rounded, TOKENS)
    as_f32 = load_hf_checkpoint(path, dtype="float32")
    assert parity.max_diff(steps.forward(as_f32.params, jnp.asarray(TOKENS), cfg=as_f32.cfg),
                     ref) < F32_TOL
    native = load_hf_checkpoint(path)
    # ModelConfig has no float16: float16 files load as float32 (exact) by default.
    assert native.cfg.dtype == {"bfloat16": "bfloat16", "float16": "float32"}[torch_dtype]
    if torch_dtype == "bfloat16":
        leaf = native.params["layer_0"]["attn"]["q_proj"]["weight"]
        assert leaf.dtype == jnp.bfloat16
        diff = parity.max_diff(steps.forward(native.params, jnp.asarray(TOKENS), cfg=native.cfg),
                         ref)
        print(f"bf16 forward max |diff| {diff:.2e} (logits up to {np.abs(ref).max():.2f})")
        assert diff < BF16_TOL


def test_f32_checkpoint_cast_to_bf16_on_load(llama):
    _, path = llama
    ckpt = load_hf_checkpoint(path, dtype="bfloat16")
    assert ckpt.cfg.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ckpt.params))


def test_params_do_not_alias_the_file(llama, tmp_path):
    """Params are fresh buffers, not views of the mapped file: overwriting it changes nothing."""
    path = tmp_path / "ckpt"
    shutil.copytree(llama[1], path)
    ckpt = load_hf_checkpoint(path)
    before = _bits(ckpt.params)
    weights = path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * (weights.stat().st_size - 4096))
    for x, y in zip(before, _bits(ckpt.params), strict=True):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ bad input


@pytest.fixture
def ckpt_dir(llama, tmp_path):
    """A private copy of the f32 Llama checkpoint to damage."""
    return shutil.copytree(llama[1], tmp_path / "ckpt")


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_truncated_safetensors_is_refused(ckpt_dir):
    weights = ckpt_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match=r"model\.safetensors is truncated"):
        load_hf_checkpoint(ckpt_dir)
    weights.write_bytes(data[:5])
    with pytest.raises(InputError, match="truncated"):
        load_hf_checkpoint(ckpt_dir)


def test_corrupt_safetensors_header_is_refused(ckpt_dir):
    weights = ckpt_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8] = ord("x")  # the JSON header's opening brace
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model\.safetensors has an invalid JSON header"):
        load_hf_checkpoint(ckpt_dir)
    data[:8] = (1 << 40).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model\.safetensors is corrupt or truncated: header"):
        load_hf_checkpoint(ckpt_dir)


def test_a_header_dtype_that_is_not_a_name_is_refused(ckpt_dir):
    weights = ckpt_dir / "model.safetensors"
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size].replace(b'"dtype":"F32"', b'"dtype":["F32"]', 1)
    assert header != data[8:8 + size]
    weights.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size:])
    with pytest.raises(InputError, match=r"dtype \['F32'\]; allowed"):
        load_hf_checkpoint(ckpt_dir)


def test_missing_tensor_is_listed(ckpt_dir):
    weights = ckpt_dir / "model.safetensors"
    tensors = safetensors_numpy.load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors_numpy.save_file(tensors, weights)
    with pytest.raises(InputError, match=r"lacks 1 tensors: \['model\.layers\.1\.mlp\.up_proj"):
        load_hf_checkpoint(ckpt_dir)


@pytest.mark.parametrize("name, stored", [("model.embed_tokens.weight", "I8"),
                                          ("model.norm.weight", "BOOL")])
def test_integer_or_bool_tensor_is_refused(ckpt_dir, monkeypatch, name, stored):
    """Right shape, not a float: refused before any tensor is read rather than cast."""
    weights = ckpt_dir / "model.safetensors"
    tensors = safetensors_numpy.load_file(weights)
    tensors[name] = tensors[name].astype({"I8": np.int8, "BOOL": np.bool_}[stored])
    safetensors_numpy.save_file(tensors, weights)
    reads = []
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, n: reads.append(n))
    with pytest.raises(InputError, match=rf"tensor '{name}' has dtype {stored}; "
                                         r"allowed: F64, F32, F16, BF16$"):
        load_hf_checkpoint(ckpt_dir)
    assert reads == []


def test_unknown_safetensors_tensor_name_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors_numpy.save_file({f"t{i}": np.full((2,), i, np.float32) for i in range(7)},
                                path)
    weights = SafetensorsFile(path)
    np.testing.assert_array_equal(weights.read("t3"), [3.0, 3.0])
    for method in ("get", "read", "shape", "dtype"):
        with pytest.raises(InputError) as e:
            getattr(weights, method)("t9")
        assert str(e.value) == (f"safetensors file {path} has no tensor 't9'; it holds 7 "
                                "tensors: ['t0', 't1', 't2', 't3', 't4'] ...")
    assert weights.dtype("t3") == "F32"


def test_config_tensor_shape_mismatch_is_refused(ckpt_dir):
    _edit_config(ckpt_dir, intermediate_size=96)
    with pytest.raises(InputError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has "
                                         r"shape \[128, 64\]; config\.json requires \[96, 64\]"):
        load_hf_checkpoint(ckpt_dir)


def test_unknown_architecture_is_refused(ckpt_dir):
    _edit_config(ckpt_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(InputError, match=r"GPT2LMHeadModel.*allowed.*LlamaForCausalLM.*"
                                         r"Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        load_hf_checkpoint(ckpt_dir)


def test_weights_of_another_architecture_are_refused(tmp_path):
    """Qwen2 weights (with q/k/v biases) under a Llama config.json: unexpected tensors."""
    path = _save(_hf_model("qwen2"), tmp_path / "ckpt")
    _edit_config(path, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(InputError, match=r"self_attn\.[qkv]_proj\.bias.*another architecture"):
        load_hf_checkpoint(path)


def test_tokenizer_larger_than_vocabulary_is_refused(ckpt_dir):
    _write_tokenizer(ckpt_dir, VOCAB + 100)
    with pytest.raises(InputError, match=rf"{VOCAB + 100} ids.*vocabulary has {VOCAB}"):
        load_hf_checkpoint(ckpt_dir)


def test_bad_shard_index_is_refused(ckpt_dir):
    (ckpt_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(InputError, match=r"names shard 'model-00001-of-00002\.safetensors'"):
        load_hf_checkpoint(ckpt_dir)


def test_directory_without_weights_is_refused(ckpt_dir):
    (ckpt_dir / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no model.safetensors"):
        load_hf_checkpoint(ckpt_dir)
    with pytest.raises(InputError, match="no config.json"):
        load_hf_checkpoint(ckpt_dir / "nowhere")


def test_unsupported_dtype_is_refused(ckpt_dir):
    with pytest.raises(InputError, match=r"dtype='float16'; allowed: \('float32', 'bfloat16'\)"):
        load_hf_checkpoint(ckpt_dir, dtype="float16")


# ------------------------------------------------------------------ config mapping

# Real config.json files (transformers 4 layout: top-level rope_theta, rope_scaling).
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
    "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936,
}


@pytest.mark.parametrize("config_json, name", [(LLAMA_32_1B, "llama-3.2-1b"),
                                               (QWEN25_05B, "qwen2.5-0.5b"),
                                               (QWEN3_06B, "qwen3-0.6b")])
def test_real_configs_map_to_presets(config_json, name):
    cfg = config_from_hf(config_json, name=name)
    assert cfg == preset(name)


def test_the_default_dtype_is_the_configs_as_transformers_auto_reads_it():
    base = {k: v for k, v in LLAMA_32_1B.items() if k != "torch_dtype"}
    assert config_from_hf(base).dtype == "float32"  # neither key
    assert config_from_hf({**base, "dtype": None, "torch_dtype": "bfloat16"}).dtype == (
        "bfloat16")  # a null transformers-5 key is absent, not float32
    assert config_from_hf({**base, "dtype": "float16"}).dtype == "float32"
    assert config_from_hf({**base, "dtype": "float32"}, dtype="bfloat16").dtype == "bfloat16"


def test_transformers5_rope_parameters():
    config = {k: v for k, v in LLAMA_32_1B.items() if k not in ("rope_theta", "rope_scaling")}
    config["rope_parameters"] = {**LLAMA_32_1B["rope_scaling"], "rope_theta": 500000.0}
    config["dtype"] = config.pop("torch_dtype")
    assert config_from_hf(config, name="llama-3.2-1b") == preset("llama-3.2-1b")


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope type 'yarn'; allowed"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'; allowed: \('silu',\)"),
    ({"attention_bias": True}, r"attention_bias=True; allowed"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers=0; allowed: a positive int"),
    ({"hidden_size": None}, r"lacks 'hidden_size'"),
    ({"architectures": ["MistralForCausalLM", "LlamaForCausalLM"]}, r"exactly one of"),
    ({"torch_dtype": "int8"}, r"dtype 'int8'; allowed"),
    ({"torch_dtype": ["bfloat16"]}, r"dtype \['bfloat16'\]; allowed"),
])
def test_unsupported_config_values_are_refused(change, message):
    with pytest.raises(InputError, match=message):
        config_from_hf({**LLAMA_32_1B, **change})
