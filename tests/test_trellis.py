"""The bitshift trellis from scratch: Viterbi finds the best walk, the error falls with bits and with memory,
the trellis beats scalar round-to-nearest at the same bits, the procedural codebooks match QTIP's and EXL3's,
and tail-biting walks are cycles."""

import itertools

import pytest
import torch

from quantlesson import LessonError
from quantlesson.scratch import trellis


def gaussian(rows: int = 32, columns: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def every_walk(K: int, L: int, T: int) -> torch.Tensor:
    """All walks of T states, ``[2**L * 2**(K*(T-1)), T]``, built by shifting bits in, independently of the module."""
    walks = []
    for start in range(2**L):
        for groups in itertools.product(range(2**K), repeat=T - 1):
            walk = [start]
            for bits in groups:
                walk.append(((walk[-1] << K) | bits) & (2**L - 1))
            walks.append(walk)
    return torch.tensor(walks)


def assert_valid_walk(states: torch.Tensor, K: int, L: int) -> None:
    for t in range(states.shape[-1] - 1):
        reachable = trellis.next_states(states[..., t], K, L)  # [..., 2**K]
        assert (reachable == states[..., t + 1, None]).any(-1).all()
        assert torch.equal(states[..., t + 1] >> K, states[..., t] & (2 ** (L - K) - 1))  # the shared L-K bits


@pytest.mark.parametrize("K, T", [(1, 6), (2, 5)])
@pytest.mark.parametrize("kind", ["mul1", "3inst"])
def test_viterbi_finds_the_best_walk(K, T, kind):
    L = 4
    values = trellis.codebook(L, kind).double()
    walks = every_walk(K, L, T)
    for seed in range(3):
        x = torch.randn(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        errors = ((values[walks] - x) ** 2).sum(-1)  # [n_walks]
        states = trellis.viterbi(x, values, K, L)
        assert_valid_walk(states, K, L)
        assert torch.isclose(((values[states] - x) ** 2).sum(), errors.min())
        for overlap in range(2 ** (L - K)):  # constrained to a cycle: the best walk among those that close it
            closes = ((walks[:, 0] >> K) == overlap) & ((walks[:, -1] & (2 ** (L - K) - 1)) == overlap)
            states = trellis.viterbi(x, values, K, L, overlap=torch.tensor(overlap))
            assert_valid_walk(states, K, L)
            assert states[0] >> K == overlap and states[-1] & (2 ** (L - K) - 1) == overlap
            assert torch.isclose(((values[states] - x) ** 2).sum(), errors[closes].min())


def mse(w_hat: torch.Tensor, w: torch.Tensor) -> float:
    return ((w_hat - w) ** 2).mean().item()


def test_error_falls_with_bits_and_with_longer_memory():
    w = gaussian()
    errors = [mse(trellis.quantize_rows(w, K, L=10)[0], w) for K in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2]
    short, long = (mse(trellis.quantize_rows(w, 2, L)[0], w) for L in (6, 10))
    assert long < short  # the same 2 bits a weight, a codebook of 2**10 values instead of 2**6


def best_uniform_grid_mse(x: torch.Tensor, bits: int) -> float:
    """The best 2**bits-level uniform grid (mid-rise, step searched per row) for unit-RMS rows: any scalar grid's rival."""
    n = 2**bits
    best = torch.full((x.shape[0],), torch.inf)
    for step in torch.linspace(0.05, 2.0, 400).tolist():
        q = (torch.clamp(torch.floor(x / step), -n // 2, n // 2 - 1) + 0.5) * step
        best = torch.minimum(best, ((q - x) ** 2).mean(1))
    return best.mean().item()


@pytest.mark.parametrize("K", [2, 3, 4])
def test_trellis_beats_scalar_rounding_at_the_same_bits(K):
    w = gaussian()
    w = w / w.pow(2).mean(1, keepdim=True).sqrt()  # unit RMS rows, so the grid search sees the trellis's scale
    w_hat, bits = trellis.quantize_rows(w, K, L=10)
    assert bits == K + 16 / w.shape[1]  # K bits a weight and a float16 scale a row, as per-row RTN stores
    assert mse(w_hat, w) < trellis.uniform_mse(w, K)
    assert mse(w_hat, w) < best_uniform_grid_mse(w, K)


@pytest.mark.parametrize("kind", sorted(trellis.CODEBOOKS))
def test_codebook_is_deterministic_and_roughly_gaussian(kind):
    values = trellis.codebook(12, kind)
    assert values.shape == (2**12,) and torch.equal(values, trellis.codebook(12, kind))
    assert abs(values.pow(2).mean().item() - 1) < 1e-5 and abs(values.mean().item()) < 0.05
    kurtosis = ((values - values.mean()) ** 4).mean() / values.var(unbiased=False) ** 2
    assert 2.5 < kurtosis < 3.3  # a Gaussian has 3; uniform values 1.8
    assert values.unique().numel() > 500


def test_codebook_spread_matches_qtip_and_exllamav3():
    states = torch.arange(2**16)
    multiplier, increment, _ = trellis.CODEBOOKS["3inst"]
    spread = trellis.two_halves(trellis.lcg(states, multiplier, increment)).std(unbiased=False)
    assert abs(spread.item() - 1.24371088) < 1e-4  # exllamav3's codebook_scale
    multiplier, increment, _ = trellis.CODEBOOKS["1mad"]
    spread = trellis.byte_sum(trellis.lcg(states, multiplier, increment)).std(unbiased=False)
    assert abs(spread.item() - 147.8) < 0.1  # QTIP's decode_1mad divides by 147.800537109375


def test_decoding_the_states_gives_the_reconstruction():
    K, L, T = 3, 8, 64
    w = gaussian(8, 128, seed=1)
    w_hat, _ = trellis.quantize_rows(w, K, L, T)
    rms = w.pow(2).mean(1, keepdim=True).sqrt()
    values = trellis.codebook(L)
    states = trellis.tail_biting((w / rms).reshape(-1, T), values, K, L)
    assert torch.allclose(trellis.decode(states, values).reshape(w.shape) * rms, w_hat)


def test_tail_biting_walks_are_cycles_and_cost_little():
    K, L, T = 2, 8, 64
    x = gaussian(16, T, seed=2)
    values = trellis.codebook(L)
    cyclic, free = trellis.tail_biting(x, values, K, L), trellis.viterbi(x, values, K, L)
    assert_valid_walk(cyclic, K, L)
    assert torch.equal(cyclic[:, 0] >> K, cyclic[:, -1] & (2 ** (L - K) - 1))  # the last state leads into the first
    assert not torch.equal(free[:, 0] >> K, free[:, -1] & (2 ** (L - K) - 1))  # which a free walk does not do
    cyclic_error, free_error = (((trellis.decode(s, values) - x) ** 2).sum(1) for s in (cyclic, free))
    assert (cyclic_error >= free_error - 1e-4).all()  # the free walk is the optimum
    assert cyclic_error.sum() < 1.1 * free_error.sum()  # and the cycle costs little more
    _, bits = trellis.quantize_rows(x, K, L, T)
    _, free_bits = trellis.quantize_rows(x, K, L, T, cyclic=False)
    assert free_bits - bits == pytest.approx((L - K) / T)  # the first state's L-K bits that a cycle need not store


def test_bad_input_is_a_lesson_error():
    w = gaussian(4, 64)
    with pytest.raises(LessonError, match="1 <= K < L"):
        trellis.quantize_rows(w, K=8, L=8, T=64)
    with pytest.raises(LessonError, match="1 <= K < L"):
        trellis.viterbi(w[0], trellis.codebook(8), K=0, L=8)
    with pytest.raises(LessonError, match="L=20"):
        trellis.codebook(20)
    with pytest.raises(LessonError, match="no codebook"):
        trellis.codebook(8, "lut")
    with pytest.raises(LessonError, match="2-D weight"):
        trellis.quantize_rows(w[0], K=2, L=8, T=64)
    with pytest.raises(LessonError, match="does not divide"):
        trellis.quantize_rows(w, K=2, L=8, T=48)
    with pytest.raises(LessonError, match="T \\* K >= L"):
        trellis.quantize_rows(w, K=2, L=8, T=2)
