"""CPU check of variant 5 (csrc/cuda/nf4_gemv_v5.cu) -- the correctness evidence possible without a
GPU.  Emulates the kernel in numpy, warp by warp and lane by lane, in the kernel's order: the units
each warp of the persistent grid takes, the cp.async requests of each step into the warp's ring
(swizzled 16-byte pieces, the aligned word of absmax codes / the fp32 pair, the nested absmax), the
ring's stage reuse, the reads of each chunk, the table lookups into A registers, x into B registers,
the m16n8k16 MMA through the PTX fragment layouts (helpers of test_gemv_v4_layout), the block scales
and the epilogue (y, or per-slice partials summed by the finish kernel).  With integer codes, x and
scales every sum is exact, so the emulated y must equal W @ xᵀ exactly.  Also: the half-warp reads
of a stage are bank-conflict-free, the x reads are, the slice choice, and the source lines the
emulation mirrors (constants are read from the .cu file)."""

import pathlib
import re

import numpy as np
import pytest

from .test_gemv_v4_layout import byte_perm, ptx_a, ptx_b, ptx_c

SRC = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "nf4_gemv_v5.cu").read_text()


def _const(name):
    m = re.search(rf"constexpr int {name} = ([^;]+);", SRC)
    assert m, f"{name} not found in nf4_gemv_v5.cu"
    return m.group(1)


WARPS = int(_const("kV5Warps"))
STAGES = int(_const("kV5Stages"))
DEEP_STAGES = int(_const("kV5DeepStages"))
STEP_K = int(_const("kV5StepK"))
MAX_SLICES = int(_const("kV5MaxSlices"))
STAGE_W = 16 * STEP_K // 2
ABS_OFF, NEST_OFF, STAGE_BYTES = STAGE_W, STAGE_W + 128, STAGE_W + 128 + 64


def test_source_lines_the_emulation_mirrors():
    assert _const("kStageW") == "16 * kV5StepK / 2"
    assert _const("kStageAbsOff") == "kStageW" and _const("kStageNestOff") == "kStageW + 128"
    assert _const("kStageBytes") == "kStageW + 128 + 64"
    assert "0.5 * per_warp" in SRC
    assert "(S > 1 || has_lora ? 1.5 + 8.0 * S * M * static_cast<double>(N) / (1024.0 * W) : 0.0)" in SRC
    assert "return 64 * row + 16 * (piece ^ (row & 2));" in SRC
    # units: slice-major or tile-major (unit_start), this CTA's units, the staged k range
    assert "slice = static_cast<int>(u / p.tiles);" in SRC
    assert "tile = static_cast<int>(u - static_cast<int64_t>(slice) * p.tiles);" in SRC
    assert "tile = static_cast<int>(u / p.S);" in SRC and "slice = static_cast<int>(u - static_cast<int64_t>(tile) * p.S);" in SRC
    assert "kk = slice * p.sst;" in SRC
    assert "const int64_t cta_u0 = static_cast<int64_t>(blockIdx.x) * kV5Warps * p.units / W;" in SRC
    assert "const int64_t cta_u1 = static_cast<int64_t>(blockIdx.x + 1) * kV5Warps * p.units / W;" in SRC
    assert "const int64_t s_lo = cta_u0 / p.tiles, s_hi = cta_u1 > cta_u0 ? (cta_u1 - 1) / p.tiles : s_lo;" in SRC
    assert "kx0 = s_lo < p.S ? static_cast<int>(s_lo) * slice_k : 0;" in SRC
    assert "kx1 = s_lo < p.S ? static_cast<int>(s_hi + 1) * slice_k : 0;" in SRC
    assert "xg + ((static_cast<int64_t>(m) * p.K + kx0) >> 3) + v" in SRC
    # the request state: sources set at each unit's start, advanced 64 bytes a step
    assert ("w0 = p.packed + static_cast<int64_t>(min(nb + g, p.N - 1)) * KH + 16 * q + "
            "static_cast<int64_t>(ik) * (kV5StepK / 2);") in SRC
    assert ("w1 = p.packed + static_cast<int64_t>(min(nb + g + 8, p.N - 1)) * KH + 16 * q + "
            "static_cast<int64_t>(ik) * (kV5StepK / 2);") in SRC
    assert "rq_b = static_cast<uint32_t>(min(nb + srow, p.N - 1)) * KB;" in SRC
    assert "const uint32_t d0 = stage_piece_off(g, q), d1 = stage_piece_off(g + 8, q);" in SRC
    assert "cp_async16_stream(st + d0, w0);" in SRC and "cp_async16_stream(st + d1, w1);" in SRC
    assert "const uint32_t b0 = rq_b + ((static_cast<uint32_t>(ik) * kV5StepK) >> p.log2_bs);" in SRC
    assert "cp_async4(st + dsc, sc_src + (lane < 16 ? (b0 & ~3u) : 4u * (b0 >> 8)));" in SRC
    assert "cp_async8(st + dsc, p.absmax_f32 + (b0 & ~1u));" in SRC
    assert "w0 += kV5StepK / 2;" in SRC and "if (++rj == p.sst) {" in SRC and "request_unit();" in SRC
    assert "(lane < 16 ? kStageAbsOff + 4 * srow : kStageNestOff + 4 * srow)" in SRC
    assert ": kStageAbsOff + 8 * srow;" in SRC
    # the scales: one (row, chunk) per lane, shared by shuffles
    assert "__byte_perm(word, 0u, 0x4440u | (b & 3u))" in SRC
    assert "c_b + ((static_cast<uint32_t>(ck) * kV5StepK + chunk_k) >> p.log2_bs)" in SRC
    assert "const uint32_t chunk_k = 64u * static_cast<uint32_t>(lane >> 4);" in SRC
    assert "c_b = static_cast<uint32_t>(min(ct * 16 + srow, p.N - 1)) * KB;" in SRC
    assert "{__shfl_sync(0xffffffffu, sc, g), __shfl_sync(0xffffffffu, sc, 16 + g)}" in SRC
    assert "{__shfl_sync(0xffffffffu, sc, g + 8), __shfl_sync(0xffffffffu, sc, 24 + g)}" in SRC
    assert "const int off = stage_piece_off(g, 2 * c + (q >> 1)) + 8 * (q & 1);" in SRC
    assert "st + off + 64 * 8" in SRC
    # x: a pointer per lane into the staged range, 256 bytes a step, set at each unit's start; the
    # second n8 tile reads row g + 8
    assert "xs + (has_x0 ? g : 0) * p.XSB + 32 * q;" in SRC
    assert "xp + t * 8 * xsb + 128 * c" in SRC
    assert "xp = xrow + 2 * (kV5StepK * ck - kx0);" in SRC and "xp += 2 * kV5StepK;" in SRC
    assert "const bool has_x0 = g < p.M, has_x1 = kMT > 1 && g + 8 < p.M;" in SRC
    assert "__byte_perm(word, lane4, 0x5504u + 16u * bb)" in SRC
    assert "Num<T>::mma(cf[t], a0, a1, a2, a3, xw[t][2 * s], xw[t][2 * s + 1]);" in SRC
    assert "acc[4 * t + 2] = __fmaf_rn(cf[t][2], sc_g8[c], acc[4 * t + 2]);" in SRC
    assert "const int m = 8 * (e >> 2) + 2 * q + (e & 1);" in SRC
    assert "const int n = ct * 16 + g + 8 * ((e >> 1) & 1);" in SRC
    assert "cp_async_wait<kStages - 1>();" in SRC
    # the ring: the next request fills the stage just computed
    assert "uint32_t c_off = 0, r_off = (kStages - 1) * kStageBytes;" in SRC
    assert "r_off = c_off;" in SRC
    assert "c_off = (c_off == (kStages - 1) * kStageBytes) ? 0u : c_off + kStageBytes;" in SRC
    assert "unsigned char* ring = smem_v5 + kV5RingOff + warp * (kStages * kStageBytes);" in SRC
    assert "for (int i = 0; i < kStages - 1; ++i) {" in SRC and "if (i + kStages - 1 < nsteps)" in SRC
    assert "request(ring_s + r_off);" in SRC and "const unsigned char* st = ring + c_off;" in SRC
    # the host's choice (plan): all of x where it fits, else slices
    assert "c.xsb = 2 * a.K + 16;" in SRC and "p.XSB = c.xsb;" in SRC
    assert "if (c.kst % S != 0 || (a.K / S) % 256 != 0) continue;" in SRC
    assert "const int64_t xsb = 2 * span * (a.K / S) + 16;" in SRC
    assert "const int64_t smem = v5_x_off(kV5Stages) + a.M * xsb;" in SRC
    assert "if (cu1 > cu0) span = std::max(span, (cu1 - 1) / tiles - cu0 / tiles + 1);" in SRC
    assert "c.mt = a.M > 8 ? 2 : 1;" in SRC


# ---- the host side ------------------------------------------------------------------------------------
def slice_cost(tiles, kst, M, N, W, has_lora, S):
    """csrc/cuda/nf4_gemv_v5.cu slice_cost."""
    per_warp = -(-tiles * S // W)
    return per_warp * (kst // S) + 0.5 * per_warp + (1.5 + 8.0 * S * M * N / (1024.0 * W)
                                                     if S > 1 or has_lora else 0.0)


def pick_slices(tiles, kst, M, N, W, has_lora=False):
    """csrc/cuda/nf4_gemv_v5.cu pick_slices."""
    best, best_cost = 1, 0.0
    for S in range(1, min(kst, MAX_SLICES) + 1):
        if kst % S:
            continue
        cost = slice_cost(tiles, kst, M, N, W, has_lora, S)
        if S == 1 or cost < best_cost:
            best, best_cost = S, cost
    return best


@pytest.mark.parametrize("K, N, S", [(4096, 14336, 2), (14336, 4096, 8), (8192, 28672, 8), (4096, 4096, 8)])
def test_slice_choice_on_an_h100(K, N, S):
    """The S picked on an H100 (132 SMs) at M = 1: the busiest warp's steps within ~20 % of the mean
    (4096x14336: S = 2 leaves 320 of 2112 warps idle but gives each unit 16 steps)."""
    W = 132 * WARPS
    tiles, kst = -(-N // 16), K // STEP_K
    got = pick_slices(tiles, kst, 1, N, W)
    assert got == S
    steps = -(-tiles * got // W) * (kst // got)
    assert steps <= 1.2 * tiles * kst / W + 1


# ---- emulation -------------------------------------------------------------------------------------------
def _words(b):
    return [int.from_bytes(bytes(b[4 * i: 4 * i + 4]), "little") for i in range(len(b) // 4)]


def unit_start(u, tiles, S, sst, slice_major):
    """csrc/cuda/nf4_gemv_v5.cu unit_start: (tile, first k step, slice) of unit u."""
    if slice_major:
        sl, tile = u // tiles, u % tiles
    else:
        tile, sl = u // S, u % S
    return tile, sl * sst, sl


def staged_slices(cu0, cu1, tiles):
    """The kernel's s_lo, s_hi: the slices of a CTA's units [cu0, cu1); without units, the slice its
    position falls in."""
    s_lo = cu0 // tiles
    return s_lo, ((cu1 - 1) // tiles if cu1 > cu0 else s_lo)


def cta_of(u, units, G):
    """The kernel's cta_of: the CTA whose units [c U / G, (c + 1) U / G) hold unit u."""
    return ((u + 1) * G + units - 1) // units - 1


def max_cta_slice_span(units, tiles, G):
    """csrc/cuda/nf4_gemv_v5.cu max_cta_slice_span."""
    W, span = G * WARPS, 0
    for c in range(G):
        cu0, cu1 = c * WARPS * units // W, (c + 1) * WARPS * units // W
        if cu1 > cu0:
            span = max(span, (cu1 - 1) // tiles - cu0 // tiles + 1)
    return span


def plan(M, N, K, G, optin, has_lora=False, stages=STAGES):
    """csrc/cuda/nf4_gemv_v5.cu v5_config's choice of mode, S and x row stride (None: it falls back):
    all of x if it fits beside the ring (tile-major), else x per CTA's K slices (slice-major)."""
    tiles, kst = -(-N // 16), K // STEP_K
    W = G * WARPS
    fixed = 65536 + 1024 + WARPS * stages * STAGE_BYTES
    if fixed + M * (2 * K + 16) <= optin:
        return dict(slice_major=False, S=pick_slices(tiles, kst, M, N, W, has_lora), xsb=2 * K + 16)
    best = None
    fixed4 = 65536 + 1024 + WARPS * STAGES * STAGE_BYTES
    for S in range(1, min(kst, MAX_SLICES) + 1):
        if kst % S or (K // S) % 256:
            continue
        xsb = 2 * max_cta_slice_span(tiles * S, tiles, G) * (K // S) + 16
        if fixed4 + M * xsb > optin:
            continue
        cost = slice_cost(tiles, kst, M, N, W, has_lora, S)
        if best is None or cost < best[0]:
            best = (cost, S, xsb)
    if best is None:
        return None
    return dict(slice_major=True, S=best[1], xsb=best[2])


def emulate(packed, absq, nest_abs, ncode, offset, absf, code, x, N, K, bs, G, S=None, stages=STAGES,
            slice_major=False):
    """y [M, N] as variant 5 computes it, with `G` CTAs (persistent grid) and `stages` ring stages per
    warp, in exact integer math; M <= 16 (two n8 tiles of x above 8); slice_major: units numbered
    slice-major and each CTA stages x only for the K slices its units lie in (else all of x).
    Nested (absq given): absmax = ncode[absq] * nest_abs[b >> 8] + offset; else absf (fp32 absmax).
    Returns (y, S, the widest staged k range)."""
    M = x.shape[0]
    MT = 2 if M > 8 else 1
    nested = absq is not None
    log2_bs = bs.bit_length() - 1
    KB = K >> log2_bs
    tiles, kst = -(-N // 16), K // STEP_K
    W = G * WARPS
    if S is None:
        S = pick_slices(tiles, kst, M, N, W)
    sst, units = kst // S, tiles * S
    slice_k = sst * STEP_K
    absq_bytes = None if absq is None else absq.tobytes()
    absf_list = None if absf is None else list(absf)
    nest_list = None if nest_abs is None else list(nest_abs)
    part = np.full((S, M, N), np.nan, dtype=object)
    y = np.full((M, N), np.nan, dtype=object)
    covered = np.zeros((tiles, kst), dtype=int)
    widest = 0

    KH = K // 2

    class Requester:
        """One warp's request state (the kernel's ru / rj and w0 / w1 / rq_b per lane, advanced per step
        and recomputed at each unit's start)."""

        def __init__(self, u):
            self.ru, self.rj = u, 0
            self.unit()

        def unit(self):
            self.it, self.ik, _ = unit_start(self.ru, tiles, S, sst, slice_major)
            nb = self.it * 16
            self.w, self.rq_b = {}, {}
            for lane in range(32):
                g, q = lane >> 2, lane & 3
                self.w[lane] = [min(nb + g, N - 1) * KH + 16 * q + self.ik * (STEP_K // 2),
                                min(nb + g + 8, N - 1) * KH + 16 * q + self.ik * (STEP_K // 2)]
                self.rq_b[lane] = min(nb + (lane & 15), N - 1) * KB

        def request(self, stage):
            # check the kept sources against the step's (tile, kk) recomputed from scratch
            for lane in range(32):
                g, q = lane >> 2, lane & 3
                for row, src in zip((g, g + 8), self.w[lane]):
                    assert src == min(self.it * 16 + row, N - 1) * KH + self.ik * (STEP_K // 2) + 16 * q
                    off = 64 * row + 16 * (q ^ (row & 2))
                    stage[off: off + 16] = packed[src: src + 16]
                srow = lane & 15
                b0 = self.rq_b[lane] + ((self.ik * STEP_K) >> log2_bs)
                if nested:
                    if lane < 16:
                        a = b0 & ~3
                        assert a + 4 <= len(absq_bytes), "absmax word read past the tensor"
                        stage[ABS_OFF + 4 * srow: ABS_OFF + 4 * srow + 4] = list(absq_bytes[a: a + 4])
                    else:
                        stage[NEST_OFF + 4 * srow] = ("nest", nest_list[b0 >> 8])
                elif lane < 16:
                    a = b0 & ~1
                    assert a + 2 <= len(absf_list), "fp32 absmax pair read past the tensor"
                    stage[ABS_OFF + 8 * srow] = ("pair", absf_list[a], absf_list[a + 1])
                self.w[lane] = [src + STEP_K // 2 for src in self.w[lane]]
            self.ik += 1
            self.rj += 1
            if self.rj == sst:
                self.rj, self.ru = 0, self.ru + 1
                self.unit()

    def scale(stage, srow, b):
        if nested:
            word = int.from_bytes(bytes(stage[ABS_OFF + 4 * srow: ABS_OFF + 4 * srow + 4]), "little")
            c = byte_perm(word, 0, 0x4440 | (b & 3))
            assert c < 256
            tag, nabs = stage[NEST_OFF + 4 * srow]
            assert tag == "nest"
            return ncode[c] * nabs + offset
        tag, lo, hi = stage[ABS_OFF + 8 * srow]
        assert tag == "pair"
        return hi if b & 1 else lo

    def compute(stage, ck, c_b, xp, xs, acc):
        # each lane decodes the scale of (row lane & 15, chunk lane >> 4); the others come by shuffles
        sc = [scale(stage, lane & 15, c_b[lane] + ((ck * STEP_K + 64 * (lane >> 4)) >> log2_bs)) for lane in range(32)]
        for c in range(2):
            A = [np.zeros((16, 16), dtype=object) for _ in range(4)]
            B = [[np.zeros((16, 8), dtype=object) for _ in range(4)] for _ in range(MT)]
            for lane in range(32):
                g, q = lane >> 2, lane & 3
                off = 64 * g + 16 * ((2 * c + (q >> 1)) ^ (g & 2)) + 8 * (q & 1)
                wl = _words(stage[off: off + 8])
                wh = _words(stage[off + 512: off + 520])
                for t in range(MT):
                    row = g + 8 * t                          # xp + t * 8 * XSB: x row g + 8 t
                    if row < M:
                        xi = xp[lane] // 2 + 64 * c          # the lane's x pointer, in elements of the staged row
                        xs_row = xs[row][xi: xi + 16]
                        assert len(xs_row) == 16 and None not in xs_row, "x read outside the staged range"
                    else:
                        xs_row = [0] * 16
                    xw = [(xs_row[2 * i], xs_row[2 * i + 1]) for i in range(8)]
                    for s in range(4):
                        for reg in range(2):
                            for half in range(2):
                                k_, col = ptx_b(lane, reg, half)
                                B[t][s][k_, col] = xw[2 * s + reg][half]
                for s in range(4):
                    wlw, whw = (wl[0], wh[0]) if s < 2 else (wl[1], wh[1])
                    bb = 2 * (s & 1)
                    regs = []
                    for word, sel in ((wlw, bb), (whw, bb), (wlw, bb + 1), (whw, bb + 1)):
                        toff = byte_perm(word, 4 * lane, 0x5504 + 16 * sel)
                        assert toff % 256 == 4 * lane
                        v = toff // 256
                        regs.append((code[v >> 4], code[v & 15]))  # entry v: {code[v >> 4] lo, code[v & 15] hi}
                    for reg in range(4):
                        for half in range(2):
                            r_, k_ = ptx_a(lane, reg, half)
                            A[s][r_, k_] = regs[reg][half]
            for t in range(MT):
                C = sum(A[s] @ B[t][s] for s in range(4))
                for lane in range(32):
                    g = lane >> 2
                    s0, s1 = sc[16 * c + g], sc[16 * c + g + 8]    # __shfl_sync(sc, g / 16 + g, g + 8 / 24 + g)
                    for e in range(4):
                        r_, col = ptx_c(lane, e)
                        acc[lane][4 * t + e] += C[r_, col] * (s0 if e < 2 else s1)

    for cta in range(G):
        cu0, cu1 = cta * WARPS * units // W, (cta + 1) * WARPS * units // W
        kx0, kx1 = 0, K
        if slice_major:
            s_lo, s_hi = staged_slices(cu0, cu1, tiles)
            kx0, kx1 = (s_lo * slice_k, (s_hi + 1) * slice_k) if s_lo < S else (0, 0)
        widest = max(widest, kx1 - kx0)
        xs = [[None] * (kx1 - kx0) for _ in range(16)]       # the CTA's staged x (None: not staged)
        for m in range(M):
            xs[m][:] = list(x[m, kx0:kx1])
        for warp in range(WARPS):
            wid = cta * WARPS + warp
            u0, u1 = wid * units // W, (wid + 1) * units // W
            assert cu0 <= u0 and u1 <= cu1
            nsteps = (u1 - u0) * sst
            ring = [[0] * STAGE_BYTES for _ in range(stages)]
            req = Requester(u0)
            for i in range(stages - 1):
                if i < nsteps:
                    req.request(ring[i])
            acc = [[0] * (4 * MT) for _ in range(32)]
            cu, cj = u0, 0

            def unit_state(u):
                ct, ck, cs = unit_start(u, tiles, S, sst, slice_major)
                c_b = [min(ct * 16 + (lane & 15), N - 1) * KB for lane in range(32)]
                xp = [2 * (STEP_K * ck - kx0) + 32 * (lane & 3) for lane in range(32)]  # bytes in the staged row
                return ct, ck, cs, c_b, xp

            ct, ck, cs, c_b, xp = unit_state(cu)
            c_off, r_off = 0, stages - 1
            for i in range(nsteps):
                assert c_off == i % stages and r_off == (i + stages - 1) % stages
                if i + stages - 1 < nsteps:
                    req.request(ring[r_off])
                covered[ct, ck] += 1
                compute(ring[c_off], ck, c_b, xp, xs, acc)
                r_off = c_off
                c_off = 0 if c_off == stages - 1 else c_off + 1
                ck += 1
                xp = [v + 2 * STEP_K for v in xp]
                cj += 1
                if cj == sst:
                    sl = cs
                    assert sl == (ck - 1) // sst
                    for lane in range(32):
                        g, q = lane >> 2, lane & 3
                        for e in range(4 * MT):
                            m, n = 8 * (e >> 2) + 2 * q + (e & 1), ct * 16 + g + 8 * ((e >> 1) & 1)
                            if m < M and n < N:
                                if S == 1:
                                    assert y[m, n] != y[m, n], "written twice"
                                    y[m, n] = acc[lane][e]
                                else:
                                    assert part[sl, m, n] != part[sl, m, n], "written twice"
                                    part[sl, m, n] = acc[lane][e]
                            acc[lane][e] = 0
                    cj, cu = 0, cu + 1
                    ct, ck, cs, c_b, xp = unit_state(cu)
    assert (covered == 1).all(), "every (tile, step) computed exactly once"
    if S > 1:
        y = part.sum(axis=0)   # the finish kernel (slice order; exact here)
    return y, S, widest


def _quantized(rng, N, K, bs, nested):
    code = rng.integers(-8, 8, size=16)
    nib = rng.integers(0, 16, size=(N, K))
    packed = ((nib[:, 0::2] << 4) | nib[:, 1::2]).astype(np.uint8).reshape(-1)
    nblocks = N * K // bs
    if nested:
        ncode = rng.integers(-3, 4, size=256)
        absq = rng.integers(0, 256, size=nblocks).astype(np.uint8)
        nest = rng.integers(1, 4, size=-(-nblocks // 256))
        offset = 2
        amax = ncode[absq] * nest[np.arange(nblocks) >> 8] + offset
        parts = dict(absq=absq, nest_abs=nest, ncode=ncode, offset=offset, absf=None)
    else:
        amax = rng.integers(-3, 4, size=nblocks)
        parts = dict(absq=None, nest_abs=None, ncode=None, offset=0, absf=amax)
    W = code[nib] * np.repeat(amax.reshape(N, K // bs), bs, axis=1)
    return packed, parts, code, W


@pytest.mark.parametrize("M, N, K, bs, nested, G, S, stages", [
    (1, 40, 512, 64, True, 2, None, STAGES),      # 3 tiles (the last one partial), picked S
    (3, 17, 256, 64, False, 1, None, STAGES),     # rows past N in the only tile
    (8, 33, 512, 128, True, 1, 2, STAGES),        # M = 8: every lane's x row; forced slices + finish
    (2, 64, 768, 256, False, 3, 3, STAGES),       # 3 slices of 2 steps, blocksize 256 (one block per step)
    (5, 50, 1024, 512, True, 1, 1, STAGES),       # a block spans 4 steps
    (1, 16, 256, 64, True, 4, 2, STAGES),         # more warps than units: idle warps
    (2, 300, 256, 64, True, 1, 1, STAGES),        # 19 tiles on 16 warps: a warp's steps run into the next tile
    (1, 520, 512, 128, False, 1, 2, STAGES),      # 66 units on 16 warps: slices and tiles crossed in one walk
    (1, 520, 512, 128, True, 1, 2, DEEP_STAGES),  # the opt-in deep ring: the same walk, 5 steps ahead
    (3, 40, 1024, 64, False, 1, 1, DEEP_STAGES),  # fewer steps per warp than stages in the ring
])
def test_emulated_kernel_is_exact(M, N, K, bs, nested, G, S, stages):
    rng = np.random.default_rng(M * 1000 + N + K)
    packed, parts, code, W = _quantized(rng, N, K, bs, nested)
    x = rng.integers(-4, 5, size=(M, K))
    y, used, _ = emulate(packed, parts["absq"], parts["nest_abs"], parts["ncode"], parts["offset"], parts["absf"],
                         code, x, N, K, bs, G, S, stages)
    if S is not None:
        assert used == S
    np.testing.assert_array_equal(y.astype(np.int64), x @ W.T)


@pytest.mark.parametrize("M, N, K, bs, nested, G, S, slice_major", [
    (12, 40, 512, 64, True, 1, 2, False),    # M = 9..16: two n8 tiles of x, all of x staged
    (16, 300, 1024, 64, False, 2, 4, True),  # slice-major: each CTA stages the slices of its units
    (9, 77, 2048, 128, True, 1, 8, True),    # 5 tiles x 8 slices on 16 warps: a CTA spans every slice
    (3, 520, 1024, 64, True, 2, 2, True),    # M <= 8 slice-major (the M >= 4, K = 14336 case in small)
    (16, 16, 512, 256, False, 1, 1, True),   # one slice: slice-major = tile-major
    (2, 16, 1024, 64, True, 8, 4, True),     # 4 units on 8 CTAs: CTAs without units stage a slice anyway
])
def test_emulated_kernel_two_tiles_and_sliced_x(M, N, K, bs, nested, G, S, slice_major):
    rng = np.random.default_rng(M * 1000 + N + K + 7)
    packed, parts, code, W = _quantized(rng, N, K, bs, nested)
    x = rng.integers(-4, 5, size=(M, K))
    y, used, widest = emulate(packed, parts["absq"], parts["nest_abs"], parts["ncode"], parts["offset"],
                              parts["absf"], code, x, N, K, bs, G, S, slice_major=slice_major)
    assert used == S
    np.testing.assert_array_equal(y.astype(np.int64), x @ W.T)
    tiles = -(-N // 16)
    if slice_major:
        assert widest == max_cta_slice_span(tiles * S, tiles, G) * (K // S)


def test_plan_on_an_h100():
    """v5_config's mode on an H100 (132 SMs, 232448 bytes of opt-in shared memory): all of x where it
    fits beside the 4-stage ring; else x per K slice, at M = 16 on the Llama / 70B layers too."""
    optin, G = 232448, 132
    assert plan(1, 14336, 4096, G, optin)["slice_major"] is False
    assert plan(8, 14336, 4096, G, optin)["slice_major"] is False
    for M, K, N in ((4, 14336, 4096), (8, 14336, 4096), (16, 4096, 14336), (16, 14336, 4096), (16, 8192, 28672),
                    (16, 4096, 4096), (16, 28672, 8192)):
        got = plan(M, N, K, G, optin, has_lora=True)
        assert got is not None and got["slice_major"], (M, K, N)
        assert 65536 + 1024 + WARPS * STAGES * STAGE_BYTES + M * got["xsb"] <= optin
        assert got["xsb"] % 128 == 16, "x rows 16 bytes off a 128-byte line: conflict-free quarter-warp reads"


def test_stage_reads_are_bank_conflict_free():
    """A half warp's 8-byte reads of rows g (and g + 8) of a chunk: 16 lanes x 8 bytes on 32 banks."""
    for c in range(2):
        for rows_off in (0, 8):
            for half in range(2):
                banks = set()
                for lane in range(16 * half, 16 * half + 16):
                    g, q = lane >> 2, lane & 3
                    off = 64 * (g + rows_off) + 16 * ((2 * c + (q >> 1)) ^ ((g + rows_off) & 2)) + 8 * (q & 1)
                    banks.update({(off // 4) % 32, (off // 4 + 1) % 32})
                assert len(banks) == 32


@pytest.mark.parametrize("K", [256, 4096, 14336])
def test_x_reads_are_conflict_free(K):
    xsb = 2 * K + 16
    assert xsb % 128 == 16
    for c in range(2):
        for second in (0, 16):
            for phase in range(4):
                groups = set()
                for lane in range(8 * phase, 8 * phase + 8):
                    g, q = lane >> 2, lane & 3
                    addr = g * xsb + 2 * (3 * STEP_K + 64 * c + 16 * q) + second
                    groups.add((addr % 128) // 16)
                assert len(groups) == 8


# ---- the low-rank term inside the kernel: T pieces and the finish kernel ---------------------------------
def test_t_piece_source_lines():
    assert "c.cpp = (!c.slice_major && kc % 2 == 0 && static_cast<int64_t>(a.r) * kc > W) ? 2 : 1;" in SRC
    assert "c.jt = kc / c.cpp;" in SRC
    assert "return static_cast<const T*>(p.lora_a) + i * p.K + j * 256 * p.cpp + 8 * lane;" in SRC
    assert ("for (int64_t piece = slot; piece < npieces; piece += W) t_piece<T>(p, piece, piece == slot, apre, xs, 0, "
            "lane);") in SRC
    assert "auto cta_of = [&](int64_t u) { return ((u + 1) * G + p.units - 1) / p.units - 1; };" in SRC
    assert "for (int64_t sl = s_lo; sl <= s_hi; ++sl) {" in SRC
    assert "const int64_t cf = cta_of(sl * p.tiles), cl = cta_of((sl + 1) * p.tiles - 1);" in SRC
    assert "if (blockIdx.x < cf || blockIdx.x > cl) continue;" in SRC
    assert "const int64_t nw = (cl - cf + 1) * kV5Warps;" in SRC
    assert "int64_t first = (blockIdx.x - cf) * kV5Warps + warp;" in SRC
    assert "auto heavy_upto = [&](int64_t w) { return w * p.units / W - w * base; };" in SRC
    assert "const int64_t w0 = cf * kV5Warps, h0 = heavy_upto(w0), h1 = heavy_upto(w0 + nw);" in SRC
    assert "const int64_t n_light = W - p.units % W;" in SRC
    assert "first = slot < n_light ? slot - (w0 - h0) : (nw - (h1 - h0)) + (slot - n_light - h0);" in SRC
    assert "for (int64_t ps = first; ps < static_cast<int64_t>(p.r) * cps; ps += nw) {" in SRC
    assert "p.light_first = c.slice_major && a.lora_a != nullptr && v5_light_first_wanted(a.K);" in SRC
    assert "return K <= kV5LightMaxK;" in SRC and "constexpr int kV5LightMaxK = 8192;" in SRC
    assert "const int64_t piece = (ps % p.r) * p.jt + sl * cps + ps / p.r;" in SRC
    assert "const int64_t base = p.units / W;" in SRC and "const int64_t heavy_before = u0 - wid * base;" in SRC
    assert "const int64_t slot = (u1 - u0 == base) ? wid - heavy_before : (W - p.units % W) + heavy_before;" in SRC
    assert "const int k = j * 256 * p.cpp + 256 * c + 8 * lane;" in SRC
    assert "*reinterpret_cast<const uint4*>(xs + m * p.XSB + 2 * (k - kx0))" in SRC
    assert "p.tpart[(static_cast<int64_t>(j) * p.M + m) * p.r + i] = v;" in SRC
    assert "const int m_lo = static_cast<int>(idx0 / p.N);" in SRC
    assert "const int m_hi = static_cast<int>(min(MN - 1, idx0 + kFinishThreads5 - 1) / p.N);" in SRC
    assert "t_s[e] = __fmul_rn(tv, p.scale_vec != nullptr ? p.scale_vec[i] : p.scale);" in SRC
    assert "while (G < 32 && entries * G * 2 <= kFinishThreads5 && G * 2 <= p.jt) G *= 2;" in SRC
    assert "for (int base = 0; base < entries * G; base += kFinishThreads5) {" in SRC
    assert "const int e = t / G, g = t % G;" in SRC
    assert "for (int j = g; j < p.jt; j += G) tv = __fadd_rn(tv, p.tpart[" in SRC
    assert "for (int o = G / 2; o > 0; o >>= 1) tv = __fadd_rn(tv, __shfl_xor_sync(0xffffffffu, tv, o));" in SRC
    assert "const float* tr = lora ? t_s + (m - m_lo) * p.r : nullptr;" in SRC
    assert "store_lora_bias_t<T>(p, tr, m, n, v);" in SRC  # the plain order
    # the prefetching order: store_lora_bias_t's fma chain over B's row in registers
    assert "l = __fmaf_rn(tr[8 * c + 2 * e], b0, l);" in SRC and "l = __fmaf_rn(tr[8 * c + 2 * e + 1], b1, l);" in SRC
    assert "__shared__ float t_s[kV5MaxM * kGemvMaxRank];" in SRC
    assert _const("kFinishThreads5") == "256"


def piece_slots(units, W):
    """Each warp's first T piece (the kernel's slot): light warps (units // W units) first."""
    base, slots, light = units // W, [], []
    for wid in range(W):
        u0, u1 = wid * units // W, (wid + 1) * units // W
        heavy_before = u0 - wid * base
        slots.append(wid - heavy_before if u1 - u0 == base else (W - units % W) + heavy_before)
        light.append(u1 - u0 == base)
    return slots, light


@pytest.mark.parametrize("units, W", [(1792, 2112), (14336, 2112), (2048, 2112), (4224, 2112), (5, 16), (37, 16)])
def test_piece_slots_put_light_warps_first(units, W):
    slots, light = piece_slots(units, W)
    assert sorted(slots) == list(range(W)), "a bijection of warps onto slots"
    n_light = sum(light)
    assert n_light == W - units % W
    assert all((slot < n_light) == lt for slot, lt in zip(slots, light)), "light warps take the first slots"


def emulate_lora(x, A, B, s, part, G, units, tiles=None, S=None, light_first=False):
    """y = Σ_S part + (T ⊙ s) Bᵀ as variant 5 computes the low-rank term: T pieces taken by the warps of
    a G-CTA grid (whose GEMV has `units` units), lane by lane, then the finish kernel's per-CTA
    reduction into t_s (exact integers).  tiles, S given: slice-major units with x staged per CTA's
    slices; each slice's pieces are spread over the warps of the CTAs holding it (light_first: the
    light warps of those CTAs first), x read only inside the CTA's staged range."""
    M, K = x.shape
    r, N = A.shape[0], B.shape[0]
    W = G * WARPS
    kc = K // 256
    slice_major = S is not None
    cpp = 2 if not slice_major and kc % 2 == 0 and r * kc > W else 1
    jt = kc // cpp
    tpart = np.full((jt, M, r), np.nan, dtype=object)
    seen = np.zeros((r, K), dtype=int)
    slots, light = piece_slots(units, W)

    def piece_sums(piece, kx0, kx1):
        i, j = piece // jt, piece % jt
        lane_sums = np.zeros((32, M), dtype=object)
        for lane in range(32):
            src = i * K + j * 256 * cpp + 8 * lane          # t_piece_src, in elements of A
            for c in range(cpp):
                k = j * 256 * cpp + 256 * c + 8 * lane
                flat = src + 256 * c
                assert flat == i * K + k
                assert kx0 <= k and k + 8 <= kx1, "x read outside the CTA's staged range"
                seen[i, k: k + 8] += 1
                lane_sums[lane] += x[:, k: k + 8] @ A[i, k: k + 8]
        for m in range(M):
            assert tpart[j, m, i] != tpart[j, m, i], "written twice"
            tpart[j, m, i] = lane_sums[:, m].sum()       # the shfl_xor reduction (exact here)

    if not slice_major:
        for wid in range(W):
            for piece in range(slots[wid], r * jt, W):
                piece_sums(piece, 0, K)
    else:
        slice_k, cps = K // S, K // S // 256
        n_light = W - units % W                               # the grid's light warps (slots 0 .. n_light - 1)

        def heavy_upto(w):                                    # heavy warps among 0 .. w - 1
            return w * units // W - w * (units // W)
        for cta in range(G):
            cu0, cu1 = cta * WARPS * units // W, (cta + 1) * WARPS * units // W
            assert cu0 == cta * units // G and cu1 == (cta + 1) * units // G
            s_lo, s_hi = staged_slices(cu0, cu1, tiles)
            if s_lo >= S:
                continue
            kx0, kx1 = s_lo * slice_k, (s_hi + 1) * slice_k
            for sl in range(s_lo, s_hi + 1):
                cf, cl = cta_of(sl * tiles, units, G), cta_of((sl + 1) * tiles - 1, units, G)
                if cta < cf or cta > cl:
                    continue
                nw, w0 = (cl - cf + 1) * WARPS, cf * WARPS
                h0, h1 = heavy_upto(w0), heavy_upto(w0 + nw)
                for warp in range(WARPS):
                    wid = cta * WARPS + warp
                    first = (cta - cf) * WARPS + warp
                    if light_first:                             # the kernel's formula, from slot
                        slot = slots[wid]
                        first = slot - (w0 - h0) if slot < n_light else (nw - (h1 - h0)) + (slot - n_light - h0)
                        assert 0 <= first < nw and (first < sum(light[w0: w0 + nw])) == light[wid], \
                            "light warps first"
                    for ps in range(first, r * cps, nw):
                        piece_sums((ps % r) * jt + sl * cps + ps // r, kx0, kx1)
    assert (seen == 1).all(), "every element of A read by exactly one lane"
    y = np.full((M, N), np.nan, dtype=object)
    MN, threads = M * N, 256
    for cta in range(-(-MN // threads)):
        idx0 = cta * threads
        m_lo, m_hi = idx0 // N, min(MN - 1, idx0 + threads - 1) // N
        entries = (m_hi - m_lo + 1) * r
        assert entries <= 8 * 256
        G = 1
        while G < 32 and entries * G * 2 <= threads and G * 2 <= jt:
            G *= 2
        t_s = [None] * entries
        read = np.zeros((jt, entries), dtype=int)
        for base in range(0, entries * G, threads):
            vals = {}
            for tid in range(threads):
                t = base + tid
                e, g = t // G, t % G
                v = 0
                if e < entries:
                    m, i = m_lo + e // r, e % r
                    for j in range(g, jt, G):
                        read[j, e] += 1
                        v += tpart[j, m, i]
                vals[tid] = v
            o = G // 2
            while o:                                   # __shfl_xor_sync within each warp
                assert G <= 32
                vals = {tid: vals[tid] + vals[tid ^ o] for tid in vals}
                o //= 2
            for tid in range(threads):
                t = base + tid
                e, g = t // G, t % G
                if e < entries and g == 0:
                    assert t_s[e] is None, "t_s written twice"
                    t_s[e] = vals[tid] * s[e % r]
        assert (read == 1).all(), "every partial read by exactly one thread"
        for idx in range(idx0, min(idx0 + threads, MN)):
            m, n = idx // N, idx % N
            v = sum(part[sl, m, n] for sl in range(part.shape[0]))
            v += sum(t_s[(m - m_lo) * r + i] * B[n, i] for i in range(r))
            y[m, n] = v
    return y, cpp


@pytest.mark.parametrize("M, N, K, r, G, cpp, units", [
    (1, 40, 512, 8, 1, 1, 3),        # a CTA of the finish kernel spans rows (N < 256); 13 idle warps
    (3, 300, 1024, 16, 1, 2, 19),    # r · K / 256 = 64 > 16 warps: two chunks a piece, two pieces a warp
    (8, 77, 2048, 130, 1, 2, 16),    # r · K / 256 > W: two chunks a piece; the finish reduces 8 rows
    (2, 600, 768, 5, 2, 1, 45),      # K / 256 odd
    (1, 256, 512, 16, 2, 1, 32),     # 32 pieces on 32 warps: one each
])
def test_emulated_low_rank_term_is_exact(M, N, K, r, G, cpp, units):
    rng = np.random.default_rng(M * 7 + N + K + r)
    x = rng.integers(-4, 5, size=(M, K)).astype(object)
    A = rng.integers(-3, 4, size=(r, K)).astype(object)
    B = rng.integers(-3, 4, size=(N, r)).astype(object)
    s = rng.integers(1, 4, size=r).astype(object)
    S = 2
    part = rng.integers(-50, 50, size=(S, M, N)).astype(object)
    y, used = emulate_lora(x, A, B, s, part, G, units)
    assert used == cpp
    np.testing.assert_array_equal(y.astype(np.int64), (part.sum(axis=0) + ((x @ A.T) * s) @ B.T).astype(np.int64))


@pytest.mark.parametrize("light_first", [False, True])
@pytest.mark.parametrize("M, N, K, r, G, S", [
    (16, 300, 1024, 8, 2, 4),     # slices of one chunk; a CTA spans two slices
    (3, 40, 2048, 5, 1, 2),       # one CTA holds both slices
    (9, 600, 1536, 16, 2, 3),     # 6 chunks in 3 slices of 2
    (2, 16, 1024, 8, 8, 4),       # 4 units on 8 CTAs: CTAs without units inside and between slices
    (1, 40, 2048, 3, 16, 8),      # 24 units on 16 CTAs
    (4, 700, 2048, 16, 3, 2),     # 88 units on 48 warps: light and heavy warps in every slice's CTAs
])
def test_emulated_low_rank_term_sliced_x(M, N, K, r, G, S, light_first):
    rng = np.random.default_rng(M * 11 + N + K + r)
    x = rng.integers(-4, 5, size=(M, K)).astype(object)
    A = rng.integers(-3, 4, size=(r, K)).astype(object)
    B = rng.integers(-3, 4, size=(N, r)).astype(object)
    s = rng.integers(1, 4, size=r).astype(object)
    tiles = -(-N // 16)
    part = rng.integers(-50, 50, size=(S, M, N)).astype(object)
    y, used = emulate_lora(x, A, B, s, part, G, tiles * S, tiles=tiles, S=S, light_first=light_first)
    assert used == 1
    np.testing.assert_array_equal(y.astype(np.int64), (part.sum(axis=0) + ((x @ A.T) * s) @ B.T).astype(np.int64))
