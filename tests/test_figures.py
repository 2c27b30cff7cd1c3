"""Figures and the fast checkpoint report.

* analysis/simulate.py: a token's start (o) and end (x) markers take its line's colour; the GIF
  (--gif, --gif-set) has the requested frames and size, fixed axis limits, is written atomically
  (a writer that fails leaves no file, and an old GIF intact) and a missing Pillow is one sentence;
* analysis/reports.py: the heat map's texts never overlap (12 × 12, 32 × 32 with offsets, …),
  read off the renderer's bounding boxes;
* analysis/reports.layer_report gives the numbers of the reference implementation it replaced
  (kept below, verbatim, with regimes.analyse_layer): every inertia count and string identical,
  every float to 1e-10 relative, on seeded fake layers and a seeded checkpoint.
"""
import errno
import math
import random
import sys

import pytest
import torch

import regimes
import train_lm
import training
from analysis import reports as R
from analysis import simulate as S


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------------------------------------
# trajectories.png: markers in their line's colour
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 4])
def test_start_and_end_markers_take_their_lines_colour(d):
    from matplotlib.colors import to_rgba
    res = S.simulate("intermediate", d=d, n=5, t_end=1.0, dt=0.1, seed=3)
    fig = S.trajectory_figure(res, "intermediate")
    ax = fig.axes[0]
    lines, marks = ax.get_lines(), ax.collections
    assert len(lines) == 5 and len(marks) == 10                  # per token: o then x
    colours = []
    for i, line in enumerate(lines):
        c = to_rgba(line.get_color())
        for sc in marks[2 * i:2 * i + 2]:
            assert [tuple(x) for x in sc.get_facecolor()] == [c] and [tuple(x) for x in sc.get_edgecolor()] == [c]
        colours.append(c)
    assert len(set(colours)) == 5 and colours == S.token_colours(5)   # by position, deterministic
    _plt().close(fig)


# ------------------------------------------------------------------------------------------------
# the GIF
# ------------------------------------------------------------------------------------------------
GIF_ARGS = ["--regime", "divergent", "--pe", "rope", "--t-end", "3", "--dt", "0.1", "--n", "5"]


def test_gif_frames_size_fixed_limits(tmp_path, monkeypatch):
    from matplotlib.animation import PillowWriter
    from PIL import Image
    seen = []
    grab = PillowWriter.grab_frame

    def spy(self, **kw):
        ax = self.fig.axes[0]
        seen.append((ax.get_xlim(), ax.get_ylim(), [tuple(p) for p in ax.collections[0].get_offsets()],
                     ax.get_title()))
        return grab(self, **kw)
    monkeypatch.setattr(PillowWriter, "grab_frame", spy)
    out = tmp_path / "run"
    assert S.main([*GIF_ARGS, "--gif", "--frames", "9", "--out", str(out)]) == 0
    with Image.open(out / "tokens.gif") as im:
        assert im.n_frames == 9 and im.size == (360, 316)        # 5.0 × 4.4 in at 72 dpi
    assert len(seen) == 9 and len({(x, y) for x, y, _, _ in seen}) == 1   # the same limits in every frame
    (x0, x1), (y0, y1) = seen[0][:2]
    assert all(x0 < px < x1 and y0 < py < y1 for _, _, pts, _ in seen for px, py in pts)
    assert "divergent, PE=rope" in seen[0][3] and "t = 0" in seen[0][3] and seen[-1][3] != seen[0][3]
    assert len({tuple(p) for _, _, p, _ in seen}) == 9           # the tokens move
    assert sorted(p.name for p in out.iterdir()) == ["probes.csv", "probes.png", "summary.json",
                                                     "tokens.gif", "trajectories.png"]


def test_frame_times_and_interpolation():
    t = S.frame_times(20.0, 60, "log")
    assert len(t) == 60 and float(t[0]) == 0 and abs(float(t[1]) - 0.02) < 1e-12 and abs(float(t[-1]) - 20) < 1e-12
    assert bool((t[1:] > t[:-1]).all())
    u = S.frame_times(5.0, 11, "uniform")
    assert torch.allclose(u, torch.linspace(0, 5, 11, dtype=torch.float64))
    ts = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    Y = torch.tensor([[0.0], [10.0], [30.0]], dtype=torch.float64)
    got = S._interpolate(ts, Y, torch.tensor([0.0, 0.5, 1.5, 2.0], dtype=torch.float64))
    assert got.flatten().tolist() == [0.0, 5.0, 20.0, 30.0]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("boom")])
def test_gif_is_written_atomically(tmp_path, monkeypatch, capsys, error):
    """A writer that fails half-way leaves no new file and the old GIF as it was."""
    from matplotlib.animation import PillowWriter
    out = tmp_path / "run"
    out.mkdir()
    (out / "tokens.gif").write_bytes(b"old gif")
    calls = []
    grab = PillowWriter.grab_frame

    def failing(self, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise error
        return grab(self, **kw)
    monkeypatch.setattr(PillowWriter, "grab_frame", failing)
    if isinstance(error, OSError):
        assert S.main([*GIF_ARGS, "--gif", "--frames", "6", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("simulate.py: ") and "\n" not in err and "No space left" in err
    else:
        with pytest.raises(RuntimeError):
            S.main([*GIF_ARGS, "--gif", "--frames", "6", "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["tokens.gif"]      # no temporary file, no new figure
    assert (out / "tokens.gif").read_bytes() == b"old gif"


def test_gif_set_makes_six_and_refuses_mixed_flags(tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "gifs"
    assert S.main(["--gif-set", "--frames", "3", "--t-end", "0.5", "--dt", "0.1", "--n", "4", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{r}-{pe}.gif" for r in ("convergent", "divergent", "intermediate") for pe in ("none", "rope"))
    for name in names:
        with Image.open(out / name) as im:
            assert im.n_frames == 3
    assert "6 GIFs in" in capsys.readouterr().out
    for bad in (["--gif-set", "--regime", "divergent"], ["--gif-set", "--d", "3"], ["--gif", "--frames", "1"]):
        assert S.main([*bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("simulate.py: ") and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_gif_without_pillow_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "PIL", None)                # `import PIL` now fails
    assert S.main([*GIF_ARGS, "--gif", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simulate.py: ") and "Pillow" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# the heat map: no overlapping text
# ------------------------------------------------------------------------------------------------
def _fake_report(L, H, offsets=(), lam=False, lsq=False, seed=0):
    rnd = random.Random(seed)
    layers, heads, off_rows = [], [], []
    d = 64 * H
    for form in (["W", "W+λ"] if lam else ["W"]):
        for layer in range(L):
            p = rnd.randint(0, d)
            layers.append({"form": form, "layer": layer, "head": "all", "n_pos_W": p, "n_neg_W": d - p,
                           "n_zero_W": 0, "n_pos_A": rnd.randint(0, d), "n_neg_A": rnd.randint(0, d), "n_zero_A": 0,
                           "balance_W": rnd.uniform(-1, 1), "balance_A": rnd.uniform(-1, 1),
                           "A": "least-squares" if lsq else "exact",
                           "regime": "undefined" if lsq else rnd.choice(regimes.REGIME_NAMES)})
            heads += [{"form": form, "layer": layer, "head": h, "balance_W": rnd.uniform(-1, 1)} for h in range(H)]
            off_rows += [{"form": form, "layer": layer, "offset": m, "balance_W": rnd.uniform(-1, 1),
                          "regime": "" if lsq else rnd.choice(regimes.REGIME_NAMES)} for m in offsets]
    return {"name": f"fake-{L}x{H}", "info": {"n_heads": H, "d": d}, "layers": layers, "heads": heads,
            "offset_rows": off_rows, "probe": []}


def _texts(fig):
    """(text, window bbox) of every visible, non-empty text of the drawn figure: the figure's
    texts (suptitle), and per axes (colour bars included) title, labels, texts and tick labels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    items = list(fig.texts)
    for ax in fig.axes:
        items += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts, *ax.get_xticklabels(), *ax.get_yticklabels()]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in items if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize("L,H,offsets,lam,lsq", [
    (12, 12, (), False, False),
    (32, 32, [0] + R.offset_list(True, 4095), True, False),
    (32, 32, [0] + R.offset_list(False, 1023), False, True),
    (12, 12, [0] + R.offset_list(True, 1023), False, False),
    (2, 2, [0] + R.offset_list(True, 63), False, False),
])
def test_heatmap_texts_do_not_overlap(L, H, offsets, lam, lsq):
    fig = R.heatmap_figure(_fake_report(L, H, offsets, lam, lsq))
    texts = _texts(fig)
    W, Hpx = fig.bbox.width, fig.bbox.height
    assert len(texts) > 20
    for i, (s, a) in enumerate(texts):
        assert a.x0 >= -1 and a.y0 >= -1 and a.x1 <= W + 1 and a.y1 <= Hpx + 1, f"{s!r} leaves the figure"
        for s2, b in texts[i + 1:]:
            inter_w = min(a.x1, b.x1) - max(a.x0, b.x0)
            inter_h = min(a.y1, b.y1) - max(a.y0, b.y0)
            assert not (inter_w > 0.5 and inter_h > 0.5), f"{s!r} overlaps {s2!r}"
    heads_ax = fig.axes[0]
    shown = [t.get_text() for t in heads_ax.get_xticklabels() if t.get_text()]
    assert shown[0] == "0" and (len(shown) == H or H > 12)       # every head when there is room
    assert fig.get_size_inches()[1] > 0.12 * L                   # the figure grows with the grid
    _plt().close(fig)


def test_heatmap_figure_grows_with_the_grid():
    small = R.heatmap_figure(_fake_report(12, 12)).get_size_inches()
    big = R.heatmap_figure(_fake_report(32, 32)).get_size_inches()
    assert big[0] > small[0] and big[1] > small[1]
    _plt().close("all")


# ------------------------------------------------------------------------------------------------
# the fast report equals the reference
# ------------------------------------------------------------------------------------------------
def _reference_layer_report(spec: dict, offsets=(), tol=None) -> dict:
    """analysis/reports.layer_report before it was made fast (verbatim): regimes.analyse_layer,
    the per-offset d × d spectra through einsum and classify_batch."""
    Q, K = spec["Q"].detach().double(), spec["K"].detach().double()
    H, s = spec["n_heads"], float(spec["scale"])
    d, dq = Q.shape[0], Q.shape[1] // H
    r = regimes.analyse_layer(Q, K, spec["V"], spec["O"], H, s, tol=tol)
    rot = spec.get("rot")
    offs = [0] + (list(offsets) if rot else [])
    R_ = torch.eye(dq, dtype=torch.float64).repeat(len(offs), H, 1, 1)
    if rot:
        Rm = regimes.rope_rotations(offs, dq, rot["rotary_dim"], rot["base"], rot["pairing"])
        R_[:, : rot.get("rope_heads", H)] = Rm[:, None]
    base = {"source": spec.get("source", ""), "form": spec.get("form", "W"), "layer": spec["layer"]}

    def kept(flags):
        near = [f for m, f in zip(offs[1:], flags[1:]) if abs(m) < R.NEAR_OFFSETS]
        far = [f for m, f in zip(offs[1:], flags[1:]) if abs(m) >= R.NEAR_OFFSETS]
        return (sum(near) / len(near) if near else ""), (sum(far) / len(far) if far else "")

    heads, head_bal = [], []
    Z = torch.zeros(len(offs), dq, dq, dtype=torch.float64)
    for h, hr in enumerate(r["heads"]):
        sl = slice(h * dq, (h + 1) * dq)
        C = 0.5 * s * torch.cat((torch.cat((Z, R_[:, h]), 2), torch.cat((R_[:, h].transpose(1, 2), Z), 2)), 1)
        ev = R.lowrank_sym_eigs(torch.cat((Q[:, sl], K[:, sl]), 1), C)
        b = R.balance(ev)
        head_bal.append(b)
        sign_kept = [bool(torch.sign(x) == torch.sign(b[0])) for x in b]
        ip, ineg, iz = hr["inertia_W"]
        row = dict(base, head=h, n_pos_W=ip, n_neg_W=ineg, n_zero_W=iz, eig_W_min=hr["eig_W_min"],
                   eig_W_max=hr["eig_W_max"], balance_W=float(b[0]), W_sym=hr["W_sym"])
        if rot:
            row["rope_balance_sign_kept_near"], row["rope_balance_sign_kept_far"] = kept(sign_kept)
        heads.append(row)
    ew = r["eig_W_sym"]
    ip, ineg, iz = r["inertia_W"]
    M = r["M"]
    row = dict(base, head="all", n_pos_W=ip, n_neg_W=ineg, n_zero_W=iz, eig_W_min=float(ew[0]),
               eig_W_max=float(ew[-1]), balance_W=float(R.balance(ew)),
               W_sym="psd" if ineg == 0 else ("nsd" if ip == 0 else "indefinite"),
               cond_M=r["cond_M"], rank_M=int(torch.linalg.matrix_rank(M)), regime=r["regime"])
    if r["A"] is not None:
        row.update(A="exact", balance_A=float(R.balance(r["eig_A_sym"])))
        row["n_pos_A"], row["n_neg_A"], row["n_zero_A"] = r["inertia_A"]
    else:
        row.update(A="least-squares", A_lsq_residual=r["A_lsq_residual"],
                   balance_A=float(R.balance(torch.linalg.eigvalsh(regimes.sym(r["A_lsq"])))))
        row["n_pos_A"], row["n_neg_A"], row["n_zero_A"] = r["inertia_A_lsq"]
    offset_rows = []
    if rot:
        Qh, Kh = Q.view(d, H, dq), K.view(d, H, dq)
        Wm = s * torch.einsum("dhi,mhij,ehj->mde", Qh, R_, Kh)
        ev = torch.linalg.eigvalsh(regimes.sym(Wm))
        n_pos, n_neg, n_zero = regimes.inertia_counts(ev, tol)
        bw = R.balance(ev)
        regimes_m = [""] * len(offs)
        if r["A"] is not None:
            Am = torch.linalg.solve(M, Wm.transpose(1, 2)).transpose(1, 2)
            regimes_m = regimes.classify_batch(Wm, Am, tol, cond_V=r["cond_M"])
        hb = torch.stack(head_bal).mean(0)
        for i, m in enumerate(offs):
            offset_rows.append(dict(base, offset=m, n_pos_W=int(n_pos[i]), n_neg_W=int(n_neg[i]),
                                    n_zero_W=int(n_zero[i]), balance_W=float(bw[i]),
                                    mean_head_balance=float(hb[i]), regime=regimes_m[i]))
        same = [(int(n_pos[i]), int(n_neg[i])) == (int(n_pos[0]), int(n_neg[0])) for i in range(len(offs))]
        row["rope_inertia_kept_near"], row["rope_inertia_kept_far"] = kept(same)
        row["rope_balance_sign_kept_near"], row["rope_balance_sign_kept_far"] = kept(
            [bool(torch.sign(x) == torch.sign(bw[0])) for x in bw])
        if r["A"] is not None:
            row["rope_regime_kept_near"], row["rope_regime_kept_far"] = kept([x == regimes_m[0] for x in regimes_m])
    if spec.get("lam") is not None and spec.get("form") == "W+λ":
        lam = spec["lam"]
        row["lam"] = " ".join(f"{float(x):.4g}" for x in (lam if lam.ndim == 1 else lam.mean(1)))
        for h, hr in enumerate(heads):
            hr["lam"] = f"{float(lam[h] if lam.ndim == 1 else lam[h].mean()):.4g}"
    return {"layer": row, "heads": heads, "offsets": offset_rows}


def _assert_same_rows(got: list, want: list):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w), (sorted(g), sorted(w))
        for k in w:
            a, b = g[k], w[k]
            if isinstance(b, float):
                assert isinstance(a, float) and math.isclose(a, b, rel_tol=1e-10, abs_tol=0.0) or a == b, (k, a, b)
            else:
                assert a == b and type(a) is type(b), (k, a, b)


def _spec(seed, d=48, H=4, rot=None, lam=None, singular_M=False, near_pd=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(d)   # noqa: E731
    Q, K = r(d, d), r(d, d)
    V, O = torch.eye(d, dtype=torch.float64) + r(d, d), torch.eye(d, dtype=torch.float64) + r(d, d)
    if near_pd:          # Q ≈ K: W_sym(m) ≻ 0 at small offsets; M = −Wᵀ: A = −I, convergent
        K = torch.eye(d, dtype=torch.float64) + 0.3 * r(d, d)
        Q = K + 0.05 * r(d, d)
        V, O = -(Q @ K.T / math.sqrt(d // H)).T, None
    if singular_M:       # rank M = d − 8: the least-squares branch
        O[:, :8] = 0.0
    return {"layer": seed, "Q": Q, "K": K, "V": V, "O": O, "n_heads": H, "scale": (d // H) ** -0.5,
            "rot": rot, "causal": True, "lam": lam, "form": "W"}


ROT = {"base": 50.0, "pairing": "interleaved", "rotary_dim": 12, "rope_heads": 4}
CASES = {
    "rope causal": (dict(rot=ROT), R.offset_list(True, 300)),
    "rope bidirectional, half pairing, partial, 2 of 4 heads": (
        dict(rot={"base": 500.0, "pairing": "half", "rotary_dim": 8, "rope_heads": 2}), R.offset_list(False, 100)),
    "rope, W_sym(m) ≻ 0 at some offsets": (dict(rot=ROT, near_pd=True), R.offset_list(True, 200)),
    "rope, singular M": (dict(rot=ROT, singular_M=True), R.offset_list(True, 64)),
    "rope on no head": (dict(rot=dict(ROT, rope_heads=0)), R.offset_list(True, 40)),
    "no PE": (dict(), ()),
    "no PE, singular M": (dict(singular_M=True), ()),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lam", [None, "identity", "softplus-diag"])
def test_fast_layer_report_equals_the_reference(case, lam):
    kw, offs = CASES[case]
    H = 4
    lam_t = (None if lam is None else torch.tensor([0.05, -0.2, 0.1, 0.3], dtype=torch.float64) if lam == "identity"
             else torch.nn.functional.softplus(torch.randn(H, 48 // H, generator=torch.Generator().manual_seed(5),
                                                           dtype=torch.float64)))
    spec = _spec(len(case), lam=lam_t, **kw)
    for sp in [spec] + ([R.with_lam(spec)] if lam else []):
        got, want = R.layer_report(sp, offs), _reference_layer_report(sp, offs)
        _assert_same_rows([got["layer"]], [want["layer"]])
        _assert_same_rows(got["heads"], want["heads"])
        _assert_same_rows(got["offsets"], want["offsets"])
        if "≻ 0" in case and sp["form"] == "W":
            assert {"convergent", "intermediate"} <= {o["regime"] for o in got["offsets"]}   # both paths used


def test_fast_checkpoint_report_equals_the_reference(tmp_path):
    """A seeded checkpoint (train_lm.build_lm, RoPE, a softplus-diag λ-term, a constrained regime):
    analyse_specs through the fast layer_report and through the reference, row by row."""
    cfg = dict(vocab_size=20, d_model=32, n_layers=2, n_heads=4, seq_len=80, pe="rope", attn_pe="rope",
               lam=0.05, lam_mode="softplus-diag", regime="convergent", mlp_ratio=2.0, dropout=0.0, cutoffs="")
    torch.manual_seed(0)
    model = train_lm.build_lm(cfg)
    path = tmp_path / "run" / "ckpt.pt"
    training.save_checkpoint(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), step=1,
                             config=cfg)
    specs, info = R.checkpoint_layers(str(path))
    rep = R.analyse_specs(specs, name="run", info=info, far_max=info["seq_len"] - 1, progress=False)
    want = {"layers": [], "heads": [], "offset_rows": []}
    for spec in specs:
        offs = R.offset_list(spec["causal"], info["seq_len"] - 1)
        for sp in [dict(spec, form="W"), R.with_lam(spec)]:
            w = _reference_layer_report(dict(sp, source="run"), offs)
            want["layers"].append(w["layer"])
            want["heads"] += w["heads"]
            want["offset_rows"] += w["offsets"]
    for key in want:
        _assert_same_rows(rep[key], want[key])
    assert {r["regime"] for r in rep["layers"] if r["form"] == "W"} == {"convergent"}
