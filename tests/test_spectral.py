"""spectral.decomposition: the logit decompositions are identities, and the Weyl / Schur bounds
(our reconstruction of "spectral contraction", docs/spectral.md §1.3) hold on random instances.
float64 throughout."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rope
from spectral import decomposition

DT = torch.float64
ROOT = Path(__file__).resolve().parent.parent


def _g(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- decompositions (identities)
def test_additive_decomposition_sums_to_the_logits():
    g = _g(0)
    n, d, dk = 12, 16, 8
    C, P = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, d, generator=g, dtype=DT)
    Q, K = torch.randn(d, dk, generator=g, dtype=DT), torch.randn(d, dk, generator=g, dtype=DT)
    B = decomposition.toeplitz(torch.randn(2 * n - 1, generator=g, dtype=DT), n)
    t = decomposition.additive_logits(C, P, Q, K, B)
    X = C + P
    torch.testing.assert_close(t["total"], (X @ Q) @ (X @ K).T + B, rtol=1e-12, atol=1e-12)
    # NoPE: only the content Gram term is non-zero
    t0 = decomposition.additive_logits(C, torch.zeros_like(C), Q, K)
    assert t0["position"].abs().max() == 0 and t0["content_position"].abs().max() == 0
    torch.testing.assert_close(t0["total"], (C @ Q) @ (C @ K).T)


def test_sinusoidal_position_gram_is_toeplitz_but_cross_terms_are_not():
    g = _g(1)
    n, d = 20, 32
    P = rope.sinusoidal_pe(n, d, dtype=DT)
    C = torch.randn(n, d, generator=g, dtype=DT)
    I = torch.eye(d, dtype=DT)
    t = decomposition.additive_logits(C, P, I, I)
    # p_i . p_j = sum_k cos((i - j) w_k): Toeplitz (docs/spectral.md §1.2)
    assert decomposition.is_toeplitz(t["position"])
    assert not decomposition.is_toeplitz(t["content_position"])
    # for general weights the position term is only "Toeplitz-like"
    Q, K = torch.randn(d, d, generator=g, dtype=DT), torch.randn(d, d, generator=g, dtype=DT)
    assert not decomposition.is_toeplitz(decomposition.additive_logits(C, P, Q, K)["position"])


def test_toeplitz_helper_and_alibi_matrix():
    n = 7
    b = torch.arange(2 * n - 1, dtype=DT)
    T = decomposition.toeplitz(b, n)
    i, j = 2, 5
    assert T[i, j] == b[j - i + n - 1]
    assert decomposition.is_toeplitz(T)
    A = decomposition.alibi_matrix(n, 0.5)
    assert A[1, 4] == -1.5 and A[4, 1] == -1.5 and torch.equal(A, A.T)
    with pytest.raises(ValueError):
        decomposition.toeplitz(b[:-1], n)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_rope_logits_equal_hadamard_sum_of_per_frequency_kernels(pairing):
    g = _g(2)
    n, d = 10, 8
    q, k = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, d, generator=g, dtype=DT)
    for positions in (torch.arange(n, dtype=DT), torch.rand(n, generator=g, dtype=DT) * 50):
        direct = rope.apply_rope(q, positions, pairing=pairing) @ rope.apply_rope(k, positions, pairing=pairing).T
        total, terms = decomposition.rope_logits_hadamard(q, k, positions, pairing=pairing)
        assert len(terms) == d // 2
        torch.testing.assert_close(total, direct, rtol=1e-12, atol=1e-12)


def test_rope_kernel_is_rank_one_hermitian_toeplitz_with_unit_diagonal():
    n, theta = 16, 0.37
    E = decomposition.rope_kernel(torch.arange(n), theta)
    torch.testing.assert_close(E, E.mH)
    torch.testing.assert_close(torch.diagonal(E).real, torch.ones(n, dtype=DT))
    assert decomposition.is_toeplitz(E.real) and decomposition.is_toeplitz(E.imag)
    ev = torch.linalg.eigvalsh(E)
    # E = u u^*: one eigenvalue n, the rest zero
    torch.testing.assert_close(ev[-1], torch.tensor(float(n), dtype=DT))
    assert ev[:-1].abs().max() < 1e-10


def test_mla_logits_are_content_plus_rope_term():
    g = _g(3)
    n, dc, dr = 9, 12, 4
    qc, kc = torch.randn(n, dc, generator=g, dtype=DT), torch.randn(n, dc, generator=g, dtype=DT)
    qr, kr = torch.randn(n, dr, generator=g, dtype=DT), torch.randn(n, dr, generator=g, dtype=DT)
    pos = torch.arange(n, dtype=DT)
    out = decomposition.mla_logits(qc, kc, qr, kr, pos)
    q = torch.cat([qc, rope.apply_rope(qr, pos)], -1)
    k = torch.cat([kc, rope.apply_rope(kr, pos)], -1)
    torch.testing.assert_close(out["total"], q @ k.T / math.sqrt(dc + dr), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["content"], qc @ kc.T / math.sqrt(dc + dr))


# ---------------------------------------------------------------- Weyl (additive)
def test_weyl_bound_holds_eigenvalue_by_eigenvalue_on_random_instances():
    g = _g(4)
    for trial in range(30):
        n = int(torch.randint(4, 60, (1,), generator=g))
        A = decomposition.content_gram(n, 16, g, psd=bool(trial % 2))
        S = torch.randn(n, n, generator=g, dtype=DT)
        for B in (decomposition.alibi_matrix(n, float(torch.rand(1, generator=g)) * 2),
                  decomposition.t5_matrix(n, 1.0, g),
                  (S + S.T) / 2):
            lo, hi = decomposition.weyl_bounds(A, B)
            ev = torch.linalg.eigvalsh(A + B)
            tol = 1e-9 * (1 + ev.abs().max())
            assert (ev >= lo - tol).all() and (ev <= hi + tol).all()


def test_alibi_spreads_the_spectrum_and_the_spread_grows_like_n_squared():
    g = _g(5)
    spreads = []
    for n in (16, 32, 64):
        A = decomposition.content_gram(n, 16, g)
        la, lb = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(A + decomposition.alibi_matrix(n, 1.0))
        assert (lb[-1] - lb[0]) > 10 * (la[-1] - la[0])
        spreads.append((lb[-1] - lb[0]).item())
    # doubling n multiplies the spread by about 4
    assert 3.0 < spreads[1] / spreads[0] < 4.5 and 3.0 < spreads[2] / spreads[1] < 4.5


# ---------------------------------------------------------------- Schur (multiplicative)
def test_schur_bound_holds_for_rope_kernels_on_random_instances():
    g = _g(6)
    for trial in range(30):
        n = int(torch.randint(4, 60, (1,), generator=g))
        K = int(torch.randint(1, 12, (1,), generator=g))
        A = decomposition.content_gram(n, 16, g, psd=bool(trial % 2))
        w = torch.rand(K, generator=g, dtype=DT)
        for kind in ("complex", "real"):
            G = decomposition.rope_mixture_kernel(n, K, kind=kind, weights=w / w.sum())
            ev = torch.linalg.eigvalsh(A * G)
            la = torch.linalg.eigvalsh(A)
            lo, hi = decomposition.schur_bounds(A, G)
            # unit diagonal: the interval is exactly the content spectrum's hull
            assert lo == pytest.approx(la[0].item()) and hi == pytest.approx(la[-1].item())
            tol = 1e-9 * (1 + la.abs().max())
            assert ev[0] >= lo - tol and ev[-1] <= hi + tol


def test_schur_bound_with_a_general_psd_kernel():
    g = _g(7)
    for _ in range(20):
        n = 15
        M = torch.randn(n, 3, generator=g, dtype=DT)
        G = M @ M.T                        # PSD, diagonal not constant
        for psd in (True, False):
            A = decomposition.content_gram(n, 8, g, psd=psd)
            lo, hi = decomposition.schur_bounds(A, G)
            ev = torch.linalg.eigvalsh(A * G)
            assert ev[0] >= lo - 1e-9 and ev[-1] <= hi + 1e-9


def test_single_frequency_preserves_the_spectrum_exactly():
    g = _g(8)
    for _ in range(10):
        n = 32
        A = decomposition.content_gram(n, 16, g, psd=False)
        theta = float(torch.rand(1, generator=g)) * 3
        G = decomposition.rope_kernel(torch.arange(n), theta)
        # A o (u u^*) = D_u A D_u^*: a unitary similarity
        torch.testing.assert_close(torch.linalg.eigvalsh(A * G), torch.linalg.eigvalsh(A), rtol=0, atol=1e-10)
        # the real part of the same kernel is not a similarity: the spectrum moves
        assert (torch.linalg.eigvalsh(A * G.real) - torch.linalg.eigvalsh(A)).abs().max() > 1e-3


def test_mixing_frequencies_contracts_strictly():
    g = _g(9)
    A = decomposition.content_gram(64, 64, g)
    la = torch.linalg.eigvalsh(A)
    ev = torch.linalg.eigvalsh(A * decomposition.rope_mixture_kernel(64, 8))
    assert ev[-1] < 0.9 * la[-1] and ev[0] > la[0]


def test_non_hermitian_input_is_refused():
    with pytest.raises(ValueError):
        decomposition.eigvalsh(torch.triu(torch.ones(4, 4, dtype=DT)))
    with pytest.raises(ValueError):
        decomposition.rope_mixture_kernel(8, 0)


# ---------------------------------------------------------------- the script
def test_script_writes_table_and_figure(tmp_path, capsys):
    out = tmp_path / "res"
    rc = decomposition.main(["--n", "8,16", "--freqs", "1,4", "--trials", "2", "--dim", "8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert (out / "spectral_table.md").read_text().strip() in printed     # the table is printed, not only written
    rows = (out / "spectral_table.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 2 * 4
    assert all(r.split(",")[-1] == "True" for r in rows[1:])
    assert (out / "spectral.png").stat().st_size > 1000 and (out / "spectral_table.md").exists()


def test_script_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "res"
    assert decomposition.main(["--base", "nan", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "base" in err
    assert not os.path.exists(out)


def test_script_runs_in_module_form_from_the_project_root():
    r = subprocess.run([sys.executable, "-m", "spectral.decomposition", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m spectral.decomposition")
