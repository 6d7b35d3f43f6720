"""The from-scratch minifloat formats (FP8 E4M3 and E5M2, FP4 E2M1), checked against PyTorch's casts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlesson import LessonError
from quantlesson.scratch import minifloat as mf

TORCH = {"E4M3": torch.float8_e4m3fn, "E5M2": torch.float8_e5m2}


def spread(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Values over many binades, subnormals and saturation included, with both zeros."""
    torch.manual_seed(seed)
    scales = torch.logspace(-12, 6, 19)
    return torch.cat([torch.randn(n) * s for s in scales] + [torch.tensor([0.0, -0.0])])


@pytest.mark.parametrize("name", TORCH)
def test_codes_equal_pytorchs_cast_after_clamping(name):
    fmt, dtype = mf.FORMATS[name], TORCH[name]
    x = spread()
    theirs = x.clamp(-fmt.max, fmt.max).to(dtype).view(torch.uint8)
    assert torch.equal(mf.encode(x, fmt), theirs)


@pytest.mark.parametrize("name", TORCH)
def test_ties_go_to_the_even_code_as_in_pytorch(name):
    fmt, dtype = mf.FORMATS[name], TORCH[name]
    values = mf.grid(fmt).double()
    midpoints = ((values[1:] + values[:-1]) / 2).float()  # exactly halfway, every one of them
    midpoints = torch.cat([midpoints, -midpoints])
    assert torch.equal(mf.encode(midpoints, fmt), midpoints.to(dtype).view(torch.uint8))


@pytest.mark.parametrize("name", TORCH)
def test_decode_reads_every_finite_pattern_as_pytorch_does(name):
    fmt, dtype = mf.FORMATS[name], TORCH[name]
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(dtype).float()
    finite = torch.isfinite(values)
    assert torch.equal(mf.decode(codes[finite], fmt), values[finite])


def test_e2m1_holds_the_eight_values_of_the_standard():
    assert mf.grid(mf.E2M1).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(mf.encode(mf.decode(codes, mf.E2M1), mf.E2M1), codes)  # every pattern round-trips, -0 too


def test_ties_toward_zero_take_the_smaller_magnitude():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert mf.round_to(ties, mf.E2M1, "toward-zero").tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    assert mf.round_to(ties, mf.E2M1, "even").tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert mf.round_to(-ties, mf.E2M1, "toward-zero").tolist() == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=50),
       st.sampled_from(list(mf.FORMATS)))
def test_rounding_picks_a_nearest_grid_value_and_saturates(values, name):
    fmt = mf.FORMATS[name]
    x = torch.tensor(values)
    rounded = mf.round_to(x, fmt)
    grid = torch.cat([-mf.grid(fmt).flip(0), mf.grid(fmt)]).double()
    nearest = (x.double().clamp(-fmt.max, fmt.max)[:, None] - grid).abs().amin(1)
    assert torch.equal((x.double().clamp(-fmt.max, fmt.max) - rounded.double()).abs(), nearest)
    assert rounded.abs().max() <= fmt.max


@pytest.mark.parametrize("bad,phrase", [(torch.tensor([1.0, float("nan")]), "NaN"), (torch.tensor([1, 2]), "real numbers")])
def test_bad_input_is_a_lesson_error(bad, phrase):
    with pytest.raises(LessonError, match=phrase):
        mf.encode(bad, mf.E4M3)
    with pytest.raises(LessonError, match="ties"):
        mf.round_to(torch.ones(2), mf.E2M1, ties="up")
