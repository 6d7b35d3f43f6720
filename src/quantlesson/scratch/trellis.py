"""Trellis-coded quantization from scratch: the bitshift trellis of QTIP, which EXL3 (ExLlamaV3) is built on.

A scalar quantizer gives each weight its own code. A *bitshift trellis* makes the codes of neighbouring weights
overlap: an ``L``-bit state walks along a sequence of ``T`` weights, and at each step ``K`` new bits are shifted in,
``state = ((state << K) | bits) & (2**L - 1)``. Each weight costs ``K`` bits, yet it is reconstructed from a
table of ``2**L`` values (the *codebook*), because the ``L - K`` older bits in the state take part too. The best
walk, the one with the least squared error, is found exactly by the Viterbi algorithm (dynamic programming).
With ``L`` well above ``K``, on Gaussian data this beats every scalar quantizer of ``K`` bits and comes near the
rate-distortion limit ``2**(-2K)`` (QTIP: Tseng et al. 2024, arXiv 2406.11235). The weights are made Gaussian first by a randomized
Hadamard rotation (incoherence): see :mod:`quantlesson.scratch.hadamard`.

The codebook is *procedural*: the value of a state is a cheap hash of its number, so no table is stored.
:func:`codebook` matches these definitions, constant for constant:

* ``"1mad"``: QTIP's ``decode_1mad`` (github.com/Cornell-RelaxML/qtip, ``lib/codebook/bitshift.py``):
  ``x = state * 34038481 + 76625530 mod 2**32``, then the sum of the 4 bytes of ``x``, minus 510, over 147.8
  (a sum of 4 uniform bytes is nearly Gaussian).
* ``"3inst"``: QTIP's ``decode_3inst``, which is ExLlamaV3's codebook 0 (github.com/turboderp-org/exllamav3,
  ``exllamav3/exllamav3_ext/quant/codebook.cuh``, ``decode_3inst<0>``): ``x = state * 89226354 + 64248484``,
  then ``(x & 0x8FFF8FFF) ^ 0x3B603B60`` read as two float16 numbers, added. Their spread (1.2437 at ``L=16``) is
  ExLlamaV3's ``codebook_scale = 1.24371088`` (``exllamav3/modules/quant/exl3_lib/quantize.py``).
* ``"mcg"``: ExLlamaV3's codebook 1, the same with ``x = state * 0xCBAC1FED`` (no increment).
* ``"mul1"``: ExLlamaV3's codebook 2 and its default (``convert_model.py --codebook mul1``):
  ``x = state * 0x83DCD12D``, then the byte sum as in 1MAD (``(sum - 510) / 147.7``).

Tail-biting, as QTIP's ``bitshift_codebook.quantize`` and ExLlamaV3's ``quantize_tiles_kernel.cuh`` do it: the
walk is a cycle (the first state's high ``L - K`` bits are the last state's low ``L - K`` bits), so exactly ``K``
bits per weight are stored. Two Viterbi passes: one on the sequence rolled by ``T/2`` picks those shared bits,
the second is constrained to them. This is a good walk, not always the best cycle.

Cost: each step keeps the best cost of all ``2**L`` states; a state has ``2**K`` predecessors, but states with the
same high bits share them, so a step is ``2**L`` additions and comparisons: ``O(T * 2**L)`` per sequence, in
place of the naive ``O(T * 2**L * 2**K)``; memory ``T * 2**(L-K)`` bytes of back-pointers.

What this teaching version leaves out or simplifies, compared with EXL3 (``exl3_lib/quantize.py``):

* ``L`` is small (8 to 12; EXL3 and QTIP use 16) so that a layer encodes in seconds on a CPU. The error is a
  little higher: at 2 bits on Gaussian data this code gets about 0.074 at L=12 and 0.068 at L=16 (the best scalar
  quantizer 0.117, the limit 0.0625). ``L`` must stay well above ``K``: a step chooses among ``2**K`` of the values,
  and with few states (L=8, K=4) the walk can lose to a plain uniform grid.
* A sequence is ``T`` consecutive weights of a row (EXL3: a 16x16 tile of 256 weights, in tensor-core order).
* One scale per row, its RMS (EXL3: random sign flips on both sides, RMS scales of the input channels and, for
  some layers, of the output channels, 128-wide Hadamard blocks on both sides, and a searched global scale).
* No Hessian: plain squared error, no LDLQ error feedback (EXL3 and QTIP quantize tile rows with LDLQ, as GPTQ).
* Values in float32 (EXL3 computes the codebook and the Viterbi costs in float16).
"""

from __future__ import annotations

import torch

from quantlesson.errors import LessonError
from quantlesson.scratch import rtn

CODEBOOKS = {  # kind: (multiplier, increment, how 32 random bits become a number)
    "1mad": (34038481, 76625530, "bytes"),
    "3inst": (89226354, 64248484, "halves"),
    "mcg": (0xCBAC1FED, 0, "halves"),
    "mul1": (0x83DCD12D, 0, "bytes"),
}


def check(K: int, L: int, T: int | None = None, kind: str = "mul1") -> None:
    """Raise a clear :class:`LessonError` for a trellis this code cannot run."""
    if not 2 <= L <= 16:
        raise LessonError(f"L={L}: the state has L bits and the codebook 2**L values; use 2 to 16 (8 to 12 runs fast on a CPU).")
    if not 1 <= K < min(L, 9):
        raise LessonError(f"K={K}: each step shifts K new bits into the L={L}-bit state, so 1 <= K < L (and K <= 8): try K=2, 3 or 4.")
    if kind not in CODEBOOKS:
        raise LessonError(f"kind={kind!r} is no codebook here: use one of {sorted(CODEBOOKS)}.")
    if T is not None and T * K < L:
        raise LessonError(f"T={T}: a sequence of T steps must hold at least one whole state (T * K >= L={L}); use a longer T such as 256.")


def lcg(state: torch.Tensor, multiplier: int, increment: int) -> torch.Tensor:
    """One step of a linear congruential generator: ``state * multiplier + increment mod 2**32`` (int64)."""
    return (state.long() * multiplier + increment) & 0xFFFFFFFF


def byte_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of the 4 bytes of ``x``, minus its mean 510: an Irwin-Hall (almost Gaussian) number, std 147.8."""
    return sum((x >> shift) & 0xFF for shift in (0, 8, 16, 24)).float() - 510


def two_halves(x: torch.Tensor) -> torch.Tensor:
    """3INST's trick: keep sign, 2 exponent and 10 mantissa bits of each 16-bit half, fix the rest, add the halves."""
    x = (x & 0x8FFF8FFF) ^ 0x3B603B60  # two float16 numbers, magnitudes 1/8 to 2, random signs

    def as_half(bits):
        return torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16).view(torch.float16)

    return (as_half(x >> 16) + as_half(x & 0xFFFF)).float()


def codebook(L: int, kind: str = "mul1") -> torch.Tensor:
    """The value of every state, ``[2**L]`` float32, divided by their RMS (unit second moment)."""
    check(1, L, kind=kind)
    multiplier, increment, reduce = CODEBOOKS[kind]
    x = lcg(torch.arange(2**L), multiplier, increment)
    values = byte_sum(x) if reduce == "bytes" else two_halves(x)
    return values / values.pow(2).mean().sqrt()


def next_states(state: torch.Tensor, K: int, L: int) -> torch.Tensor:
    """The ``2**K`` states one step after ``state``: ``[..., 2**K]``."""
    return ((state[..., None] << K) | torch.arange(2**K)) & (2**L - 1)


def viterbi(x: torch.Tensor, values: torch.Tensor, K: int, L: int, overlap: torch.Tensor | None = None) -> torch.Tensor:
    """The walk of least squared error through the trellis: ``x [B, T]`` (or ``[T]``) -> states, same shape (int64).

    ``overlap [B]``: if given, the walk must start in a state whose high ``L-K`` bits are ``overlap`` and end in
    one whose low ``L-K`` bits are ``overlap`` (a tail-biting cycle).
    """
    if x.dim() == 1:
        return viterbi(x[None], values, K, L, None if overlap is None else torch.as_tensor(overlap).reshape(1))[0]
    check(K, L)
    B, T = x.shape
    E = 2 ** (L - K)  # edges: the L-K bits two neighbouring states share
    states = torch.arange(2**L)
    cost = (values - x[:, :1]) ** 2  # [B, 2**L]: best error of a walk ending in each state
    if overlap is not None:
        cost = torch.where((states >> K) == overlap[:, None], cost, torch.inf)
    choice = torch.zeros(T, B, E, dtype=torch.uint8)  # the best predecessor's high K bits, per step and edge
    for t in range(1, T):
        # state p = (d << L-K) | e is followed by the states (e << K) | bits: keep the best d of each edge e
        best, choice[t] = cost.view(B, 2**K, E).min(dim=1)  # [B, E]
        cost = best.repeat_interleave(2**K, dim=1) + (values - x[:, t : t + 1]) ** 2
    if overlap is not None:
        cost = torch.where((states & (E - 1)) == overlap[:, None], cost, torch.inf)
    path = torch.zeros(B, T, dtype=torch.int64)
    path[:, -1] = cost.argmin(dim=1)
    for t in range(T - 1, 0, -1):  # back-track: the edge comes from the state, the high bits from choice
        edge = path[:, t] >> K
        path[:, t - 1] = (choice[t].gather(1, edge[:, None])[:, 0].long() << (L - K)) | edge
    return path


def tail_biting(x: torch.Tensor, values: torch.Tensor, K: int, L: int) -> torch.Tensor:
    """A cyclic walk for ``x [B, T]`` (QTIP's two passes): pick the shared bits on ``x`` rolled by ``T/2``, then encode."""
    T = x.shape[-1]
    rolled = viterbi(torch.roll(x, T // 2, dims=-1), values, K, L)
    overlap = rolled[..., T // 2] >> K  # the state at position 0 of x, its high L-K bits
    return viterbi(x, values, K, L, overlap)


def decode(states: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The reconstruction: each state's codebook value, same shape as ``states``."""
    return values[states]


def quantize_rows(
    w: torch.Tensor, K: int = 2, L: int = 12, T: int = 256, kind: str = "mul1", cyclic: bool = True,
) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Trellis-quantize a ``[out, in]`` weight in sequences of ``T`` weights of a row, scaled by the row's RMS.

    Returns the reconstruction ``[out, in]`` (dtype of ``w``) and the bits per weight, counting a float16 scale
    per row and, without tail-biting (``cyclic=False``), the ``L - K`` bits of each sequence's first state.
    """
    if w.dim() != 2:
        raise LessonError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}: pass a linear layer's weight.")
    rtn.check_weight(w)  # floating point, not empty, finite
    check(K, L, T, kind)
    out_features, in_features = w.shape
    if in_features % T:
        raise LessonError(f"T={T} does not divide the {in_features} input columns: use a divisor such as 64 or 256.")
    scale = w.float().pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)  # [out, 1]
    x = (w.float() / scale).reshape(-1, T)  # [out * in / T, T], unit RMS
    values = codebook(L, kind)
    encode = tail_biting if cyclic else viterbi
    at_once = max(1, 2**26 // (T * 2**L))  # sequences per Viterbi call: back-pointers under 64 MB
    states = torch.cat([encode(part, values, K, L) for part in x.split(at_once)])
    w_hat = (decode(states, values).reshape(out_features, in_features) * scale).to(w.dtype)
    bits = K + (0 if cyclic else (L - K) / T) + 16 / in_features
    return w_hat, bits


def uniform_mse(w: torch.Tensor, bits: int) -> float:
    """Mean squared error of round-to-nearest (:mod:`rtn`, one scale per row) with each row's best clipping."""
    w = w.float()
    clips = torch.linspace(0.2, 1, 41).tolist()
    errors = torch.stack([((rtn.fake_quantize(w, bits, None, clip=clip) - w) ** 2).mean(1) for clip in clips])  # [n_clips, out]
    return errors.amin(0).mean().item()  # the best clip of each row
