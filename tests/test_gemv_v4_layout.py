"""CPU check of variant 4's data layout (csrc/cuda/nf4_gemv_v4.cu) -- the only correctness evidence
possible without a GPU.  Reimplements, in numpy, what each lane of a warp loads and hands to
mma.sync.aligned.m16n8k16.row.col, and the PTX ISA's fragment layouts of that instruction
(https://docs.nvidia.com/cuda/parallel-thread-execution/ "Matrix Fragments for mma.m16n8k16" with
.bf16 / .f16: A: a0..a3, B: b0, b1, C: c0..c3; in each 32-bit register the element with the lower
column/row index is the low half), then proves:

* the lane -> (row, k) map of the A fragments covers every (row, k) of a 16 x 64 chunk exactly once,
  and the bytes a lane loads hold exactly the nibbles its A registers need (one lookup per byte);
* B (x) uses the same k for the same (lane, step, register, half);
* the emulated MMAs give exactly Σ_k W[row, k] x[m, k] (integer-valued data: exact);
* the C fragment -> (row, m) map the epilogue uses is the PTX one;
* the prmt table address and the replicated table layout (entry v of lane l at 256 v + 4 l), and the
  reduction slots living in the table's spare bytes 128..255, never collide;
* the x row stride in shared memory makes each quarter warp's lds.128 conflict-free;
* the in-CTA stream-K (warp ranges, batches that never cross a tile, flush / slot / combine logic,
  emulated step by step like the kernel's loop) adds every chunk of every tile exactly once, in k
  order, and the CTAs' item ranges partition the work.

Constants (kD, kV4Warps, the prmt selector, the table stride, the x row padding) are read from the
.cu source so that the test follows the kernel."""

import pathlib
import re

import numpy as np
import pytest

SRC = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "nf4_gemv_v4.cu").read_text()


def _const(name):
    m = re.search(rf"constexpr int {name} = (\d+);", SRC)
    assert m, f"{name} not found in nf4_gemv_v4.cu"
    return int(m.group(1))


KD = _const("kD")
WARPS = _const("kV4Warps")


def test_source_constants_this_test_assumes():
    # the prmt selector of lut_pair, the 8-byte loads at q * 8 of rows g and g + 8, the x row stride
    assert "__byte_perm(word, lane4, 0x5504u + 16u * bb)" in SRC
    assert "kc * 32 + w.q * 8" in SRC
    assert "tg * 16 + w.g + 8" in SRC
    assert "CS * 128 + 16" in SRC
    assert "xs + (has0 ? g : 0) * p.XSB + q * 32" in SRC and "cs * 128" in SRC
    assert "lut + v * 256 + j * 16" in SRC
    assert "((f >> 5) << 8) + 128 + ((f & 31) << 2)" in SRC
    assert "const int m = 8 * j + 2 * w.q + (e & 1);" in SRC and "w.g + 8 * (e >> 1)" in SRC
    # the A registers of step s: bytes 2 (s & 1) and 2 (s & 1) + 1 of word s >> 1, rows g (lo) / g + 8 (hi)
    assert "(s < 2) ? b.lo[i].x : b.lo[i].y" in SRC and "const int bb = 2 * (s & 1);" in SRC
    assert "a0 = lut_pair(lut, wl, lane4, bb)" in SRC and "a1 = lut_pair(lut, wh, lane4, bb)" in SRC
    assert "a2 = lut_pair(lut, wl, lane4, bb + 1)" in SRC and "a3 = lut_pair(lut, wh, lane4, bb + 1)" in SRC
    assert "x0[2 * s], x0[2 * s + 1]" in SRC


# ---- PTX fragment layouts (m16n8k16, 16-bit A/B, fp32 C) -----------------------------------------
def ptx_a(lane, reg, half):
    g, t = lane >> 2, lane & 3
    return g + 8 * (reg & 1), 2 * t + half + 8 * (reg >> 1)          # (row, k slot)


def ptx_b(lane, reg, half):
    g, t = lane >> 2, lane & 3
    return 2 * t + half + 8 * reg, g                                   # (k slot, col)


def ptx_c(lane, reg):
    g, t = lane >> 2, lane & 3
    return g + 8 * (reg >> 1), 2 * t + (reg & 1)                       # (row, col)


# ---- the kernel's maps -----------------------------------------------------------------------------
def byte_perm(x, y, sel):
    b = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(b[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def lane_bytes(packed_rows, lane):
    """The 8 bytes a lane loads of its rows g (lo) and g + 8 (hi): bytes [8q, 8q + 8) of each row's
    32-byte chunk (little-endian words .x, .y)."""
    g, q = lane >> 2, lane & 3
    return packed_rows[g, 8 * q: 8 * q + 8], packed_rows[g + 8, 8 * q: 8 * q + 8]


def a_register_byte(lane, s, reg):
    """(fragment row, byte index in the lane's 8) that A register `reg` of step s is looked up from."""
    g = lane >> 2
    row = g + 8 * (reg & 1)            # a0/a2: lo (row g), a1/a3: hi (row g + 8)
    word = s >> 1
    bb = 2 * (s & 1) + (reg >> 1)      # a0/a1: bb, a2/a3: bb + 1
    return row, 4 * word + bb


def kernel_a_k(lane, s, reg, half):
    """Real chunk element k of A register reg, half of step s (from the byte it is looked up from:
    high nibble = even k = low half)."""
    q = lane & 3
    row, byte = a_register_byte(lane, s, reg)
    return row, 16 * q + 2 * byte + half


def kernel_b_k(lane, s, reg, half):
    """Real chunk element k of x that B register reg, half of step s holds: word 2 s + reg of the
    lane's x[m][16 q .. 16 q + 16)."""
    q = lane & 3
    return 16 * q + 2 * (2 * s + reg) + half


def test_a_fragments_cover_the_chunk_once_and_b_matches():
    seen = np.zeros((16, 64), dtype=int)
    for s in range(4):
        slot_k = {}  # (row, k slot) -> real k, for this step
        for lane in range(32):
            for reg in range(4):
                for half in range(2):
                    row, k = kernel_a_k(lane, s, reg, half)
                    prow, pslot = ptx_a(lane, reg, half)
                    assert row == prow
                    seen[row, k] += 1
                    slot_k[(row, pslot)] = k
        # within a step, every row's k slot -> real k map must be the same for all rows (the MMA sums
        # A[row, slot] B[slot, col] over slots: B's slot must carry the same real k)
        per_slot = {}
        for (row, slot), k in slot_k.items():
            per_slot.setdefault(slot, set()).add(k)
        assert all(len(v) == 1 for v in per_slot.values())
        for lane in range(32):
            for reg in range(2):
                for half in range(2):
                    slot, col = ptx_b(lane, reg, half)
                    assert col == lane >> 2
                    assert {kernel_b_k(lane, s, reg, half)} == per_slot[slot]
    assert (seen == 1).all()


def test_emulated_mma_chunk_is_exact():
    rng = np.random.default_rng(0)
    code = rng.integers(-8, 8, size=16)                   # integer "codes": exact sums
    nib = rng.integers(0, 16, size=(16, 64))              # W[row, k] = code[nib]
    packed = (nib[:, 0::2] << 4) | nib[:, 1::2]           # bitsandbytes: even k in the high nibble
    x = rng.integers(-5, 6, size=(16, 64))                # 16 rows of x (two n8 tiles)
    lut = np.zeros(256 * 64, dtype=np.int64)              # int32 words: entry v of lane l at word 64 v + l
    pair = {}
    for i in range(256 * 8):                              # the kernel's build loop (uint4 = 4 lanes)
        v, j = i >> 3, i & 7
        for l4 in range(4):
            lut[v * 64 + j * 4 + l4] = 1                 # mark as table
            pair[(v, j * 4 + l4)] = (code[v >> 4], code[v & 15])
    for nt8 in range(2):
        acc = np.zeros((16, 8), dtype=np.int64)
        for s in range(4):
            A = np.zeros((16, 16), dtype=np.int64)
            B = np.zeros((16, 8), dtype=np.int64)
            for lane in range(32):
                lo, hi = lane_bytes(packed, lane)
                words = {}
                for rowsel, bts in (("lo", lo), ("hi", hi)):
                    words[rowsel] = [int(sum(int(bts[4 * w + i]) << (8 * i) for i in range(4))) for w in range(2)]
                for reg in range(4):
                    row, byte = a_register_byte(lane, s, reg)
                    word = words["lo" if reg % 2 == 0 else "hi"][byte // 4]
                    off = byte_perm(word, 4 * lane, 0x5504 + 16 * (byte % 4))
                    assert off % 4 == 0 and (off % 256) == 4 * lane and (off % 256) < 128
                    v = off // 256
                    assert v == (lo if reg % 2 == 0 else hi)[byte]
                    for half in range(2):
                        prow, pslot = ptx_a(lane, reg, half)
                        A[prow, pslot] = pair[(v, lane)][half]
                for reg in range(2):
                    for half in range(2):
                        pslot, col = ptx_b(lane, reg, half)
                        m = col + 8 * nt8
                        B[pslot, col] = x[m, kernel_b_k(lane, s, reg, half)]
            acc += A @ B
        # C fragments -> (row, m) as the epilogue reads them
        for lane in range(32):
            g, q = lane >> 2, lane & 3
            for e in range(4):
                prow, pcol = ptx_c(lane, e)
                m, row = 8 * nt8 + 2 * q + (e & 1), g + 8 * (e >> 1)
                assert (prow, pcol) == (row, m - 8 * nt8)
        W = code[nib]
        np.testing.assert_array_equal(acc, W @ x[8 * nt8: 8 * nt8 + 8].T)


def test_reduction_slots_live_in_the_table_spare_bytes():
    nfloat = WARPS * 2 * 16 * 16
    offs = np.array([((f >> 5) << 8) + 128 + ((f & 31) << 2) for f in range(nfloat)])
    assert len(set(offs.tolist())) == nfloat
    assert (offs % 256 >= 128).all() and (offs + 4 <= 256 * 256).all()


@pytest.mark.parametrize("cs", [1, 2, 33, 64, 80])
def test_x_reads_are_conflict_free(cs):
    xsb = cs * 128 + 16
    assert xsb % 128 == 16
    for half in (0, 16):                                  # the two lds.128 of a chunk
        for phase in range(4):                            # a quarter warp per wavefront
            groups = set()
            for lane in range(8 * phase, 8 * phase + 8):
                g, q = lane >> 2, lane & 3
                addr = g * xsb + 5 * 128 + q * 32 + half  # chunk 5 of the slice
                groups.add((addr % 128) // 16)
            assert len(groups) == 8


# ---- the in-CTA stream-K: the kernel's loop, step by step ----------------------------------------
def range_lo(w, L):
    return w * L // WARPS


def make_desc(cs, ub, t, c):
    if c == cs:
        t, c = t + 1, 0
    u = t * cs + c
    return t, c, max(0, min(KD, cs - c, ub - u))


def emulate_segment(nt, cs):
    """Returns {tile: [chunks in the order their products were added]} and checks the slot rules."""
    L = nt * cs
    slots, direct = {}, {}
    for warp in range(WARPS):
        ua, ub = range_lo(warp, L), range_lo(warp + 1, L)
        d = make_desc(cs, ub, ua // cs, ua % cs)
        if ua >= ub:
            assert d[2] == 0
        acc = []
        while d[2] > 0:
            t, c, n = d
            assert c + n <= cs                            # a batch never crosses a tile
            acc += [(t, c + i) for i in range(n)]
            end = t * cs + c + n
            if c + n == cs or end == ub:                  # maybe_flush
                assert all(tt == t for tt, _ in acc)
                if ua <= t * cs and (t + 1) * cs <= ub:
                    assert t not in direct
                    direct[t] = [cc for _, cc in acc]
                else:
                    slot = 0 if t == ua // cs else 1
                    assert (warp, slot) not in slots
                    slots[(warp, slot)] = (t, [cc for _, cc in acc])
                acc = []
            d = make_desc(cs, ub, t, c + n)
        assert not acc
    # the combine loop
    out = dict(direct)
    for t in range(nt):
        lo, hi = t * cs, (t + 1) * cs
        owned, parts = False, []
        for ww in range(WARPS):
            ua, ub = range_lo(ww, L), range_lo(ww + 1, L)
            if ua >= ub or ua >= hi or ub <= lo:
                continue
            if ua <= lo and hi <= ub:
                owned = True
                break
            slot = 0 if t == ua // cs else 1
            st, chunks = slots[(ww, slot)]
            assert st == t
            parts += chunks
        if owned:
            assert t in direct
        else:
            assert t not in out
            out[t] = parts
    return out


@pytest.mark.parametrize("nt, cs", [(1, 1), (1, 64), (7, 64), (6, 64), (14, 128), (2, 224), (3, 5), (40, 1),
                                    (17, 3), (1, 7), (5, 13), (28, 64), (1, 16), (2, 8)])
def test_stream_k_adds_every_chunk_once_in_k_order(nt, cs):
    out = emulate_segment(nt, cs)
    assert sorted(out) == list(range(nt))
    for t in range(nt):
        assert out[t] == list(range(cs)), (t, out[t])


@pytest.mark.parametrize("tiles, S, G", [(896, 1, 132), (1792, 2, 132), (64, 4, 132), (3, 1, 132), (1000, 3, 264)])
def test_cta_items_partition(tiles, S, G):
    items = tiles * S
    G = min(G, items)
    got = []
    for b in range(G):
        ia, ib = b * items // G, (b + 1) * items // G
        item = ia
        while item < ib:
            s, t0 = item // tiles, item % tiles
            nt = min(ib - item, tiles - t0)
            got += [(s, t0 + i) for i in range(nt)]
            item += nt
    assert got == [(s, t) for s in range(S) for t in range(tiles)]
