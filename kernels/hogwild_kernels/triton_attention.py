"""Triton RoPE-shifted concurrent attention over a paged cache, and the fused KV append.

One program loads a chunk of one block's K/V once, for one KV head, and scores it
against every query that sees the block (all workers, all query heads of the KV head),
each query rotated in-kernel by its own (position - block offset). Chunks of long blocks
go to separate programs (flash-decoding); a second kernel merges the partial softmaxes
of each query by log-sum-exp. K/V traffic per step is therefore one read of each block,
however many workers look at it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fused import inv_rms, rms_scaled
from .pdl import chain_start, prefetch_l2

LOG2E = 1.4426950408889634


@triton.jit
def _load_halves(ptr, off, mask, HALF: tl.constexpr, MASKED: tl.constexpr):
    """A tile's rows in two halves of the head dim (the rotate-half pairs)."""
    if MASKED:
        return tl.load(ptr + off, mask=mask, other=0.0), tl.load(ptr + off + HALF, mask=mask, other=0.0)
    return tl.load(ptr + off), tl.load(ptr + off + HALF)


@triton.jit
def _prefetch_kv(first, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh,
                 PAGE: tl.constexpr, KV_LINES: tl.constexpr):
    """Ask the L2 cache for the K and V lines (KV_LINES of 128 bytes a key) of keys `first`
    (those below kend) of one block's item and KV head; a prefetch puts nothing in registers."""
    page = tl.load(tables_ptr + item * stride_table + first // PAGE, mask=first < kend, other=0)
    line = tl.arange(0, KV_LINES) * (1024 // k_ptr.dtype.element_ty.primitive_bitwidth)
    at = (page.to(tl.int64) * stride_kpage + (first % PAGE) * stride_ktok + h * stride_kh)[:, None] + line[None, :]
    prefetch_l2(k_ptr + at)
    prefetch_l2(v_ptr + at)


@triton.jit
def _scores(qr1, qr2, k1, k2, IEEE: tl.constexpr):
    """A tile's scores from the rotated queries' and the keys' halves (fp32 exact where IEEE)."""
    if IEEE:
        return tl.dot(qr1, tl.trans(k1), input_precision="ieee") + tl.dot(qr2, tl.trans(k2), input_precision="ieee")
    return tl.dot(qr1, tl.trans(k1)) + tl.dot(qr2, tl.trans(k2))


@triton.jit
def _weighted(acc1, acc2, alpha, pv, v1, v2, IEEE: tl.constexpr):
    """The accumulators' halves rescaled by alpha plus the tile's values weighted by pv."""
    if IEEE:
        return (acc1 * alpha[:, None] + tl.dot(pv, v1, input_precision="ieee"),
                acc2 * alpha[:, None] + tl.dot(pv, v2, input_precision="ieee"))
    return acc1 * alpha[:, None] + tl.dot(pv, v1), acc2 * alpha[:, None] + tl.dot(pv, v2)


@triton.jit
def _tile_pages(k0, kend, item, tables_ptr, stride_table, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr):
    """The page of each of a tile's BLOCK_N keys from k0 (MASKED: page 0 from kend on)."""
    offs = k0 + tl.arange(0, BLOCK_N)
    if MASKED:
        return tl.load(tables_ptr + item * stride_table + offs // PAGE, mask=offs < kend, other=0)
    return tl.load(tables_ptr + item * stride_table + offs // PAGE)


@triton.jit
def _attend_tile(k0, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh,
                 qr1, qr2, limit, d, dmask, m_i, l_i, acc1, acc2,
                 PAGE: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr, BLOCK_N: tl.constexpr,
                 IEEE: tl.constexpr, MASKED: tl.constexpr):
    """One tile of BLOCK_N keys of a block, its pages looked up here (_attend_tile_pages)."""
    page = _tile_pages(k0, kend, item, tables_ptr, stride_table, PAGE, BLOCK_N, MASKED)
    return _attend_tile_pages(k0, kend, page, h, k_ptr, v_ptr, stride_kpage, stride_ktok, stride_kh,
                              qr1, qr2, limit, d, dmask, m_i, l_i, acc1, acc2, PAGE, HALF, HALFP, BLOCK_N, IEEE,
                              MASKED)


@triton.jit
def _kv_offsets(k0, kend, page, h, d, dmask, stride_kpage, stride_ktok, stride_kh,
                PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's key indexes, which lie in the unit, and each key's K/V offsets for KV head h."""
    offs = k0 + tl.arange(0, BLOCK_N)
    kmask = offs < kend
    # token-major pages ([page, token, head, dim]) or head-major ones ([page, head, token, dim],
    # one contiguous run per head and page): the strides say which
    row_off = page.to(tl.int64) * stride_kpage + (offs % PAGE) * stride_ktok
    return offs, kmask, row_off[:, None] + h * stride_kh + d[None, :], kmask[:, None] & dmask[None, :]


@triton.jit
def _softmax_step(s, offs, kmask, limit, m_i, l_i, MASKED: tl.constexpr, KEYS: tl.constexpr = 1):
    """The online softmax over one tile's scores: (new running max, probabilities, the old
    rows' rescale, new running sum); MASKED hides the keys past each row's limit. KEYS: the
    scores' axis of keys (1: [rows, keys]; 0: transposed, [keys, rows])."""
    if MASKED:
        visible = (tl.expand_dims(offs, 1 - KEYS) < tl.expand_dims(limit, KEYS)) & tl.expand_dims(kmask, 1 - KEYS)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, KEYS))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, KEYS))
        m_safe = m_new
    p = tl.exp2(s - tl.expand_dims(m_safe, KEYS))
    alpha = tl.exp2(m_i - m_safe)
    return m_new, p, alpha, l_i * alpha + tl.sum(p, KEYS)


@triton.jit
def _scores_t(k1, k2, qt1, qt2, IEEE: tl.constexpr):
    """A tile's scores transposed, [keys, rows], from the keys' halves and the rotated queries'
    halves transposed ([half head dim, rows]): the keys the product's long side."""
    if IEEE:
        return tl.dot(k1, qt1, input_precision="ieee") + tl.dot(k2, qt2, input_precision="ieee")
    return tl.dot(k1, qt1) + tl.dot(k2, qt2)


@triton.jit
def _weighted_t(acc1, acc2, alpha, pt, v1, v2, IEEE: tl.constexpr):
    """_weighted with transposed accumulators ([half head dim, rows]) and probabilities ([keys, rows])."""
    if IEEE:
        return (acc1 * alpha[None, :] + tl.dot(tl.trans(v1), pt, input_precision="ieee"),
                acc2 * alpha[None, :] + tl.dot(tl.trans(v2), pt, input_precision="ieee"))
    return acc1 * alpha[None, :] + tl.dot(tl.trans(v1), pt), acc2 * alpha[None, :] + tl.dot(tl.trans(v2), pt)


@triton.jit
def _attend_tile_pages(k0, kend, page, h, k_ptr, v_ptr, stride_kpage, stride_ktok, stride_kh,
                       qr1, qr2, limit, d, dmask, m_i, l_i, acc1, acc2,
                       PAGE: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr, BLOCK_N: tl.constexpr,
                       IEEE: tl.constexpr, MASKED: tl.constexpr):
    """One tile of BLOCK_N keys of a block, each key's page given: scores for every packed
    query, online softmax.

    The head dim is handled as two halves (the rotate-half pairs), so the query rotation
    needs no shuffle. MASKED=False is the fast path for tiles that lie inside the chunk
    and that every row sees whole (most of a long block): no bounds, no visibility mask.
    """
    offs, kmask, kv_off, kvmask = _kv_offsets(k0, kend, page, h, d, dmask, stride_kpage, stride_ktok, stride_kh,
                                              PAGE, BLOCK_N)
    k1, k2 = _load_halves(k_ptr, kv_off, kvmask, HALF, MASKED or HALF != HALFP)
    m_new, p, alpha, l_i = _softmax_step(_scores(qr1, qr2, k1, k2, IEEE), offs, kmask, limit, m_i, l_i, MASKED)
    v1, v2 = _load_halves(v_ptr, kv_off, kvmask, HALF, MASKED or HALF != HALFP)
    acc1, acc2 = _weighted(acc1, acc2, alpha, p.to(v_ptr.dtype.element_ty), v1, v2, IEEE)
    return m_new, l_i, acc1, acc2


@triton.jit
def _attend_tile_split(k0, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage, stride_ktok,
                       stride_kh, d, dmask, qa1, qa2, limit_a, ma, la, acca1, acca2,
                       qb1t, qb2t, limit_b, mb, lb, accb1t, accb2t,
                       PAGE: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr, BLOCK_N: tl.constexpr,
                       IEEE: tl.constexpr, MASKED: tl.constexpr):
    """One tile of keys for rows packed in two groups (a tile of BLOCK_M rows and one of
    BLOCK_M2): K and V loaded once, each group scored and accumulated as _attend_tile_pages
    does, so 80 rows cost a 64- and a 16-row product rather than a 128-row one. The second
    group's products run transposed (keys and head dims as their long side, [.., rows]), so
    that both are warpgroup products with their operands in shared memory."""
    page = _tile_pages(k0, kend, item, tables_ptr, stride_table, PAGE, BLOCK_N, MASKED)
    offs, kmask, kv_off, kvmask = _kv_offsets(k0, kend, page, h, d, dmask, stride_kpage, stride_ktok, stride_kh,
                                              PAGE, BLOCK_N)
    k1, k2 = _load_halves(k_ptr, kv_off, kvmask, HALF, MASKED or HALF != HALFP)
    ma_new, pa, alpha_a, la = _softmax_step(_scores(qa1, qa2, k1, k2, IEEE), offs, kmask, limit_a, ma, la, MASKED)
    mb_new, pt, alpha_b, lb = _softmax_step(_scores_t(k1, k2, qb1t, qb2t, IEEE), offs, kmask, limit_b, mb, lb,
                                            MASKED, 0)
    v1, v2 = _load_halves(v_ptr, kv_off, kvmask, HALF, MASKED or HALF != HALFP)
    ty = v_ptr.dtype.element_ty
    acca1, acca2 = _weighted(acca1, acca2, alpha_a, pa.to(ty), v1, v2, IEEE)
    accb1t, accb2t = _weighted_t(accb1t, accb2t, alpha_b, pt.to(ty), v1, v2, IEEE)
    return ma_new, la, acca1, acca2, mb_new, lb, accb1t, accb2t


@triton.jit
def _attend_page_tile(k0, item, h, k_desc, v_desc, tables_ptr, stride_table, qr1, qr2, m_i, l_i, acc1, acc2,
                      PAGE: tl.constexpr, HALF: tl.constexpr, IEEE: tl.constexpr):
    """One whole page of keys (BLOCK_N == PAGE) that every row sees, its K and V halves loaded by
    tensor descriptors (TMA on Hopper: one copy of the page's run per half, no per-thread
    addresses); the same online softmax as the unmasked tile."""
    row = tl.load(tables_ptr + item * stride_table + k0 // PAGE) * PAGE
    k1 = k_desc.load([row, h * 2 * HALF])
    k2 = k_desc.load([row, h * 2 * HALF + HALF])
    s = _scores(qr1, qr2, k1, k2, IEEE)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = p.to(v_desc.dtype)
    v1 = v_desc.load([row, h * 2 * HALF])
    v2 = v_desc.load([row, h * 2 * HALF + HALF])
    acc1, acc2 = _weighted(acc1, acc2, alpha, pv, v1, v2, IEEE)
    return m_new, l_i, acc1, acc2


@triton.jit
def _attend_whole_tile(k0, kend, item, h, k_ptr, v_ptr, k_desc, v_desc, tables_ptr, stride_table, stride_kpage,
                       stride_ktok, stride_kh, qr1, qr2, limit, d, dmask, m_i, l_i, acc1, acc2,
                       PAGE: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr, BLOCK_N: tl.constexpr,
                       IEEE: tl.constexpr, TMA: tl.constexpr):
    """A tile inside the unit that every row sees whole: a page by descriptors where TMA, else
    the unmasked tile."""
    if TMA:
        m_i, l_i, acc1, acc2 = _attend_page_tile(k0, item, h, k_desc, v_desc, tables_ptr, stride_table, qr1, qr2,
                                                 m_i, l_i, acc1, acc2, PAGE, HALF, IEEE)
    else:
        m_i, l_i, acc1, acc2 = _attend_tile(k0, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage,
                                            stride_ktok, stride_kh, qr1, qr2, limit, d, dmask, m_i, l_i, acc1, acc2,
                                            PAGE, HALF, HALFP, BLOCK_N, IEEE, False)
    return m_i, l_i, acc1, acc2


# a launch's first unit and the page table's width change from pass to pass and only offset
# scalar loads: specialising on their values (1, multiples of 16) would only compile more variants
@triton.jit(do_not_specialize=["unit0", "stride_table"])
def _rope_shift_partial_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc,
    unit_item_ptr, unit_kstart_ptr, unit_kend_ptr, unit_pair_ptr, unit_npairs_ptr,
    pair_tok_ptr, pair_cos_ptr, pair_sin_ptr, pair_limit_ptr, pair_part_ptr, tables_ptr,
    o_part_ptr, lse_part_ptr,
    unit0,
    stride_qt, stride_qh,
    stride_kpage, stride_ktok, stride_kh,
    stride_table,
    stride_ot, stride_oh,
    stride_lt,
    qk_scale,
    PAGE: tl.constexpr, REP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    HALF: tl.constexpr, HALFP: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    LOOP_WHILE: tl.constexpr, PDL: tl.constexpr, CHAINED: tl.constexpr, PREFETCH_KEYS: tl.constexpr = 0,
    KV_LINES: tl.constexpr = 1, AHEAD: tl.constexpr = 0, TMA: tl.constexpr = False,
    PAGES_AHEAD: tl.constexpr = False, KV_HEADS: tl.constexpr = 1, HEADS_FIRST: tl.constexpr = False,
    BLOCK_M2: tl.constexpr = 0,
):
    """Partial attention of one unit (a chunk of one block) for one KV head and BLOCK_R readers.

    Rows pack (reader, query head of this KV head) densely: BLOCK_R * REP <= BLOCK_M + BLOCK_M2;
    BLOCK_M2 > 0 (a power of two, at least 16; neither TMA nor PAGES_AHEAD) puts the rows past
    BLOCK_M in a second row tile that reads the same K/V tiles (80 rows as 64 + 16, not 128).
    Each reader's rotation (cos/sin of its delta, rope attention factor included) comes
    precomputed per pair, once per forward pass for all layers. CHAINED: a programmatic
    dependent of the kernel before it (pdl.py); until that kernel's writes are visible it
    reads only the pass's plan (host inputs) and its pairs' rotations (computed at the pass's
    start), and asks the L2 cache for the K and V lines
    (KV_LINES of 128 bytes a key) of the unit's first PREFETCH_KEYS keys. TMA: the tiles every
    row sees whole are pages (BLOCK_N == PAGE) loaded through k_desc and v_desc (tensor
    descriptors over the token-major pools' [slot, kv_head x head dim] rows). PAGES_AHEAD
    (not with TMA): the tiles every row sees whole get their pages from a lookup one tile ahead,
    so that their K/V loads depend on no load of their own iteration and the compiler can
    keep the next tile's copies in flight (num_stages 3 or more; see TritonAttention).
    HEADS_FIRST: the grid's first axis runs over units x KV_HEADS, a unit's heads one after
    another, so the GPU starts every head's first units before any head's last; otherwise over
    units, the heads on the second axis (each head's units before the next head's).
    """
    if HEADS_FIRST:
        u = unit0 + tl.program_id(0) // KV_HEADS
        h = tl.program_id(0) % KV_HEADS
    else:
        u = unit0 + tl.program_id(0)
        h = tl.program_id(1)
    rt = tl.program_id(2)
    npairs = tl.load(unit_npairs_ptr + u)
    if rt * BLOCK_R >= npairs:
        return
    item = tl.load(unit_item_ptr + u)
    kstart = tl.load(unit_kstart_ptr + u)
    kend = tl.load(unit_kend_ptr + u)
    pair0 = tl.load(unit_pair_ptr + u)
    if PREFETCH_KEYS > 0:  # older keys were written by earlier passes
        _prefetch_kv(kstart + tl.arange(0, PREFETCH_KEYS), kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table,
                     stride_kpage, stride_ktok, stride_kh, PAGE, KV_LINES)
    valid, pair, tok, limit, head, qmask, cos, sin = _row_pairs(
        tl.arange(0, BLOCK_M), rt, npairs, pair0, h, pair_tok_ptr, pair_limit_ptr, pair_cos_ptr, pair_sin_ptr,
        BLOCK_R, REP, HALF, HALFP)
    if BLOCK_M2 > 0:  # the rows past BLOCK_M, in a tile of their own
        valid_b, pair_b, tok_b, limit_b, head_b, qmask_b, cos_b, sin_b = _row_pairs(
            BLOCK_M + tl.arange(0, BLOCK_M2), rt, npairs, pair0, h, pair_tok_ptr, pair_limit_ptr, pair_cos_ptr,
            pair_sin_ptr, BLOCK_R, REP, HALF, HALFP)
    if CHAINED:
        tl.extra.cuda.gdc_wait()
    if PDL:  # the merge may be scheduled now; it waits for this grid's stores before it reads
        tl.extra.cuda.gdc_launch_dependents()

    qr1, qr2 = _rotated_queries(q_ptr, tok, head, qmask, cos, sin, stride_qt, stride_qh, qk_scale,
                                k_ptr.dtype.element_ty, HALF, HALFP)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALFP], tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALFP], tl.float32)
    # keys [kstart, full) are inside the chunk and visible to every row: the unmasked fast path
    seen_by_all = tl.min(tl.where(valid, limit, kend), 0)
    if BLOCK_M2 > 0:
        qb1, qb2 = _rotated_queries(q_ptr, tok_b, head_b, qmask_b, cos_b, sin_b, stride_qt, stride_qh, qk_scale,
                                    k_ptr.dtype.element_ty, HALF, HALFP)
        qb1, qb2 = tl.trans(qb1), tl.trans(qb2)  # [half head dim, rows]: see _attend_tile_split
        m_b = tl.full([BLOCK_M2], float("-inf"), tl.float32)
        l_b = tl.zeros([BLOCK_M2], tl.float32)
        acc_b1 = tl.zeros([HALFP, BLOCK_M2], tl.float32)
        acc_b2 = tl.zeros([HALFP, BLOCK_M2], tl.float32)
        seen_by_all = tl.minimum(seen_by_all, tl.min(tl.where(valid_b, limit_b, kend), 0))
    full = kstart + tl.maximum(tl.minimum(seen_by_all, kend) - kstart, 0) // BLOCK_N * BLOCK_N
    d = tl.arange(0, HALFP)
    dmask = d < HALF
    if BLOCK_M2 > 0:  # two row tiles over each K/V tile (neither TMA nor pages ahead: wide rows)
        if LOOP_WHILE:  # the CPU interpreter cannot range() over loaded bounds
            k0 = kstart
            while k0 < full:
                m_i, l_i, acc1, acc2, m_b, l_b, acc_b1, acc_b2 = _attend_tile_split(
                    k0, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh,
                    d, dmask, qr1, qr2, limit, m_i, l_i, acc1, acc2, qb1, qb2, limit_b, m_b, l_b, acc_b1, acc_b2,
                    PAGE, HALF, HALFP, BLOCK_N, IEEE, False)
                k0 += BLOCK_N
            while k0 < kend:
                m_i, l_i, acc1, acc2, m_b, l_b, acc_b1, acc_b2 = _attend_tile_split(
                    k0, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh,
                    d, dmask, qr1, qr2, limit, m_i, l_i, acc1, acc2, qb1, qb2, limit_b, m_b, l_b, acc_b1, acc_b2,
                    PAGE, HALF, HALFP, BLOCK_N, IEEE, True)
                k0 += BLOCK_N
        else:
            for k0 in range(kstart, full, BLOCK_N):
                if AHEAD > 0:  # the tile AHEAD tiles on, asked of the L2 cache while this one is read
                    _prefetch_kv(k0 + AHEAD * BLOCK_N + tl.arange(0, BLOCK_N), kend, item, h, k_ptr, v_ptr,
                                 tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh, PAGE, KV_LINES)
                m_i, l_i, acc1, acc2, m_b, l_b, acc_b1, acc_b2 = _attend_tile_split(
                    k0, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh,
                    d, dmask, qr1, qr2, limit, m_i, l_i, acc1, acc2, qb1, qb2, limit_b, m_b, l_b, acc_b1, acc_b2,
                    PAGE, HALF, HALFP, BLOCK_N, IEEE, False)
            for k0 in range(full, kend, BLOCK_N):
                m_i, l_i, acc1, acc2, m_b, l_b, acc_b1, acc_b2 = _attend_tile_split(
                    k0, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh,
                    d, dmask, qr1, qr2, limit, m_i, l_i, acc1, acc2, qb1, qb2, limit_b, m_b, l_b, acc_b1, acc_b2,
                    PAGE, HALF, HALFP, BLOCK_N, IEEE, True)
        _store_partials(o_part_ptr, lse_part_ptr, pair_part_ptr, pair_b, valid_b, head_b, qmask_b, tl.trans(acc_b1),
                        tl.trans(acc_b2), m_b, l_b, stride_ot, stride_oh, stride_lt, HALF, HALFP)
    elif LOOP_WHILE:  # (the interpreter, as above)
        k0 = kstart
        if PAGES_AHEAD:  # the same tiles, each one's pages looked up while the one before is read
            page = _tile_pages(kstart, full, item, tables_ptr, stride_table, PAGE, BLOCK_N, True)
            while k0 < full:
                following = _tile_pages(k0 + BLOCK_N, full, item, tables_ptr, stride_table, PAGE, BLOCK_N, True)
                m_i, l_i, acc1, acc2 = _attend_tile_pages(
                    k0, kend, page, h, k_ptr, v_ptr, stride_kpage, stride_ktok, stride_kh, qr1, qr2, limit, d, dmask,
                    m_i, l_i, acc1, acc2, PAGE, HALF, HALFP, BLOCK_N, IEEE, False)
                page = following
                k0 += BLOCK_N
        else:
            while k0 < full:
                m_i, l_i, acc1, acc2 = _attend_whole_tile(
                    k0, kend, item, h, k_ptr, v_ptr, k_desc, v_desc, tables_ptr, stride_table, stride_kpage,
                    stride_ktok, stride_kh, qr1, qr2, limit, d, dmask, m_i, l_i, acc1, acc2, PAGE, HALF, HALFP,
                    BLOCK_N, IEEE, TMA)
                k0 += BLOCK_N
        while k0 < kend:
            m_i, l_i, acc1, acc2 = _attend_tile(
                k0, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh,
                qr1, qr2, limit, d, dmask, m_i, l_i, acc1, acc2, PAGE, HALF, HALFP, BLOCK_N, IEEE, True)
            k0 += BLOCK_N
    else:
        if PAGES_AHEAD:  # no load in the loop waits on another of its own: the K/V copies pipeline
            page = _tile_pages(kstart, full, item, tables_ptr, stride_table, PAGE, BLOCK_N, True)
            for k0 in range(kstart, full, BLOCK_N):
                following = _tile_pages(k0 + BLOCK_N, full, item, tables_ptr, stride_table, PAGE, BLOCK_N, True)
                m_i, l_i, acc1, acc2 = _attend_tile_pages(
                    k0, kend, page, h, k_ptr, v_ptr, stride_kpage, stride_ktok, stride_kh, qr1, qr2, limit, d, dmask,
                    m_i, l_i, acc1, acc2, PAGE, HALF, HALFP, BLOCK_N, IEEE, False)
                page = following
        else:
            for k0 in range(kstart, full, BLOCK_N):
                if AHEAD > 0:  # the tile AHEAD tiles on, asked of the L2 cache while this one is read
                    _prefetch_kv(k0 + AHEAD * BLOCK_N + tl.arange(0, BLOCK_N), kend, item, h, k_ptr, v_ptr,
                                 tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh, PAGE, KV_LINES)
                m_i, l_i, acc1, acc2 = _attend_whole_tile(
                    k0, kend, item, h, k_ptr, v_ptr, k_desc, v_desc, tables_ptr, stride_table, stride_kpage,
                    stride_ktok, stride_kh, qr1, qr2, limit, d, dmask, m_i, l_i, acc1, acc2, PAGE, HALF, HALFP,
                    BLOCK_N, IEEE, TMA)
        for k0 in range(full, kend, BLOCK_N):
            m_i, l_i, acc1, acc2 = _attend_tile(
                k0, kend, item, h, k_ptr, v_ptr, tables_ptr, stride_table, stride_kpage, stride_ktok, stride_kh,
                qr1, qr2, limit, d, dmask, m_i, l_i, acc1, acc2, PAGE, HALF, HALFP, BLOCK_N, IEEE, True)

    _store_partials(o_part_ptr, lse_part_ptr, pair_part_ptr, pair, valid, head, qmask, acc1, acc2, m_i, l_i,
                    stride_ot, stride_oh, stride_lt, HALF, HALFP)


@triton.jit
def _row_pairs(m, rt, npairs, pair0, h, pair_tok_ptr, pair_limit_ptr, pair_cos_ptr, pair_sin_ptr,
               BLOCK_R: tl.constexpr, REP: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr):
    """Rows m of row tile rt, packed (reader, query head of KV head h): whether each is a pair
    of the unit, its pair, query token, visible limit, query head, its [row, half] mask and
    its rotation (the pass's plan only: a chained program reads these before its wait)."""
    row = rt * BLOCK_R + m // REP
    valid = (row < npairs) & (m < BLOCK_R * REP)
    pair = pair0 + row
    tok = tl.load(pair_tok_ptr + pair, mask=valid, other=0).to(tl.int64)
    limit = tl.load(pair_limit_ptr + pair, mask=valid, other=0)
    d = tl.arange(0, HALFP)
    qmask = valid[:, None] & (d < HALF)[None, :]
    # the pairs' rotations: computed once at the pass's start, long before the kernel this one waits for
    cs_off = pair.to(tl.int64)[:, None] * HALF + d[None, :]
    cos = tl.load(pair_cos_ptr + cs_off, mask=qmask, other=0.0)
    sin = tl.load(pair_sin_ptr + cs_off, mask=qmask, other=0.0)
    return valid, pair, tok, limit, h * REP + m % REP, qmask, cos, sin


@triton.jit
def _rotated_queries(q_ptr, tok, head, qmask, cos, sin, stride_qt, stride_qh, qk_scale, ty: tl.constexpr,
                     HALF: tl.constexpr, HALFP: tl.constexpr):
    """The rows' queries rotated by their pairs' cos/sin and scaled, in the keys' type, as two halves."""
    d = tl.arange(0, HALFP)
    q_base = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q1 = tl.load(q_base, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(q_base + HALF, mask=qmask, other=0.0).to(tl.float32)
    return ((q1 * cos - q2 * sin) * qk_scale).to(ty), ((q2 * cos + q1 * sin) * qk_scale).to(ty)


@triton.jit
def _store_partials(o_part_ptr, lse_part_ptr, pair_part_ptr, pair, valid, head, qmask, acc1, acc2, m_i, l_i,
                    stride_ot, stride_oh, stride_lt, HALF: tl.constexpr, HALFP: tl.constexpr):
    """The rows' normalised partial outputs and log-sum-exps (log2), one partial row per (unit,
    pair), grouped by token; 64-bit: long prefills have many."""
    d = tl.arange(0, HALFP)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out_row = tl.load(pair_part_ptr + pair, mask=valid, other=0).to(tl.int64)
    o_base = o_part_ptr + out_row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    ty = o_part_ptr.dtype.element_ty
    tl.store(o_base, (acc1 / l_safe[:, None]).to(ty), mask=qmask)
    tl.store(o_base + HALF, (acc2 / l_safe[:, None]).to(ty), mask=qmask)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(lse_part_ptr + out_row * stride_lt + head, lse, mask=valid)


@triton.jit
def _merge_partials_kernel(
    o_part_ptr, lse_part_ptr, tok_start_ptr, out_ptr,
    stride_ot, stride_oh, stride_lt, stride_outt, stride_outh,
    D: tl.constexpr, DP: tl.constexpr, P_BLOCK: tl.constexpr, PDL: tl.constexpr, CHAINED: tl.constexpr,
):
    """Log-sum-exp merge of one query head's partials (rows [start, next start) of its
    token: no indirection), P_BLOCK of them per load.

    PDL: launched as a programmatic dependent of the partial kernel, so its launch overlaps
    that kernel's tail; it reads its row range (the pass's plan) while the partials run, and
    waits for them before touching them. CHAINED: then lets the kernel after it launch (pdl.py)."""
    t = tl.program_id(0)
    head = tl.program_id(1)
    start = tl.load(tok_start_ptr + t)
    end = tl.load(tok_start_ptr + t + 1)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if CHAINED:
        tl.extra.cuda.gdc_launch_dependents()
    d = tl.arange(0, DP)
    dmask = d < D
    p = tl.arange(0, P_BLOCK)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([DP], tl.float32)
    i = start
    while i < end:
        pmask = i + p < end
        part = (i + p).to(tl.int64)
        lse = tl.load(lse_part_ptr + part * stride_lt + head, mask=pmask, other=float("-inf"))
        o = tl.load(o_part_ptr + part[:, None] * stride_ot + head * stride_oh + d[None, :],
                    mask=pmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse - m_safe)
        scale_old = tl.exp2(m - m_safe)
        acc = acc * scale_old + tl.sum(o * w[:, None], 0)
        l = l * scale_old + tl.sum(w, 0)
        m = m_new
        i += P_BLOCK
    l = tl.where(l == 0.0, 1.0, l)
    tl.store(out_ptr + t * stride_outt + head * stride_outh + d, (acc / l).to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _slot_rotation(t, d, dmask, cos_ptr, sin_ptr, slot_ptr, HALF: tl.constexpr):
    """Token t's pool slot and the cos/sin of its block-local position (pass inputs, precomputed
    per pass: a chained append loads them before its wait)."""
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cos = tl.load(cos_ptr + t * HALF + d, mask=dmask, other=0.0)
    sin = tl.load(sin_ptr + t * HALF + d, mask=dmask, other=0.0)
    return slot, cos, sin


@triton.jit
def _store_rotated_kv(k1, k2, vb, h, d, dmask, slot, cos, sin, k_pool_ptr, v_pool_ptr,
                      stride_ppage, stride_ptok, stride_ph, PAGE: tl.constexpr, HALF: tl.constexpr):
    """A token's key halves (fp32) rotated by cos/sin (its block-local position's) and stored in
    its pool slot for KV head h, with its value (halves at vb, vb + HALF)."""
    pb = (slot // PAGE) * stride_ppage + (slot % PAGE) * stride_ptok + h * stride_ph + d
    ty = k_pool_ptr.dtype.element_ty
    tl.store(k_pool_ptr + pb, (k1 * cos - k2 * sin).to(ty), mask=dmask)
    tl.store(k_pool_ptr + pb + HALF, (k2 * cos + k1 * sin).to(ty), mask=dmask)
    tl.store(v_pool_ptr + pb, tl.load(vb, mask=dmask, other=0.0).to(ty), mask=dmask)
    tl.store(v_pool_ptr + pb + HALF, tl.load(vb + HALF, mask=dmask, other=0.0).to(ty), mask=dmask)


@triton.jit
def _kv_append_kernel(
    k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, k_pool_ptr, v_pool_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ppage, stride_ptok, stride_ph,
    PAGE: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr, CHAINED: tl.constexpr,
):
    """Rotate one new key at its block-local position (cos/sin precomputed per pass) and store K and V."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HALFP)
    dmask = d < HALF
    slot, cos, sin = _slot_rotation(t, d, dmask, cos_ptr, sin_ptr, slot_ptr, HALF)
    chain_start(CHAINED)
    kb = k_ptr + t * stride_kt + h * stride_kh + d
    k1 = tl.load(kb, mask=dmask, other=0.0).to(tl.float32)
    k2 = tl.load(kb + HALF, mask=dmask, other=0.0).to(tl.float32)
    _store_rotated_kv(k1, k2, v_ptr + t * stride_vt + h * stride_vh + d, h, d, dmask, slot, cos, sin,
                      k_pool_ptr, v_pool_ptr, stride_ppage, stride_ptok, stride_ph, PAGE, HALF)


@triton.jit
def _qk_norm_kv_append_kernel(
    qkv_ptr, q_out_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, slot_ptr, k_pool_ptr, v_pool_ptr,
    stride_t, stride_ot, stride_oh, stride_ppage, stride_ptok, stride_ph, eps,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    PAGE: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr, CHAINED: tl.constexpr,
):
    """Qwen3's per-head q and k RMSNorms and the K/V append in one launch: for one token and one
    KV head, its key normed, rotated at its block-local position and stored with its value,
    and the REP query heads that read it normed into q_out. Each row's norm is the one
    fused.qk_rms_norm computes (one reduction over the whole row, the same roundings): q bit
    for bit; the rotated keys bit for bit under the interpreter, within an ulp on a GPU."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    row = qkv_ptr + t * stride_t
    offs = tl.arange(0, DP)
    mask = offs < D
    d = tl.arange(0, HALFP)
    dmask = d < HALF
    slot, cos, sin = _slot_rotation(t, d, dmask, cos_ptr, sin_ptr, slot_ptr, HALF)
    chain_start(CHAINED)
    kb = row + (Q_HEADS + h) * D
    inv = inv_rms(tl.load(kb + offs, mask=mask, other=0.0), D, eps)
    ty_in = qkv_ptr.dtype.element_ty
    k1 = rms_scaled(tl.load(kb + d, mask=dmask, other=0.0), inv, k_w_ptr + d, dmask).to(ty_in).to(tl.float32)
    k2 = rms_scaled(tl.load(kb + HALF + d, mask=dmask, other=0.0), inv, k_w_ptr + HALF + d, dmask)
    k2 = k2.to(ty_in).to(tl.float32)
    _store_rotated_kv(k1, k2, row + (Q_HEADS + KV_HEADS + h) * D + d, h, d, dmask, slot, cos, sin,
                      k_pool_ptr, v_pool_ptr, stride_ppage, stride_ptok, stride_ph, PAGE, HALF)
    for g in tl.static_range(REP):
        head = h * REP + g
        q = tl.load(row + head * D + offs, mask=mask, other=0.0)
        y = rms_scaled(q, inv_rms(q, D, eps), q_w_ptr + offs, mask)
        tl.store(q_out_ptr + t * stride_ot + head * stride_oh + offs, y.to(q_out_ptr.dtype.element_ty), mask=mask)
