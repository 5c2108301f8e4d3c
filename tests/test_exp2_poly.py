"""exp2_poly (csrc/kernels/sm90/decode/tile_attention.cuh, the JFM_SOFTMAX_POLY_EXP candidate)
emulated step by step in float32 with the coefficients read from the source: relative error at
most 3e-7 where 2^x is a normal float, exactly 0 for x <= -126 (a masked logit's -inf), so a
typo in a coefficient or a wrong exponent shift fails here, not as an lse mismatch on the GPU."""
import os
import re

import numpy as np

SRC = os.path.join(os.path.dirname(__file__), "..", "csrc", "kernels", "sm90", "decode",
                   "tile_attention.cuh")


def _body():
    text = open(SRC).read()
    start = text.index("float exp2_poly(float x)")
    return text[start:text.index("\n}\n", start)]


def _coefficients():
    body = _body()
    first = re.search(r"float p = ([0-9.eE+-]+)f;", body).group(1)
    rest = re.findall(r"p = __fmaf_rn\(p, f, ([0-9.eE+-]+)f\);", body)
    return [np.float32(float(c)) for c in [first, *rest]]


def _exp2_poly(x, coeffs):
    """The device function's operations, each rounded to float32 (the FMAs fused)."""
    f32 = np.float32
    k_round = f32(12582912.0)
    xc = max(f32(x), f32(-126.0))
    t = f32(xc + k_round)
    f = f32(xc - f32(t - k_round))
    p = coeffs[0]
    for c in coeffs[1:]:
        p = f32(np.float64(p) * np.float64(f) + np.float64(c))
    bits = np.int32(np.array(p, f32).view(np.int32)) + (np.array(t, f32).view(np.int32) << 23)
    r = np.array(bits, np.int32).view(f32)[()]
    return r if x > -126.0 else f32(0.0)


def test_exp2_poly_source_form():
    body = _body()
    # The steps _exp2_poly emulates, as written in the device function.
    for step in ("fmaxf(x, -126.f)", "__fadd_rn(xc, kRound)",
                 "__fadd_rn(xc, -__fadd_rn(t, -kRound))",
                 "__float_as_int(p) + (__float_as_int(t) << 23)", "x > -126.f ? r : 0.f",
                 "kRound = 12582912.f"):
        assert step in body, step
    assert len(_coefficients()) == 6


def test_exp2_poly_accuracy_and_zero():
    coeffs = _coefficients()
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.uniform(-125.5, 12.0, 20000), np.linspace(-2.0, 2.0, 4001),
                         [0.0, 0.5, -0.5, 1e-7, -1e-7, 11.99]]).astype(np.float32)
    worst = 0.0
    for x in xs:
        want = np.exp2(np.float64(x))
        got = np.float64(_exp2_poly(x, coeffs))
        worst = max(worst, abs(got - want) / want)
    assert worst <= 3e-7, worst
    for x in (-np.inf, -1e30, -200.0, -126.0):
        assert _exp2_poly(np.float32(x), coeffs) == 0.0
