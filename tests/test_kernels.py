"""Tests for llmbench.kernels (compiled small-M linear kernels + torch fallback).

The compiled-path tests FAIL when the extension is not built (build it with
`python tools/build_kernels.py`), unless LLMBENCH_ALLOW_NO_KERNELS=1, in which
case they are skipped.  Every ISA path usable on this CPU (generic, avx2,
avx512) is tested.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import llmbench.kernels as K  # noqa: E402
from llmbench.kernels import reference as R  # noqa: E402

ALLOW_NO_KERNELS = os.environ.get("LLMBENCH_ALLOW_NO_KERNELS", "") == "1"
ISAS = K.supported_isas() or ["<not built>"]

# (M, N, K, int4 group_size)
SHAPES = [
    (1, 37, 577, None),  # odd K: vector body + 1..15-element scalar tail; N % 4 != 0
    (3, 64, 100, 100),  # K % 8 != 0; int4 per-channel with a partial 32-block
    (16, 130, 576, 64),  # M = SMALL_M_MAX, N % 4 == 2
    (2, 5, 1536, 128),
    (5, 9, 96, 32),  # M = 4 + 1 tile split, int4 smallest group
    (1, 3, 6, 6),  # K < vector width: tail only
    (1, 21, 512, 128),  # batch-1 decode over whole 32-blocks
    (32, 70, 578, None),  # a short prefill: full activation tiles, a 2-row tail, a K tail
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test shapes are below the kernels' per-thread grain anyway (except in
    # test_thread_count_invariance); one thread keeps torch's reference ops fast
    # on a busy 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=ISAS)
def isa(request):
    if not K.supported_isas():
        msg = (
            "llmbench.kernels C++ extension is not built/importable "
            f"({K.import_error()}). Build it with `python tools/build_kernels.py` "
            "(set LLMBENCH_ALLOW_NO_KERNELS=1 to skip these tests)."
        )
        if ALLOW_NO_KERNELS:
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)
    K.set_isa(request.param)
    assert K.isa() == request.param
    try:
        yield request.param
    finally:
        K.set_isa("auto")


def _data(M, N, Kd, bias, seed=0):
    g = torch.Generator().manual_seed(seed * 1000003 + M * 7919 + N * 31 + Kd)
    x = torch.randn(M, Kd, generator=g)
    w = torch.randn(N, Kd, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    return x, w, b


def _check(y, ref, x, w_deq, b, tol=1e-5, int16_x=False):
    """|y - ref| <= tol * (|x| @ |W|^T + |b|): reassociation-level error only. With int16_x,
    plus what rounding x to int16 (one scale per row, as the AVX2/AVX-512 int8 and int4 kernels
    do) can cost: max|x_row| / 65534 * sum_k |W[n, k]|, where int16_x may give the weights
    that multiply the rounded x instead of W (int4: the raw levels q * s, before the zero
    point)."""
    assert y.dtype == torch.float32 and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    x2 = x.reshape(-1, x.shape[-1])
    bound = x2.abs() @ w_deq.abs().T
    if b is not None:
        bound = bound + b.abs()
    if int16_x is not False:
        w_rounded = w_deq if int16_x is True else int16_x
        rounding = x2.abs().amax(-1, keepdim=True) / 65534 * w_rounded.abs().sum(-1)
        bound = bound + rounding / tol * 1.01
    bound = bound.reshape(ref.shape) + 1e-30
    err = ((y - ref).abs() / bound).max().item() if y.numel() else 0.0
    assert err <= tol, f"max relative error {err:.3e} > {tol:.0e}"


def _int4(w, gs):
    return R.quantize_int4(w, gs if gs else w.shape[1])


# --------------------------------------------------------------------------
# compiled kernels vs reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,Kd,gs", SHAPES)
def test_linear_f32(isa, M, N, Kd, gs, bias):
    x, w, b = _data(M, N, Kd, bias)
    _check(K.linear_f32(x, w, b), R.linear_f32(x, w, b), x, w, b)


@pytest.mark.parametrize("M", [12, 13, 16, 20, 33, 40, 46, 64, 70, 150])
def test_linear_f32_outer_products(isa, M):
    """fp32 prefills as outer products (gemv_impl.h, AVX2 and AVX-512 paths; the dense tiles
    elsewhere), and bf16 ones on AVX2 (each tile's rows widened first): one padded vector, none
    between one and two vectors, a remainder on the dense tiles (40, 70), a padded last vector
    (46), several chunks (70, 150), weight-row tails (N % 8), a K tail, a bias, and rows of x
    further apart than K (a column slice)."""
    x, w, b = _data(M, 141, 67, True)
    wide = torch.zeros(M, 80)
    wide[:, :67] = x
    compiled = K.compiled()
    _check(compiled.linear_f32(wide[:, :67], w, b), R.linear_f32(x, w, b), x, w, b)
    _check(compiled.linear_f32(x, w, None), R.linear_f32(x, w, None), x, w, None)
    wb = w.bfloat16()
    _check(compiled.linear_bf16w(wide[:, :67], wb, b), R.linear_bf16w(x, wb, b), x, wb.float(), b)
    _check(compiled.linear_bf16w(x, wb, None), R.linear_bf16w(x, wb, None), x, wb.float(), None)


def test_set_outer_rows_switches_the_outer_products(isa):
    """set_outer_rows (A/B runs): 0 keeps every row count on the dot-product tiles, -1 restores
    the path's threshold; the results agree with the reference either way, and differ from
    each other only by summation order where the path has outer products."""
    x, w, b = _data(32, 141, 67, True)
    compiled = K.compiled()
    assert compiled.set_outer_rows() == -1
    try:
        assert compiled.set_outer_rows(0) == 0
        dense = compiled.linear_f32(x, w, b)
    finally:
        assert compiled.set_outer_rows(-1) == -1
    outer = compiled.linear_f32(x, w, b)
    for y in (dense, outer):
        _check(y, R.linear_f32(x, w, b), x, w, b)
    if isa.startswith("avx512"):
        assert not torch.equal(dense, outer)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,Kd,gs", SHAPES)
def test_linear_bf16w(isa, M, N, Kd, gs, bias):
    x, w, b = _data(M, N, Kd, bias)
    wb = w.bfloat16()
    _check(K.linear_bf16w(x, wb, b), R.linear_bf16w(x, wb, b), x, wb.float(), b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,Kd,gs", SHAPES)
def test_linear_int8w(isa, M, N, Kd, gs, bias):
    x, w, b = _data(M, N, Kd, bias)
    q, s = R.quantize_int8(w)
    _check(K.linear_int8w(x, q, s, b), R.linear_int8w(x, q, s, b), x, R.dequantize_int8(q, s), b,
           int16_x=True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,Kd,gs", [s for s in SHAPES if s[2] % 2 == 0])
def test_linear_int4w(isa, M, N, Kd, gs, bias):
    x, w, b = _data(M, N, Kd, bias)
    gs = gs or Kd
    p, s, z = R.quantize_int4(w, gs)
    # non-integer zeros are allowed too
    z = z + torch.rand(z.shape, generator=torch.Generator().manual_seed(1)) - 0.5
    ref = R.linear_int4w(x, p, s, z, gs, b)
    _check(K.linear_int4w(x, p, s, z, gs, b), ref, x, R.dequantize_int4(p, s, z, gs), b,
           int16_x=_int4_levels(p, s, gs))


def _int4_levels(packed, scales, gs):
    """q * s (the zero point left out): what the int4 kernels multiply int16-rounded x by."""
    return R.dequantize_int4(packed, scales, torch.zeros_like(scales), gs)


@pytest.mark.parametrize("M", [1, 2, 13])  # 13: prefill paths (dequantized fp32 tiles)
def test_int4_group_sizes(isa, M):
    x, w, b = _data(M, 12, 512, True)
    for gs in (32, 64, 128, 256, 512):
        p, s, z = R.quantize_int4(w, gs)
        _check(
            K.linear_int4w(x, p, s, z, gs, b),
            R.linear_int4w(x, p, s, z, gs, b),
            x,
            R.dequantize_int4(p, s, z, gs),
            b,
            int16_x=_int4_levels(p, s, gs),
        )


@pytest.mark.parametrize("mode", ["PER_BATCH_SYM", "PER_TENSOR_SYM", "PER_BATCH_IC_BLOCK_SYM",
                                  "PER_BATCH"])
@pytest.mark.parametrize("M", [1, 2, 17, 300])  # 300: above the int4 kernels' row limit
def test_int4_with_int8_activations(isa, mode, M):
    """--lowp-mode INT8 on INT4 weights: the product of x's int8 levels, on every path. Where
    AMX-INT8 takes it (symmetric levels, avx512vnni path, 2+ rows) or the path's u8 x s8
    kernels do (symmetric levels, AVX2 and AVX-512) the int32 sums are exact, so only
    reassociation error is left; the int16 kernels (set_i4q8(0)) may round the levels again."""
    from llmbench.kernels.int8_act import reference_levels
    from llmbench.quant.scheme import act_levels_for

    x, w, b = _data(M, 47, 640, True)  # 47 rows: the 3-row tiles' last two rows one by one
    x = x * 3 + 0.25
    gs = 128
    spec = act_levels_for(mode, gs)
    p, s, z = R.quantize_int4(w, gs)
    levels = reference_levels(x, spec)
    ref = R.linear_int4w(levels, p, s, z, gs, b)
    y = K.linear_int4w(x, p, s, z, gs, b, act=spec)
    C = K.compiled()
    amx = bool(C.amx_i4_takes(M, 640, gs, spec.sym, spec.block))
    assert not amx or (isa == "avx512vnni" and spec.sym and M >= 2)
    u8s8 = spec.sym and M <= K.STREAM_M_MAX["int4_lowp"] and C.set_i4q8()
    assert u8s8 == (spec.sym and M <= K.STREAM_M_MAX["int4_lowp"] and isa.startswith("avx"))
    exact = amx or u8s8
    _check(y, ref, levels, R.dequantize_int4(p, s, z, gs), b,
           int16_x=False if exact else _int4_levels(p, s, gs))
    if u8s8 and not amx:  # the same on the int16 kernels
        try:
            C.set_i4q8(0)
            _check(K.linear_int4w(x, p, s, z, gs, b, act=spec), ref, levels,
                   R.dequantize_int4(p, s, z, gs), b, int16_x=_int4_levels(p, s, gs))
        finally:
            C.set_i4q8(1)


@pytest.mark.parametrize("M", [2, 17, 300])
def test_int8_with_dynamic_int8_activations(isa, M):
    """--lowp-mode INT8 on INT8 weights (per-row int8 activations): the exact int32 sums of
    int8_act.reference on every path and row count: the kernels, AMX-INT8 where it takes them
    (avx512vnni path), torch._int_mm or fp32 GEMM beyond."""
    from llmbench.kernels import int8_act

    x, w, b = _data(M, 45, 640, True)
    q, s = R.quantize_int8(w)
    scales = int8_act.dynamic_scales(x)
    ref = int8_act.reference(x, scales, q, s, b)
    y = int8_act.linear_w8a8(x, None, q, s, b)
    amx = bool(K.compiled().amx_i8_takes(M, 640))
    assert not amx or isa == "avx512vnni"
    levels = int8_act.quantize_activations(x, scales) * scales[:, None]
    _check(y, ref, levels, R.dequantize_int8(q, s), b)


@pytest.mark.parametrize("M", [1, 40, 300])
def test_int4_rows_narrower_than_the_groups_are_zero_padded(isa, M):
    """K = 576 in groups of 128 packs 640 columns: x may come 576 wide (Int4Linear no longer
    pads it in Python), and is the padded x's product; a row narrower by a group or more is a
    shape error."""
    x, w, b = _data(M, 20, 640, True)
    w[:, 576:] = 0
    p, s, z = R.quantize_int4(w, 128)
    ref = R.linear_int4w(torch.nn.functional.pad(x[:, :576], (0, 64)), p, s, z, 128, b)
    y = K.linear_int4w(x[:, :576].contiguous(), p, s, z, 128, b)
    _check(y, ref, x, R.dequantize_int4(p, s, z, 128), b, int16_x=_int4_levels(p, s, 128))
    with pytest.raises(ValueError, match="x has shape"):
        K.linear_int4w(x[:, :512].contiguous(), p, s, z, 128, b)


@pytest.mark.parametrize("M,N,Kd", [(9, 37, 576), (32, 130, 64), (300, 20, 1536)])
def test_amx_bf16_linear_is_the_bf16_gemm(M, N, Kd):
    """bf16 weights' prompt rows on AMX-BF16 (where the CPU has it): x rounded to bf16, fp32
    sums, the result rounded to bf16, as torch's bf16 GEMM computes it (whose sums may only
    be ordered otherwise), and nothing when the AMX kernels are turned off."""
    C = K.compiled()
    if not K.amx_bf16_takes(min(M, 256), Kd):
        assert K.isa() != "avx512vnni" or not C.set_amx_rows() or not _has_amx_bf16()
        pytest.skip("no AMX-BF16 on this CPU / path")
    x, w, b = _data(M, N, Kd, True)
    w16, b16 = w.bfloat16(), b.bfloat16()
    y = C.amx_linear_bf16(x, w16, b16.float())
    ref = torch.nn.functional.linear(x.bfloat16(), w16, b16).float()
    assert torch.equal(y.bfloat16().float(), y)  # bf16 values
    exact = x.bfloat16().double() @ w16.double().T + b16.double()
    bound = (x.bfloat16().double().abs() @ w16.double().abs().T + b16.double().abs())
    assert float(((y.double() - exact).abs() / bound).max()) < 2 ** -7  # a bf16 rounding
    assert float(((y - ref).abs() / bound.float()).max()) < 2 ** -7
    assert not K.amx_bf16_takes(257, Kd)  # torch's blocked GEMM above 256 rows
    old = C.set_amx_rows()
    try:
        C.set_amx_rows(0)
        assert not K.amx_bf16_takes(2, Kd)
    finally:
        C.set_amx_rows(old)


def test_amx_rows_environment_variable():
    """LLMBENCH_KERNELS_AMX_ROWS=0 turns the AMX tiles off in a fresh process (A/B runs of the
    benchmarks); a value that is not a row count is ignored with a warning."""
    import subprocess

    probe = ("import warnings; warnings.simplefilter('always'); from llmbench import kernels; "
             "print(kernels.compiled().set_amx_rows() if kernels.available() else 0)")
    for value, expected in (("0", "0"), ("junk", None)):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                env={**os.environ, "LLMBENCH_KERNELS_AMX_ROWS": value},
                                timeout=120)
        assert result.returncode == 0, result.stderr
        if expected is not None:
            assert result.stdout.strip() == expected
        else:
            assert "LLMBENCH_KERNELS_AMX_ROWS='junk' ignored" in result.stderr


def _has_amx_bf16() -> bool:
    from llmbench.environment import cpu_info

    return "amx_bf16" in set(cpu_info()["isa"])


def test_amx_rows_setting():
    """set_amx_rows: 0 turns the AMX path off (0 is all a CPU without AMX-INT8 reports)."""
    C = K.compiled()
    old = C.set_amx_rows()
    try:
        assert C.set_amx_rows(0) == 0 and not C.amx_i4_takes(64, 640, 128, True, 0)
        assert not C.amx_i8_takes(64, 640)
        if C.set_amx_rows(old) > 0:
            assert C.amx_i4_takes(64, 640, 128, True, 0) == (K.isa() == "avx512vnni")
            assert C.amx_i8_takes(64, 640) == (K.isa() == "avx512vnni")
            assert not C.amx_i8_takes(64, 600)  # K not in whole 64-byte tile rows
            assert not C.amx_i4_takes(64, 640, 32, True, 0)  # groups of 32: int16 kernels
    finally:
        C.set_amx_rows(old)


def test_leading_dims_strides_and_large_m(isa):
    # x [2, 3, K] -> y [2, 3, N]; strided rows; 1-D x; M > 16 goes to torch
    _, w, b = _data(1, 20, 200, True)
    big = torch.randn(6, 300)
    xs = big[:, 50:250]  # row stride 300
    assert xs.stride() == (300, 1)
    _check(K.linear_f32(xs, w, b), R.linear_f32(xs, w, b), xs, w, b)
    x3 = torch.randn(2, 3, 200)
    y = K.linear_bf16w(x3, w.bfloat16(), b)
    assert y.shape == (2, 3, 20)
    _check(y, R.linear_bf16w(x3, w.bfloat16(), b), x3, w.bfloat16().float(), b)
    x1 = torch.randn(200)
    assert K.linear_f32(x1, w).shape == (20,)
    x3l = torch.randn(2, 9, 200)  # 18 rows > SMALL_M_MAX: torch path
    y = K.linear_f32(x3l, w, b)
    assert y.shape == (2, 9, 20)
    _check(y, R.linear_f32(x3l, w, b), x3l, w, b)
    xl = torch.randn(K.SMALL_M_MAX + 3, 200)
    q, s = R.quantize_int8(w)
    _check(K.linear_int8w(xl, q, s, b), R.linear_int8w(xl, q, s, b), xl, R.dequantize_int8(q, s), b,
           int16_x=True)
    p, s4, z4 = R.quantize_int4(w, 200)
    _check(
        K.linear_int4w(xl, p, s4, z4, 200),
        R.linear_int4w(xl, p, s4, z4, 200),
        xl,
        R.dequantize_int4(p, s4, z4, 200),
        None,
    )


def test_thread_count_invariance(isa):
    x, w, b = _data(3, 1000, 256, True)
    wb = w.bfloat16()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = K.linear_bf16w(x, wb, b)
        torch.set_num_threads(2)
        y2 = K.linear_bf16w(x, wb, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)  # each output is computed by exactly one thread


def _validation_checks():
    x, w, _ = _data(1, 8, 64, False)
    with pytest.raises(TypeError):
        K.linear_f32(x.double(), w)
    with pytest.raises(TypeError):
        K.linear_bf16w(x, w)  # fp32 weight given to the bf16 kernel
    with pytest.raises(TypeError):
        K.linear_int8w(x, w, torch.ones(8))
    with pytest.raises(ValueError):
        K.linear_f32(torch.randn(1, 63), w)
    p, s, z = R.quantize_int4(w, 32)
    with pytest.raises(ValueError):
        K.linear_int4w(x, p, s, z, 48)
    with pytest.raises(ValueError):
        K.linear_int4w(x, p, s[:, :1], z, 32)
    # non-contiguous inputs are accepted (copied)
    wt = torch.randn(64, 8).t()
    xt = torch.randn(64, 2).t()
    b = torch.randn(16)[::2]
    _check(K.linear_f32(xt, wt, b), R.linear_f32(xt, wt, b), xt, wt, b)


def test_compiled_input_validation(isa):
    _validation_checks()


def test_fallback_input_validation():
    with K.force_fallback():
        _validation_checks()


def test_isa_reporting():
    if not K.supported_isas():
        assert not K.available() and K.isa() == "torch-fallback"
        return
    assert K.available()
    assert K.isa() in ("avx512vnni", "avx512", "avx2", "neondot", "neon", "generic")
    assert "generic" in K.supported_isas()
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        if " avx2" in flags and " fma" in flags:
            assert "avx2" in K.supported_isas()


# --------------------------------------------------------------------------
# pure-torch fallback (always runs)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("M,N,Kd,gs", [SHAPES[1], SHAPES[2]])
def test_fallback_matches_reference(M, N, Kd, gs):
    x, w, b = _data(M, N, Kd, True)
    wb = w.bfloat16()
    q, s = R.quantize_int8(w)
    p, s4, z4 = R.quantize_int4(w, gs)
    with K.force_fallback():
        assert not K.available() and K.isa() == "torch-fallback"
        outs = [
            K.linear_f32(x, w, b),
            K.linear_bf16w(x, wb, b),
            K.linear_int8w(x, q, s, b),
            K.linear_int4w(x, p, s4, z4, gs, b),
        ]
    refs = [
        R.linear_f32(x, w, b),
        R.linear_bf16w(x, wb, b),
        R.linear_int8w(x, q, s, b),
        R.linear_int4w(x, p, s4, z4, gs, b),
    ]
    for o, r in zip(outs, refs, strict=False):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    if K.supported_isas():  # compiled and fallback agree
        deq = [w, wb.float(), R.dequantize_int8(q, s), R.dequantize_int4(p, s4, z4, gs)]
        comp = [
            K.linear_f32(x, w, b),
            K.linear_bf16w(x, wb, b),
            K.linear_int8w(x, q, s, b),
            K.linear_int4w(x, p, s4, z4, gs, b),
        ]
        for i, (c, o, d) in enumerate(zip(comp, outs, deq, strict=False)):
            _check(c, o, x, d, b,
                   int16_x={2: True, 3: _int4_levels(p, s4, gs)}.get(i, False))


def test_quantizers_are_sane():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    q, s = R.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (16,)
    assert (R.dequantize_int8(q, s) - w).abs().max() <= s.max() * 0.5 + 1e-6
    p, s4, z4 = R.quantize_int4(w, 64)
    assert p.dtype == torch.uint8 and p.shape == (16, 128) and s4.shape == z4.shape == (16, 4)
    err = (R.dequantize_int4(p, s4, z4, 64) - w).abs().view(16, 4, 64).amax(-1)
    assert (err <= s4 * 0.5 + 1e-5).all()


def test_pack_int4_layout_and_roundtrip():
    # full block: byte i = q[i] | q[i + 16] << 4
    q = (torch.arange(64) % 16).to(torch.uint8).view(1, 64).flip(1).contiguous()
    p = K.pack_int4(q)
    assert p.shape == (1, 32) and p.dtype == torch.uint8
    for blk in range(2):
        for i in range(16):
            k0 = 32 * blk
            assert int(p[0, 16 * blk + i]) == int(q[0, k0 + i]) | (int(q[0, k0 + 16 + i]) << 4)
    # partial trailing block of length L=4 (K=36): byte i = q[32+i] | q[32+2+i] << 4
    q = torch.randint(0, 16, (3, 36), dtype=torch.uint8)
    p = K.pack_int4(q)
    assert p.shape == (3, 18)
    assert int(p[1, 16]) == int(q[1, 32]) | (int(q[1, 34]) << 4)
    assert int(p[1, 17]) == int(q[1, 33]) | (int(q[1, 35]) << 4)
    for Kd in (2, 30, 32, 100, 576):
        q = torch.randint(0, 16, (5, Kd), dtype=torch.uint8)
        assert torch.equal(K.unpack_int4(K.pack_int4(q)), q)
    with pytest.raises(ValueError):
        K.pack_int4(torch.full((1, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError):
        K.pack_int4(torch.zeros((1, 3), dtype=torch.uint8))


def test_rms_norm_and_rope_match_reference():
    """The layer step's C++ RMSNorm and in-place q/k RoPE against the torch formulas (the
    compiled decode step shares the same C++ code)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 96, generator=g) * 3
    w = torch.randn(96, generator=g)
    assert torch.allclose(K.rms_norm(x, w, 1e-5), R.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    heads, kv_heads, d, seq = 4, 2, 16, 5
    for rot in (d, d // 2):  # full and partial rotary dims
        qkv = torch.randn(3 * seq, (heads + 2 * kv_heads) * d, generator=g)
        cos, sin = torch.randn(seq, rot, generator=g), torch.randn(seq, rot, generator=g)
        expected = qkv.clone()
        R.rope_qk_(expected, cos, sin, heads, kv_heads, d)
        got = K.rope_qk_(qkv.clone(), cos, sin, heads, kv_heads, d)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
        v = slice((heads + kv_heads) * d, None)
        assert torch.equal(got[:, v], qkv[:, v])  # v is left alone
