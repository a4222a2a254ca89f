"""GGUF import: parity with transformers loading the same tiny GGUF files (F32 and Q8_0;
forward, chunked appends, greedy generation), the tokenizer's ids, and bad input.

Without transformers/torch (the second CI leg) the files are written from numpy weights and
only the exact-layout and bad-input tests run."""

import json
import types

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")
try:
    import torch
    import transformers
except ImportError:
    torch = transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers and torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from statejax import steps  # noqa: E402
from statejax.budget import Budget  # noqa: E402
from statejax.checkpoint.gguf_import import load_gguf_checkpoint  # noqa: E402
from statejax.errors import InputError  # noqa: E402
from statejax.model.llama import init_params  # noqa: E402
from statejax.serving.session import Session  # noqa: E402
from tests.checkpoint import parity  # noqa: E402

Q = gguf.GGMLQuantizationType
F32_TOL = 1e-4
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3,
          "Prices: 12345.678, 0.00012, 1e10 shares traded on 2024-01-02!",
          "Ünïcödé wörds, naïve café, 日本語のテキスト, emoji 🙂🚀 and\ttabs  and   spaces\n\n",
          "def f(x):\n    return x ** 2  # squares\n", "hello hello world world wide web"]
STRINGS = ["hello world", "  leading and trailing  ", "digits 0123456789 and 3.14159",
           "naïve café 日本語 🙂", "tabs\tand\nnewlines\r\n\n", "a" * 40, "x  y   z    w",
           "<|im_start|>user\nhi<|im_end|>", "The quick brown fox.", "", " ", "1e10 12345.678"]
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 40)).astype(np.int32)


@pytest.fixture(scope="module")
def bpe():
    """(tokens, merges, token types) of a byte-level BPE trained on CORPUS."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    assert len(merges) > 50 and None not in tokens
    return tokens, merges, types


def _np_model(vocab: int, seed: int = 0):
    """A tiny tied llama as numpy weights, shaped like `_hf_model`'s (no torch needed)."""
    cfg = types.SimpleNamespace(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, rope_theta=100_000.0, rms_eps=1e-5,
                                rms_norm_eps=1e-5, max_position_embeddings=2048,
                                tie_word_embeddings=True)
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (vocab, 64), "model.norm.weight": (64,)}
    for i in range(2):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in {
            "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,),
            "self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64),
            "self_attn.v_proj.weight": (32, 64), "self_attn.o_proj.weight": (64, 64),
            "mlp.gate_proj.weight": (128, 64), "mlp.up_proj.weight": (128, 64),
            "mlp.down_proj.weight": (64, 128)}.items()})
    weights = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
    return types.SimpleNamespace(config=cfg, state_dict=lambda: weights)


def _hf_model(kind: str, vocab: int, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=100_000.0, rms_norm_eps=1e-5,
        max_position_embeddings=2048, tie_word_embeddings=tied, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # randomise norms and biases so a swapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of a Q/K weight [n*D, E]."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_tensors(model, arch):
    cfg = model.config
    out = {}
    for name, p in model.state_dict().items():
        w = p if isinstance(p, np.ndarray) else p.float().numpy()
        if name == "model.embed_tokens.weight":
            key = "token_embd.weight"
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            key = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            key = f"blk.{i}.{_NAMES[module]}.{leaf}"
            if arch == "llama" and module == "self_attn.q_proj":
                w = _permute(w, cfg.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                w = _permute(w, cfg.num_key_value_heads)
        out[key] = w
    return out


def write_gguf(path, model, arch, bpe, qtype=Q.F32, *, metadata=None, drop=(), extra=None,
               tokenizer_model="gpt2"):
    """Writes `model` as llama.cpp would: permuted llama Q/K, 2-D weights in `qtype`, norms
    and biases in F32; tokenizer and chat template in the metadata."""
    cfg = model.config
    tokens, merges, types = bpe
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta")
                         else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    for key, (value, kind) in (metadata or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    tensors = {**_gguf_tensors(model, arch), **(extra or {})}
    for name, t in tensors.items():
        if name in drop:
            continue
        if t.ndim == 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_from_gguf(path):
    """transformers' model from the file: its GGUF config, dequantization and Q/K un-permute
    (`from_pretrained(gguf_file=...)` without the `accelerate` package it insists on)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint as hf_load

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = hf_load(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert config.tie_word_embeddings == ("lm_head.weight" in missing)
    model.tie_weights()
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


CASES = {"llama-f32-untied": ("Llama", "llama", Q.F32, False),
         "llama-q8_0-tied": ("Llama", "llama", Q.Q8_0, True),
         "qwen2-f32-tied": ("Qwen2", "qwen2", Q.F32, True),
         "qwen3-f32-untied": ("Qwen3", "qwen3", Q.F32, False)}


@pytest.fixture(scope="module", params=[pytest.param(c, marks=needs_hf) for c in sorted(CASES)])
def case(request, bpe, tmp_path_factory):
    """(name, transformers model loaded from the file, file path, its logits of TOKENS)."""
    kind, arch, qtype, tied = CASES[request.param]
    model = _hf_model(kind, len(bpe[0]), tied)
    path = write_gguf(tmp_path_factory.mktemp(request.param) / "tiny.gguf", model, arch, bpe,
                      qtype)
    ref_model = _hf_from_gguf(path)
    return request.param, ref_model, path, _logits(ref_model, TOKENS)


def test_forward_matches_transformers_on_the_same_file(case):
    name, model, path, ref = case
    ckpt = load_gguf_checkpoint(path)
    expected = jax.eval_shape(lambda: init_params(ckpt.cfg))
    assert jax.tree.structure(ckpt.params) == jax.tree.structure(expected)
    assert ckpt.cfg.tie_embeddings == CASES[name][3]
    # Qwen3's head_dim (128) is not hidden / heads (16): read from attention.key_length.
    assert ckpt.cfg.head_dim == (128 if "qwen3" in name else 16)
    assert ckpt.cfg.rope_theta == 100_000.0
    assert ckpt.chat_template == CHAT_TEMPLATE
    logits = steps.forward(ckpt.params, jnp.asarray(TOKENS), cfg=ckpt.cfg)
    diff = parity.max_diff(logits, ref)
    print(f"{name}: forward max |diff| {diff:.2e}")
    assert diff < F32_TOL


def test_f32_file_loads_the_exact_unpermuted_weights(bpe, tmp_path):
    """F32 weights come back bit-exact in statejax's layout; Q/K with llama.cpp's permutation
    undone, so each leaf is a reshape of the original HF tensor."""
    model = _np_model(len(bpe[0]))
    ckpt = load_gguf_checkpoint(write_gguf(tmp_path / "f.gguf", model, "llama", bpe))
    w = model.state_dict()
    attn = ckpt.params["layer_1"]["attn"]
    for proj, heads in (("q", 4), ("k", 2), ("v", 2)):
        np.testing.assert_array_equal(attn[f"{proj}_proj"]["weight"],
                                      w[f"model.layers.1.self_attn.{proj}_proj.weight"]
                                      .reshape(heads, 16, 64))
    np.testing.assert_array_equal(attn["o_proj"]["weight"],
                                  w["model.layers.1.self_attn.o_proj.weight"].reshape(64, 4, 16))
    np.testing.assert_array_equal(ckpt.params["embed"]["embedding"],
                                  w["model.embed_tokens.weight"])
    np.testing.assert_array_equal(ckpt.params["layer_0"]["post_norm"]["scale"],
                                  w["model.layers.0.post_attention_layernorm.weight"])
    assert ckpt.cfg.tie_embeddings and "lm_head" not in ckpt.params
    assert ckpt.chat_template == CHAT_TEMPLATE
    assert ckpt.tokenizer.vocab_size == len(bpe[0])


def test_q8_0_dequantizes_to_quantized_values(bpe, tmp_path):
    """Q8_0 weights differ from the F32 ones (it is quantized) by at most half a step."""
    model = _np_model(len(bpe[0]))
    ckpt = load_gguf_checkpoint(write_gguf(tmp_path / "q.gguf", model, "llama", bpe, Q.Q8_0))
    ours = np.asarray(ckpt.params["layer_1"]["mlp"]["up_proj"]["weight"])
    theirs = model.state_dict()["model.layers.1.mlp.up_proj.weight"]
    step = np.abs(theirs.reshape(-1, 32)).max(1, keepdims=True) / 127
    err = np.abs(ours.reshape(-1, 32) - theirs.reshape(-1, 32))
    assert 0 < err.max() and (err <= step * 0.6 + 1e-6).all()


def test_chunked_appends_match_transformers(case):
    name, _, path, ref = case
    ckpt = load_gguf_checkpoint(path)
    worst = parity.chunked_append_diff(ckpt, TOKENS, ref)
    print(f"{name}: chunked appends max |diff| {worst:.2e}")
    assert worst < F32_TOL


def test_session_greedy_tokens_match_transformers_generate(case):
    name, model, path, ref = case
    ckpt = load_gguf_checkpoint(path)
    prompt = TOKENS[0]
    budget = Budget(cells=128, chunk_sizes=(16,), question_cells=16, max_new_tokens=8,
                    branch_rows=(1,))
    session = Session(ckpt.params, ckpt.cfg, budget, ckpt.tokenizer, prefix=prompt[:5],
                      stop_token=-1)
    for start, end in ((5, 20), (20, 32)):
        last = session.append(prompt[start:end])
        assert parity.max_diff(last, ref[0, end - 1]) < F32_TOL
    answer = session.query(prompt[32:], max_new_tokens=8)
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt[None], dtype=torch.long),
                             attention_mask=torch.ones((1, prompt.size), dtype=torch.long),
                             do_sample=False, max_new_tokens=8)
    np.testing.assert_array_equal(answer.tokens, out[0, prompt.size:].numpy())


# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def llama_file(bpe, tmp_path_factory):
    model = _np_model(len(bpe[0]), seed=1)
    return model, write_gguf(tmp_path_factory.mktemp("tok") / "tiny.gguf", model, "llama", bpe)


@needs_hf
def test_tokenizer_ids_match_transformers(llama_file, bpe):
    _, path = llama_file
    ours = load_gguf_checkpoint(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokens = bpe[0]
    assert ours.vocab_size == len(tokens)
    assert (ours.bos_id, ours.eos_id) == (tokens.index("<|endoftext|>"),
                                          tokens.index("<|im_end|>"))
    rng = np.random.default_rng(0)
    pieces = [*STRINGS, *CORPUS]
    strings = [*pieces, *("".join(rng.choice(pieces, 3)) for _ in range(20))]
    multi_token = 0
    for s in strings:
        ids = ours.encode(s)
        assert ids.tolist() == theirs.encode(s, add_special_tokens=False), s
        multi_token += len(ids) < len(s.encode("utf-8"))
        assert ours.decode(ids) == theirs.decode(ids.tolist(), skip_special_tokens=True)
    assert multi_token > len(strings) // 2  # the merges are real: fewer ids than bytes
    special = ours.encode("<|im_start|>x<|im_end|>")
    assert special[0] == tokens.index("<|im_start|>")
    assert special[-1] == tokens.index("<|im_end|>")


# ------------------------------------------------------------------ bad input


def test_not_a_gguf_or_truncated_file_is_refused(llama_file, tmp_path):
    data = llama_file[1].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(InputError, match=r"is not a GGUF file: it starts with b'PK"):
        load_gguf_checkpoint(bad)
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_gguf_checkpoint(bad)
    bad.write_bytes(data[:100])
    with pytest.raises(InputError, match="truncated"):
        load_gguf_checkpoint(bad)
    with pytest.raises(InputError, match="no GGUF file"):
        load_gguf_checkpoint(tmp_path / "nowhere.gguf")


def test_unsupported_architecture_is_refused(llama_file, bpe, tmp_path):
    path = write_gguf(tmp_path / "g.gguf", llama_file[0], "gpt2", bpe)
    with pytest.raises(InputError, match=r"architecture='gpt2'; allowed: \['llama', 'qwen2', "
                                         r"'qwen3'\]"):
        load_gguf_checkpoint(path)


def test_unsupported_tensor_type_is_refused(llama_file, bpe, tmp_path):
    extra = {"blk.0.ffn_up.weight": np.ones((128, 64), np.int32)}
    path = write_gguf(tmp_path / "i.gguf", llama_file[0], "llama", bpe, extra=extra)
    with pytest.raises(InputError, match=r"'blk\.0\.ffn_up\.weight' has type I32; allowed: "
                                         r"F32, F16, .*Q8_0"):
        load_gguf_checkpoint(path)


def test_missing_tensor_is_listed(llama_file, bpe, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", llama_file[0], "llama", bpe,
                      drop=("blk.1.ffn_up.weight",))
    with pytest.raises(InputError, match=r"lacks 1 tensors: \['blk\.1\.ffn_up\.weight'\]"):
        load_gguf_checkpoint(path)


def test_vocab_mismatch_is_refused(llama_file, bpe, tmp_path):
    tokens, merges, types = bpe
    more = ([*tokens, *(f"extra{i}" for i in range(5))], merges, [*types, *[1] * 5])
    path = write_gguf(tmp_path / "v.gguf", llama_file[0], "llama", more)
    # The writer records llama.vocab_size from the model: the tokenizer has 5 ids more.
    with pytest.raises(InputError, match=rf"{len(tokens) + 5} ids.*vocabulary has "
                                         rf"{len(tokens)}"):
        load_gguf_checkpoint(path)


def test_unsupported_rope_scaling_and_tokenizer_are_refused(llama_file, bpe, tmp_path):
    path = write_gguf(tmp_path / "r.gguf", llama_file[0], "llama", bpe,
                      metadata={"llama.rope.scaling.type": ("yarn", "string")})
    with pytest.raises(InputError, match=r"rope\.scaling\.type='yarn'; allowed: 'none'"):
        load_gguf_checkpoint(path)
    path = write_gguf(tmp_path / "t.gguf", llama_file[0], "llama", bpe, tokenizer_model="bert")
    with pytest.raises(InputError, match=r"tokenizer\.ggml\.model='bert'; allowed: 'gpt2'"):
        load_gguf_checkpoint(path)


def test_unsupported_dtype_is_refused(llama_file):
    with pytest.raises(InputError, match=r"dtype='float16'; allowed"):
        load_gguf_checkpoint(llama_file[1], dtype="float16")
    ckpt = load_gguf_checkpoint(llama_file[1], dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ckpt.params))
