"""The Triton kernels against the torch reference, on fresh random inputs.

On CPU they run under TRITON_INTERPRET=1 (set in conftest.py), so sizes stay small.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from hogwild_kernels import (  # noqa: E402
    QueryGroup, Segment, TorchAttention, TritonAttention, concurrent_attention_reference,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_case(rng: random.Random, workers: int, q_heads: int, kv_heads: int, head_dim: int,
                page_size: int = 4, shared: int = 2, dtype=torch.float32, max_chunk: int = 3):
    """A pool with scattered pages, shared blocks seen by all workers (with the lag),
    every worker's own block (causal over its fed chunk), and empty blocks."""
    pages_total = 200
    perm = list(range(pages_total))
    rng.shuffle(perm)
    taken = iter(perm)

    def block(length):
        n = -(-length // page_size)
        return torch.tensor([next(taken) for _ in range(n)], dtype=torch.int64), length

    blocks = [block(rng.choice([0, 1, rng.randint(1, 40)])) for _ in range(shared)]
    fed = [rng.randint(1, max_chunk) for _ in range(workers)]
    own = [block(rng.randint(0, 12) + fed[w]) for w in range(workers)]
    groups, start = [], 0
    for w in range(workers):
        segs, offset = [], 0
        for b, (pages, length) in enumerate(blocks):
            if length:
                segs.append(Segment(pages, length, offset, block=b))
            offset += length
        for o in range(workers):
            if o == w:
                continue
            pages, length = own[o]
            visible = length - fed[o]  # the lag: what o had before this pass
            if visible:
                segs.append(Segment(pages, visible, offset, block=100 + o))
            offset += visible
        pages, length = own[w]
        segs.append(Segment(pages, length, offset, block=100 + w))
        position = offset + length - fed[w]
        groups.append(QueryGroup(start, fed[w], position, segs))
        start += fed[w]
    k_pool = torch.randn(pages_total, page_size, kv_heads, head_dim, dtype=dtype) * 2
    v_pool = torch.randn(pages_total, page_size, kv_heads, head_dim, dtype=dtype)
    q = torch.randn(start, q_heads, head_dim, dtype=dtype) * 2
    return q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), groups


def head_major(pool: torch.Tensor) -> torch.Tensor:
    """The same pool [pages, page_size, heads, dim] with each page head-major in memory."""
    return pool.transpose(1, 2).contiguous().transpose(1, 2)


def backends(head_dim, rope_scale=1.0, chunk=16):
    inv_freq = (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(DEVICE)
    sm = head_dim**-0.5
    return TorchAttention(inv_freq, rope_scale, sm), TritonAttention(inv_freq, rope_scale, sm, chunk=chunk)


def reference(ref: TorchAttention, q, k_pool, v_pool, groups):
    """The per-block reference (the query rotated for each block), the ground truth."""
    return concurrent_attention_reference(q, k_pool, v_pool, groups, ref.inv_freq, ref.rope_scale, ref.sm_scale)


def to_device(groups):
    for g in groups:
        for s in g.segments:
            s.pages = s.pages.to(DEVICE)
    return groups


@pytest.mark.parametrize("workers,q_heads,kv_heads,head_dim,seed", [
    (1, 4, 4, 64, 0),    # GQA 1, a single worker
    (3, 8, 2, 64, 1),    # GQA 4
    (2, 5, 1, 128, 2),   # GQA 5 (not a power of two), head dim 128
    (4, 8, 1, 64, 3),    # GQA 8
    (8, 4, 1, 64, 4),    # 8 workers
    (5, 10, 2, 128, 5),  # GQA 5, 5 workers
    (2, 2, 1, 256, 6),   # head dim 256
])
def test_attention_matches_reference(workers, q_heads, kv_heads, head_dim, seed):
    rng = random.Random(seed)
    q, k_pool, v_pool, groups = random_case(rng, workers, q_heads, kv_heads, head_dim)
    groups = to_device(groups)
    ref, tri = backends(head_dim, rope_scale=1.0 if seed % 2 else 1.3)
    slots = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    pos = torch.zeros_like(slots)
    want = reference(ref, q, k_pool, v_pool, groups)
    got = tri.attend(q, k_pool, v_pool, tri.prepare(groups, slots, pos))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("workers,q_heads,kv_heads,head_dim,seed", [(3, 8, 2, 64, 21), (2, 5, 1, 128, 22)])
def test_head_major_pages_give_the_same_output(workers, q_heads, kv_heads, head_dim, seed):
    """The pool's pages laid out head-major: the kernel reads by strides,
    so the output is bit for bit the token-major one, and the torch path agrees too."""
    q, k_pool, v_pool, groups = random_case(random.Random(seed), workers, q_heads, kv_heads, head_dim)
    groups = to_device(groups)
    ref, tri = backends(head_dim, rope_scale=1.1)
    s = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    k_hm, v_hm = head_major(k_pool), head_major(v_pool)
    assert k_hm.stride(1) == head_dim  # a page's tokens of one head are contiguous
    token_major = tri.attend(q, k_pool, v_pool, tri.prepare(groups, s, s))
    got = tri.attend(q, k_hm, v_hm, tri.prepare(groups, s, s))
    assert torch.equal(got, token_major)
    torch.testing.assert_close(ref.attend(q, k_hm, v_hm, ref.prepare(groups, s, s)),
                               reference(ref, q, k_pool, v_pool, groups), atol=2e-5, rtol=2e-5)


def test_prefetched_keys_must_be_a_power_of_two():
    """A count the kernel cannot lay out is refused with a message, not left to Triton's compiler."""
    _, tri = backends(64)
    for bad in (3, 100, -64, 2.0):
        with pytest.raises(ValueError, match="power of two"):
            tri.prefetch_keys = bad
    tri.prefetch_keys = 0
    tri.prefetch_keys = 256
    assert tri.prefetch_keys == 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pages_read_through_tensor_descriptors_give_the_same_output(dtype):
    """tma_pages: the tiles every row sees whole are read a page at a time through tensor
    descriptors (16-token pages): bit for bit the kernel reading the same 16-key tiles by
    addresses, and the reference's attention; pools the descriptors cannot serve (4-token pages,
    head-major pages) are read as before."""
    # seed 55: a 33-key block every worker sees whole, two pages of it read by descriptors
    q, k_pool, v_pool, groups = random_case(random.Random(55), 5, 8, 2, 64, page_size=16, shared=3, dtype=dtype)
    groups = to_device(groups)
    ref, _ = backends(64)
    plain = TritonAttention(ref.inv_freq, 1.0, 64**-0.5, chunk=16, block_n=16)  # the descriptors' 16-key tiles
    tma = TritonAttention(ref.inv_freq, 1.0, 64**-0.5, chunk=16, tma_pages=True)
    assert tma.page_descriptors(k_pool, v_pool) is not None
    s = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    got = tma.attend(q, k_pool, v_pool, tma.prepare(groups, s, s))
    assert torch.equal(got, plain.attend(q, k_pool, v_pool, plain.prepare(groups, s, s)))
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), reference(ref, q.float(), k_pool.float(), v_pool.float(), groups), **tol)
    assert tma.page_descriptors(head_major(k_pool), head_major(v_pool)) is None
    small = random_case(random.Random(52), 2, 8, 2, 64)  # 4-token pages
    assert tma.page_descriptors(small[1], small[2]) is None


def test_only_wide_row_tiles_prefetch_ahead(monkeypatch):
    """Programs of row tiles of AHEAD_ROWS rows or more prefetch PREFETCH_AHEAD tiles ahead (as set),
    narrower ones none (it slowed them), and none under the interpreter."""
    from hogwild_kernels import backends

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tri = backends.TritonAttention(torch.ones(4), 1.0, 1.0)
    assert tri.tiles_ahead(backends.AHEAD_ROWS) == tri.tiles_ahead(128) == backends.PREFETCH_AHEAD == 1
    assert tri.tiles_ahead(backends.AHEAD_ROWS // 2) == 0
    tri.prefetch_ahead = 2
    assert tri.tiles_ahead(128) == 2
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.TritonAttention(torch.ones(4), 1.0, 1.0).tiles_ahead(128) == 0


def test_long_units_in_longer_tiles_give_the_same_output():
    """Units of at least `long_unit` keys read in tiles of `long_block_n` keys (longer than the
    plan's chunk rounding: the tail runs masked): the same attention as the reference."""
    q, k_pool, v_pool, groups = random_case(random.Random(31), 2, 8, 2, 64, shared=3)
    groups = to_device(groups)
    ref, tri = backends(64, chunk=16)
    tri.long_block_n, tri.long_unit = 32, 16
    s = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    meta = tri.prepare(groups, s, s)
    assert meta.extra[0].chunk == 16 and tri.long_keys(16) and not tri.long_keys(15)
    torch.testing.assert_close(tri.attend(q, k_pool, v_pool, meta), reference(ref, q, k_pool, v_pool, groups),
                               atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("seed,dtype", [(41, torch.float32), (42, torch.float16), (43, torch.float32)])
def test_pages_looked_up_a_tile_ahead_give_the_same_output(seed, dtype):
    """pages_ahead: the tiles every row sees whole take their pages from a lookup one tile
    ahead (the first before the loop; the lookup past the unmasked tiles reads nothing): bit
    for bit the kernel that looks each tile's pages up with it, over chunks with masked tails,
    and the reference's attention. On the GPU with three stages or more this is what lets the
    compiler keep the next tile's copies in flight (tests/test_gpu_compile.py)."""
    q, k_pool, v_pool, groups = random_case(random.Random(seed), 4, 8, 2, 64, page_size=4, shared=3, dtype=dtype,
                                            max_chunk=4)
    groups = to_device(groups)
    ref, plain = backends(64, chunk=32)
    ahead = TritonAttention(ref.inv_freq, 1.0, 64**-0.5, chunk=32, pages_ahead=True)
    s = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    got = ahead.attend(q, k_pool, v_pool, ahead.prepare(groups, s, s))
    assert torch.equal(got, plain.attend(q, k_pool, v_pool, plain.prepare(groups, s, s)))
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), reference(ref, q.float(), k_pool.float(), v_pool.float(), groups), **tol)


@pytest.mark.parametrize("seed", [44, 45])
def test_the_programs_start_order_leaves_the_output_alone(seed):
    """heads_first (a unit's KV heads one after another on the grid's first axis) and the
    order before it (a head's units, the heads on the second axis), with the plan's units
    longest first or item by item, compute the same programs: the same output, bit for bit,
    and every head's and unit's partials (the reference's attention)."""
    q, k_pool, v_pool, groups = random_case(random.Random(seed), 4, 8, 4, 64, page_size=4, shared=3,
                                            dtype=torch.float32, max_chunk=4)
    groups = to_device(groups)
    ref, _ = backends(64, chunk=16)
    orders = [TritonAttention(ref.inv_freq, 1.0, 64**-0.5, chunk=16, kv_heads=4, heads_first=first,
                              longest_first=longest) for first in (True, False) for longest in (True, False)]
    s = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    metas = [impl.prepare(groups, s, s) for impl in orders]
    lengths = [(m.extra[0].unit_kend - m.extra[0].unit_kstart).tolist() for m in metas]
    for a, n, _ in metas[0].extra[0].classes:  # longest first within each class of readers
        assert lengths[0][a:a + n] == sorted(lengths[0][a:a + n], reverse=True)
    assert lengths[1] != lengths[0]  # the order moved
    first, *others = (impl.attend(q, k_pool, v_pool, m) for impl, m in zip(orders, metas))
    for other in others:
        assert torch.equal(first, other)
    torch.testing.assert_close(first, reference(ref, q, k_pool, v_pool, groups), atol=2e-4, rtol=2e-4)

def test_single_token_views_and_decode():
    """Every worker's view is just its own one token (empty shared blocks)."""
    q_heads, kv_heads, d = 4, 2, 64
    k_pool = torch.randn(8, 4, kv_heads, d, device=DEVICE)
    v_pool = torch.randn(8, 4, kv_heads, d, device=DEVICE)
    groups = [QueryGroup(w, 1, 0, [Segment(torch.tensor([w], device=DEVICE), 1, 0, block=w)]) for w in range(3)]
    q = torch.randn(3, q_heads, d, device=DEVICE)
    ref, tri = backends(d)
    s = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    want = reference(ref, q, k_pool, v_pool, groups)
    got = tri.attend(q, k_pool, v_pool, tri.prepare(groups, s, s))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    # with one visible value the output is that value
    torch.testing.assert_close(got[0], v_pool[0, 0].repeat_interleave(2, 0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads,head_dim", [(2, 64), (1, 128)])
def test_kv_append_matches_reference(kv_heads, head_dim):
    ref, tri = backends(head_dim, rope_scale=1.2)
    t = 7
    k = torch.randn(t, kv_heads, head_dim, device=DEVICE)
    v = torch.randn(t, kv_heads, head_dim, device=DEVICE)
    slots = torch.tensor([3, 4, 5, 17, 30, 31, 2], device=DEVICE)
    pos = torch.tensor([0, 1, 2, 9, 40, 41, 1000], device=DEVICE)
    pools = [torch.zeros(10, 4, kv_heads, head_dim, device=DEVICE) for _ in range(4)]
    pools += [head_major(p) for p in pools]
    ref.append(pools[0], pools[1], k, v, ref.prepare([], slots, pos))
    tri.append(pools[2], pools[3], k, v, tri.prepare([], slots, pos))
    torch.testing.assert_close(pools[2], pools[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pools[3], pools[1])
    # pages laid out head-major: the same values land in the same logical places
    ref.append(pools[4], pools[5], k, v, ref.prepare([], slots, pos))
    tri.append(pools[6], pools[7], k, v, tri.prepare([], slots, pos))
    assert torch.equal(pools[4], pools[0]) and torch.equal(pools[5], pools[1])
    assert torch.equal(pools[6], pools[2]) and torch.equal(pools[7], pools[3])
    if kv_heads > 1:  # (one head: both layouts are one memory order)
        with pytest.raises(ValueError, match="one memory layout"):
            tri.append(pools[2], pools[7], k, v, tri.prepare([], slots, pos))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(8, 2, 64), (3, 1, 128), (6, 3, 48)])
def test_qk_norms_folded_into_the_append(dtype, q_heads, kv_heads, head_dim):
    """Qwen3's q/k norms and the K/V append in one launch: the q it returns equals qk_rms_norm's
    bit for bit, and the pools it writes what qk_rms_norm then the append write (bit for bit
    under the interpreter; on a GPU the rotation may round its products differently, an ulp of
    fp32), and the keys the reference's."""
    from hogwild_kernels.fused import qk_rms_norm

    ref, tri = backends(head_dim, rope_scale=1.2)
    g = torch.Generator().manual_seed(q_heads * head_dim)
    t = 5
    qkv = (3 * torch.randn(t, (q_heads + 2 * kv_heads) * head_dim, generator=g)).to(DEVICE, dtype)
    q_w, k_w = ((1 + 0.2 * torch.randn(head_dim, generator=g)).to(DEVICE, dtype) for _ in range(2))
    slots = torch.tensor([3, 4, 5, 17, 30], device=DEVICE)
    pos = torch.tensor([0, 1, 2, 9, 40], device=DEVICE)
    pools = [torch.full((10, 4, kv_heads, head_dim), float("nan"), device=DEVICE, dtype=dtype) for _ in range(6)]
    q_sep, k_sep = qk_rms_norm(qkv, q_w, k_w, q_heads, kv_heads, head_dim, 1e-6)
    v = qkv[:, (q_heads + kv_heads) * head_dim:].view(t, kv_heads, head_dim)
    tri.append(pools[0], pools[1], k_sep, v, tri.prepare([], slots, pos))
    q = tri.append_normed(pools[2], pools[3], qkv, q_w, k_w, 1e-6, q_heads, tri.prepare([], slots, pos))
    assert q.shape == (t, q_heads, head_dim) and torch.equal(q, q_sep)
    assert torch.equal(pools[3].nan_to_num(7.0), pools[1].nan_to_num(7.0))  # the values, copied
    if DEVICE.type == "cpu":
        assert torch.equal(pools[2].nan_to_num(7.0), pools[0].nan_to_num(7.0))
    else:
        ulp = dict(atol=1e-5, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
        torch.testing.assert_close(pools[2].nan_to_num(7.0), pools[0].nan_to_num(7.0), **ulp)
    assert not pools[2][slots // 4, slots % 4].isnan().any()  # every new key written
    ref.append(pools[4], pools[5], k_sep, v, ref.prepare([], slots, pos))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(pools[2].nan_to_num(7.0), pools[4].nan_to_num(7.0), **tol)
    with pytest.raises(ValueError, match="QKV rows"):
        tri.append_normed(pools[2], pools[3], qkv[:, 1:], q_w, k_w, 1e-6, q_heads, tri.prepare([], slots, pos))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 kernels are checked on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("workers,q_heads,kv_heads,head_dim", [(8, 32, 8, 128), (16, 40, 8, 128), (4, 9, 3, 64)])
def test_half_precision_on_gpu(dtype, workers, q_heads, kv_heads, head_dim):
    q, k_pool, v_pool, groups = random_case(random.Random(7), workers, q_heads, kv_heads, head_dim, dtype=dtype,
                                            max_chunk=6)
    groups = to_device(groups)
    ref, _ = backends(head_dim)
    tri = TritonAttention(ref.inv_freq, 1.0, head_dim**-0.5, kv_heads=kv_heads)
    s = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    want = reference(ref, q.float(), k_pool.float(), v_pool.float(), groups)
    got = tri.attend(q, k_pool, v_pool, tri.prepare(groups, s, s)).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    got_hm = tri.attend(q, head_major(k_pool), head_major(v_pool), tri.prepare(groups, s, s)).float()
    assert torch.equal(got_hm, got)
    # the merge launched as a programmatic dependent (Hopper) waits for every partial
    plain = TritonAttention(ref.inv_freq, 1.0, head_dim**-0.5, kv_heads=kv_heads, pdl=False)
    assert torch.equal(plain.attend(q, k_pool, v_pool, plain.prepare(groups, s, s)).float(), got)
    from hogwild_kernels import pdl

    if pdl.supported(DEVICE):  # chained: each unit's first keys prefetched into L2 before the wait
        chained = TritonAttention(ref.inv_freq, 1.0, head_dim**-0.5, kv_heads=kv_heads)
        chained.chained = True
        assert torch.equal(chained.attend(q, k_pool, v_pool, chained.prepare(groups, s, s)).float(), got)
        chained.prefetch_keys = 512  # whole units asked for before the wait: the same bits
        assert torch.equal(chained.attend(q, k_pool, v_pool, chained.prepare(groups, s, s)).float(), got)
    # no tile prefetched ahead (wide row tiles prefetch one by default), or two: the same bits
    for ahead in (0, 2):
        other = TritonAttention(ref.inv_freq, 1.0, head_dim**-0.5, kv_heads=kv_heads, prefetch_ahead=ahead)
        assert torch.equal(other.attend(q, k_pool, v_pool, other.prepare(groups, s, s)).float(), got), ahead


@pytest.mark.parametrize("workers,q_heads,kv_heads,head_dim,seed", [(3, 8, 2, 64, 11), (5, 10, 2, 32, 12)])
def test_engine_torch_path_matches_reference(workers, q_heads, kv_heads, head_dim, seed):
    """The engine's vectorized CPU path (keys moved by block offset) equals the per-block reference."""
    q, k_pool, v_pool, groups = random_case(random.Random(seed), workers, q_heads, kv_heads, head_dim)
    groups = to_device(groups)
    ref, _ = backends(head_dim, rope_scale=1.25)
    s = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    want = concurrent_attention_reference(q, k_pool, v_pool, groups, ref.inv_freq, 1.25, head_dim**-0.5)
    got = ref.attend(q, k_pool, v_pool, ref.prepare(groups, s, s))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def long_case(workers: int, view: int, q_heads: int, kv_heads: int, head_dim: int, dtype, chunk: int = 1,
              page_size: int = 16, seed: int = 0):
    """Full-size combined layout on the GPU: a long `common`, two headers, every worker's block
    (the lag on others', causal own chunk), pages scattered over the pool, last pages partial."""
    rng = random.Random(seed)
    own = [rng.randint(chunk, 300) for _ in range(workers)]
    lengths = [max(1, view - sum(own) - 26), 12, 14, *own]
    need = [-(-n // page_size) for n in lengths]
    perm = list(range(sum(need)))
    rng.shuffle(perm)
    blocks, at = [], 0
    for n, p in zip(lengths, need):
        blocks.append((torch.tensor(perm[at:at + p], device=DEVICE), n))
        at += p
    groups = []
    for w in range(workers):
        order = [0, 1] + [3 + o for o in range(workers) if o != w] + [2, 3 + w]
        segs, off = [], 0
        for b in order:
            pages, n = blocks[b]
            n = n - chunk if b >= 3 and b != 3 + w else n  # other workers' chunks are not visible yet
            segs.append(Segment(pages, n, off, block=b))
            off += n
        groups.append(QueryGroup(w * chunk, chunk, off - chunk, segs))
    k_pool = torch.randn(sum(need), page_size, kv_heads, head_dim, device=DEVICE).to(dtype)
    v_pool = torch.randn(sum(need), page_size, kv_heads, head_dim, device=DEVICE).to(dtype)
    q = (torch.randn(workers * chunk, q_heads, head_dim, device=DEVICE) * 2).to(dtype)  # peaky softmax
    return q, k_pool, v_pool, groups


@pytest.mark.skipif(not torch.cuda.is_available(), reason="full-size views are checked on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("workers,view,q_heads,kv_heads,head_dim,chunk", [
    (1, 16384, 32, 8, 128, 1), (8, 16384, 32, 8, 128, 1), (16, 32768, 40, 8, 128, 1),
    (4, 8192, 16, 16, 64, 3), (32, 4096, 64, 8, 128, 1), (3, 8192, 8, 1, 256, 2), (6, 4096, 28, 4, 128, 5),
])
def test_full_size_on_gpu(dtype, workers, view, q_heads, kv_heads, head_dim, chunk):
    """Default (auto-sized) kernel launches at real lengths; fp32 exact, halves within their rounding."""
    q, k_pool, v_pool, groups = long_case(workers, view, q_heads, kv_heads, head_dim, dtype, chunk)
    inv_freq = (1.0 / 1e6 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    tri = TritonAttention(inv_freq, 1.0, head_dim**-0.5, kv_heads=kv_heads)
    s = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    want = concurrent_attention_reference(q.float(), k_pool.float(), v_pool.float(), groups, inv_freq, 1.0,
                                          head_dim**-0.5)
    tol = 2e-4 if dtype == torch.float32 else 2e-2  # of the largest output: bf16 rounds at 2^-8
    tma = TritonAttention(inv_freq, 1.0, head_dim**-0.5, kv_heads=kv_heads, tma_pages=True)
    for impl in (tri, tma):  # and the pages every row sees whole read through tensor descriptors (TMA)
        got = impl.attend(q, k_pool, v_pool, impl.prepare(groups, s, s)).float()
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err <= tol, f"max error {err:.2e} of the largest output (tolerance {tol:g}), tma {impl.tma_pages}"


@pytest.mark.parametrize("workers,seed,layout_items,unit_pairs", [(1, 10, 4, None), (3, 11, 8, None),
                                                                  (6, 12, 16, None), (6, 13, 16, 8),
                                                                  (10, 14, 16, None)])
def test_static_plan_with_padding_matches_reference(workers, seed, layout_items, unit_pairs):
    """A CUDA graph's plan: fixed-size buffers (padding units without pairs, wider page
    tables, stale entries from an earlier pass; row tiles sized for at most `unit_pairs`
    readers of a unit; with 10 workers of 4 query heads per KV head, units read by 40 rows,
    made longer) give the same attention as the reference."""
    from hogwild_kernels.plan import PlanCaps, StaticPlan, build_plan

    rng = random.Random(seed)
    ref, tri = backends(64, chunk=None)
    tri.block_n, tri.q_per_kv = 16, 4  # the cases' 8 query heads over 2 KV heads
    caps = PlanCaps(tokens=workers, items=layout_items, pages=40, units=tri.target_units(DEVICE) + layout_items,
                    unit_pairs=unit_pairs)
    static = StaticPlan(caps, DEVICE)
    assert static.plan.max_pairs == min(workers, unit_pairs or workers)
    for _ in range(2):  # the second pass overwrites the first one's buffers
        q, k_pool, v_pool, groups = random_case(rng, workers, 8, 2, 64, max_chunk=1)
        groups = to_device(groups)
        host = build_plan(groups, workers, tri.chunk_rule(DEVICE, capped=False))
        assert static.fits(host) and len(host["unit_item"]) <= caps.units
        static.load(host)
        slots = torch.zeros(workers, dtype=torch.int64, device=DEVICE)
        got = tri.attend(q, k_pool, v_pool, tri.prepare(groups, slots, slots, plan=static.plan))
        torch.testing.assert_close(got, reference(ref, q, k_pool, v_pool, groups), atol=2e-4, rtol=2e-4)


def test_units_read_by_many_rows_are_made_longer():
    """Keys per unit: enough units for every SM, but a unit that 40 or more query rows read
    (readers x query heads per KV head) gets up to WIDE_KEYS keys, at most half the SMs' count
    of units; long units, and fewer rows, are left as they are; off with wide_units=False."""
    from hogwild_kernels.backends import WIDE_KEYS, TritonAttention

    tri = TritonAttention(torch.ones(4), 1.0, 1.0, kv_heads=1, q_per_kv=4, block_n=16, short_programs_per_sm=2,
                          batched_programs_per_sm=2)
    rule = tri.chunk_rule(torch.device("cpu"))
    assert tri.target_units(torch.device("cpu")) == 16
    assert rule(1024) == rule(1024, 9) == 64  # 36 rows: 16 units of 64 keys
    assert rule(1024, 10) == rule(1024, 40) == 128  # 40 rows and more: 8 units of 128
    assert rule(3000, 16) == WIDE_KEYS == 256  # not past WIDE_KEYS
    assert rule(8192, 16) == rule(8192) == 512  # long units stay as they are
    tri.wide_units = False
    assert tri.chunk_rule(torch.device("cpu"))(1024, 40) == 64


def test_passes_of_short_units_are_cut_for_more_programs_an_sm():
    """Where units would be at most SHORT_KEYS keys long with two programs an SM per KV head, the
    pass is cut for three (8 SMs off CUDA: 24 units rather than 16); longer ones keep two, and so
    do units wide rows read (the wide-row rule halves two's count: in the decode pass three took
    1.02x with 16 workers at 4k); a pass never has more units than target_units (what a graph
    allots, but for one more per block); short_programs_per_sm=2 is the old rule."""
    from hogwild_kernels.backends import SHORT_KEYS, TritonAttention

    tri = TritonAttention(torch.ones(4), 1.0, 1.0, kv_heads=1, block_n=16, batched_programs_per_sm=2)
    cpu = torch.device("cpu")
    rule = tri.chunk_rule(cpu)
    assert tri.target_units(cpu) == 24 and tri.units_for(cpu, 2) == 16
    assert rule(16 * SHORT_KEYS) == 352  # 512 keys a unit at 16 units: 24 units of 342, rounded to 352
    assert rule(16 * SHORT_KEYS + 16) == 528  # 513 at 16 units: long enough, 16 units
    assert rule(16384) == 1024
    assert rule(1024, 39) == 48  # 39 rows: 24 units, 43 keys rounded to 48
    assert rule(1024, 40) == 128  # 40 rows: half of two programs' 16 units
    uncapped = tri.chunk_rule(cpu, capped=False)
    for total in range(1, 40000, 37):
        assert max(-(-total // uncapped(total, readers)) for readers in (1, 40)) <= tri.target_units(cpu)
    tri.short_programs_per_sm = 2
    assert tri.chunk_rule(cpu)(16 * SHORT_KEYS) == SHORT_KEYS and tri.target_units(cpu) == 16


def test_passes_of_several_sessions_are_cut_for_four_programs_an_sm():
    """A pass whose blocks are each read by only some of its query tokens (several sessions) and
    whose units would be longer than SHORT_KEYS is cut for four programs an SM (8 SMs off CUDA:
    32 units rather than 16); short units keep the short rule's three, wide rows the wide rule,
    one session (a block every token reads) two; a graph allots the most of them."""
    from hogwild_kernels.backends import BATCHED_PROGRAMS_PER_SM, SHORT_KEYS, TritonAttention

    tri = TritonAttention(torch.ones(4), 1.0, 1.0, kv_heads=1, q_per_kv=4, block_n=16)
    cpu = torch.device("cpu")
    assert BATCHED_PROGRAMS_PER_SM == 4 and tri.target_units(cpu) == 32
    rule = tri.chunk_rule(cpu)
    assert rule(16384, 4, 128) == 512 and rule(16384, 4, 4) == rule(16384) == 1024  # 32 x 4 workers: 32 units
    assert rule(16 * SHORT_KEYS, 4, 128) == 352  # short units: three programs an SM (24 units)
    assert rule(16384, 10, 40) == 1024  # 40 rows: the wide rule's units, as one session's
    assert tri.target_units(cpu, batched=False) == 24  # one session's graphs allot no more than before
    uncapped = tri.chunk_rule(cpu, capped=False)
    for total in range(1, 40000, 37):
        assert -(-total // uncapped(total, 2, 8)) <= tri.target_units(cpu, batched=True)
        assert max(-(-total // uncapped(total, 2, 2)), -(-total // uncapped(total))) <= tri.target_units(cpu, False)
    tri.batched_programs_per_sm = 2
    assert tri.chunk_rule(cpu)(16384, 4, 128) == 1024 and tri.target_units(cpu) == 24


def test_a_batched_plan_hands_the_chunk_rule_its_query_tokens():
    """build_plan gives the chunk rule the pass's query tokens besides the most readers of one
    block (four sessions of two workers over their own prompts: 8 tokens, 2 readers at most) and
    says whether the pass is batched (what a captured graph allots units for)."""
    from hogwild_kernels.plan import build_plan

    seen = []
    groups = [QueryGroup(2 * s + w, 1, 40, [Segment(torch.arange(3), 40, 0, block=("prompt", s))])
              for s in range(4) for w in range(2)]
    host = build_plan(groups, 16, lambda total, readers, tokens: seen.append((total, readers, tokens)) or 16)
    assert seen == [(4 * 40, 2, 8)] and host["batched"]  # 16: the padded pass; 8 query tokens in its groups
    one = [QueryGroup(w, 1, 40, [Segment(torch.arange(3), 40, 0, block="prompt")]) for w in range(2)]
    assert not build_plan(one, 16, 16)["batched"]  # a block both tokens read: one session


@pytest.mark.parametrize("seed", [21, 22])
def test_static_plan_of_a_pass_with_chunks_matches_reference(seed):
    """A graphed pass where some workers feed several tokens (a header, an injection): the
    fixed-size plan, sized for the pass's tokens, gives the reference's attention, causal
    inside each chunk; a second pass of the same shape overwrites the first one's buffers."""
    from hogwild_kernels.plan import PlanCaps, StaticPlan, build_plan

    rng = random.Random(seed)
    ref, tri = backends(64, chunk=None)
    tri.block_n = 16
    cases = []
    while len(cases) < 2:  # two passes of one shape (tokens), as one graph replays them
        case = random_case(rng, 4, 8, 2, 64, max_chunk=4)
        if case[0].shape[0] == 9 and any(g.count > 1 for g in case[3]):
            cases.append(case)
    static = StaticPlan(PlanCaps(tokens=9, items=16, pages=60, units=tri.target_units(DEVICE) + 16), DEVICE)
    for q, k_pool, v_pool, groups in cases:
        groups = to_device(groups)
        host = build_plan(groups, 9, tri.chunk_rule(DEVICE, capped=False))
        assert static.fits(host)
        static.load(host)
        slots = torch.zeros(9, dtype=torch.int64, device=DEVICE)
        got = tri.attend(q, k_pool, v_pool, tri.prepare(groups, slots, slots, plan=static.plan))
        torch.testing.assert_close(got, reference(ref, q, k_pool, v_pool, groups), atol=2e-4, rtol=2e-4)


def test_static_plan_of_several_sessions_with_narrow_row_tiles_matches_reference():
    """Two sessions of 3 workers in one pass: no unit has more than 3 readers, so a graph's
    plan sized for 4 per unit (not all 6 tokens) computes narrower tiles; the same attention.
    A pass with a unit read by more than that does not fit it."""
    from hogwild_kernels.plan import PlanCaps, StaticPlan, build_plan

    rng = random.Random(14)
    ref, tri = backends(64, chunk=None)
    tri.block_n = 16
    (q1, k1, v1, g1), (q2, k2, v2, g2) = (random_case(rng, 3, 8, 2, 64, max_chunk=1) for _ in range(2))
    for g in g2:  # the second session: its own pages, rows and block ids
        g.start += q1.shape[0]
        for s in g.segments:
            s.pages, s.block = s.pages + k1.shape[0], s.block + 1000
    q, k_pool, v_pool = torch.cat([q1, q2]), torch.cat([k1, k2]), torch.cat([v1, v2])
    groups = to_device(g1 + g2)
    host = build_plan(groups, 6, tri.chunk_rule(DEVICE, capped=False))
    assert host["max_pairs"] <= 3
    static = StaticPlan(PlanCaps(tokens=6, items=16, pages=40, units=tri.target_units(DEVICE) + 16, unit_pairs=4),
                        DEVICE)
    assert static.fits(host) and static.plan.max_pairs == 4
    static.load(host)
    slots = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    got = tri.attend(q, k_pool, v_pool, tri.prepare(groups, slots, slots, plan=static.plan))
    torch.testing.assert_close(got, reference(ref, q, k_pool, v_pool, groups), atol=2e-4, rtol=2e-4)
    one = StaticPlan(PlanCaps(tokens=6, items=16, pages=40, units=tri.target_units(DEVICE) + 16, unit_pairs=2),
                     DEVICE)
    assert not one.fits(host)


def test_plan_starts_every_sessions_long_units_first():
    """In a pass of many sessions (each a long prompt and its workers' short steps) the units
    come longest first, so no session's prompt waits behind the others' short units; the
    units are those of the plan in item order, each with the same run of pairs, and the
    pairs and partial rows do not move."""
    from hogwild_kernels.plan import build_plan

    groups, start = [], 0
    for session in range(5):
        prompt = (Segment(torch.arange(10), 37 + 3 * session, 0, block=("prompt", session)),)
        for w in range(3):
            steps = tuple(Segment(torch.arange(2) + 4 * o, 5 + o, 37 + 3 * session + 8 * o, block=(session, o))
                          for o in range(3))
            groups.append(QueryGroup(start, 1, 37 + 3 * session + 24 + w, [*prompt, *steps]))
            start += 1
    ordered, blocks = (build_plan(groups, start, chunk=16, longest_first=first) for first in (True, False))
    length = ordered["unit_kend"] - ordered["unit_kstart"]
    assert length.tolist() == sorted(length.tolist(), reverse=True)
    assert (length[:11] == 16).all() and length[11] < 16  # every prompt's whole chunks (37-49 keys: 11) first
    item_order = (blocks["unit_kend"] - blocks["unit_kstart"]).tolist()
    assert item_order.index(5) < max(i for i, n in enumerate(item_order) if n == 16)  # short units in the way
    units = lambda plan: sorted(  # noqa: E731
        (int(i), int(a), int(b), tuple(plan["pair_tok"][p:p + n]), tuple(plan["pair_limit"][p:p + n]))
        for i, a, b, p, n in zip(plan["unit_item"], plan["unit_kstart"], plan["unit_kend"], plan["unit_pair"],
                                 plan["unit_npairs"]))
    assert units(ordered) == units(blocks)
    for field in ("pair_tok", "pair_delta", "pair_limit", "pair_part", "tok_start", "tables"):
        assert (ordered[field] == blocks[field]).all()


def test_plan_reads_each_block_once_per_chunk():
    """Units cover each block's keys once; each token's partials cover what it sees, once."""
    from hogwild_kernels.plan import build_plan

    rng = random.Random(5)
    _, _, _, groups = random_case(rng, 4, 4, 1, 64, max_chunk=3)
    tokens = sum(g.count for g in groups)
    plan = build_plan(groups, tokens, chunk=8)
    seen: dict[int, int] = {}
    for u, (item, ks, ke, p0, n) in enumerate(zip(plan["unit_item"], plan["unit_kstart"], plan["unit_kend"],
                                                  plan["unit_pair"], plan["unit_npairs"])):
        assert ke - ks <= 8 and n >= 1
        for p in range(p0, p0 + n):
            assert plan["pair_limit"][p] > ks  # a pair is listed only where it sees keys
            seen[int(plan["pair_tok"][p])] = seen.get(int(plan["pair_tok"][p]), 0) + min(ke, plan["pair_limit"][p]) - ks
    for g in groups:
        for i in range(g.count):
            visible = sum(max(0, min(s.length, g.position + i - s.offset + 1)) for s in g.segments)
            assert seen.get(g.start + i, 0) == visible
    starts = plan["tok_start"]
    assert sorted(plan["pair_part"].tolist()) == list(range(len(plan["pair_tok"])))  # a row each
    for t in range(tokens):  # token t's partial rows are [start, next start)
        rows = plan["pair_part"][plan["pair_tok"] == t]
        assert sorted(rows.tolist()) == list(range(starts[t], starts[t + 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_and_activation_match_torch(dtype):
    """The decoder's fused kernels against the unfused torch ops they replace."""
    import torch.nn.functional as F
    from hogwild_kernels.fused import add_rms_norm, silu_mul

    from hogwild_ray.model.decoder import rms_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g).to(dtype).to(DEVICE)
    delta = torch.randn(5, 96, generator=g).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype).to(DEVICE)
    total, h = add_rms_norm(x, delta, w, 1e-6)
    want_total = x + delta
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(total, want_total, **tol)
    torch.testing.assert_close(h, rms_norm(want_total, w, 1e-6), **tol)
    qkv = torch.randn(5, 3 * 4 * 32, generator=g).to(dtype).to(DEVICE)
    q = qkv[:, : 4 * 32].view(5, 4, 32)  # strided rows, as sliced from a fused QKV
    wq = w[:32].contiguous()
    same, hq = add_rms_norm(q, None, wq, 1e-6)
    assert same is q
    torch.testing.assert_close(hq, rms_norm(q, wq, 1e-6), **tol)
    # q and k heads in one launch, each with its own weight: the two separate calls, bit for bit
    from hogwild_kernels.fused import qk_rms_norm

    k = qkv[:, 4 * 32: 6 * 32].view(5, 2, 32)
    wk = (1 + 0.1 * torch.randn(32, generator=g)).to(dtype).to(DEVICE)
    q_normed, k_normed = qk_rms_norm(qkv, wq, wk, 4, 2, 32, 1e-6)
    assert torch.equal(q_normed, hq) and torch.equal(k_normed, add_rms_norm(k, None, wk, 1e-6)[1])
    gu = torch.randn(3, 2 * 1500, generator=g).to(dtype).to(DEVICE)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gu), F.silu(gate) * up, **tol)


SKINNY_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])  # the interpreter lacks bf16 dots


@pytest.mark.parametrize("dtype", SKINNY_DTYPES)
@pytest.mark.parametrize("rows,n,k,bias,config", [
    (1, 48, 512, False, (16, 256, 4, 2)),  # one worker, whole K blocks
    (5, 40, 768, True, (16, 512, 4, 2)),  # a ragged last strip and a ragged last K block, with a bias
    (16, 64, 256, False, (32, 256, 4, 3)),  # a full tile of rows
    (40, 80, 192, True, (32, 64, 4, 2)),  # several sessions' rows: a wide row tile (64), ragged strips and K
    (128, 128, 128, False, (64, 64, 4, 2)),  # the widest row tile, full
])
def test_skinny_products_match_an_fp32_product(dtype, rows, n, k, bias, config):
    """The decode products' kernel: every output element written, within half-precision rounding
    of the fp32 product (one rounding of an fp32 sum, as cuBLAS)."""
    from hogwild_kernels.skinny import WIDE_ROWS, skinny_linear, supported

    g = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    assert supported(x, w)
    got = skinny_linear(x, w, b, config=config)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (rows, n) and got.dtype == dtype and torch.isfinite(got).all()
    assert ((got.float() - ref).norm() / ref.norm()).item() < 4e-3
    from hogwild_kernels import pdl

    if pdl.supported(DEVICE):  # chained (a programmatic dependent, weights prefetched): the same bits
        assert torch.equal(skinny_linear(x, w, b, config=config, chained=True), got)
        # whole rows prefetched, or one line
        assert torch.equal(skinny_linear(x, w, b, config=config, chained=True, prefetch=1 << 16), got)
        assert torch.equal(skinny_linear(x, w, b, config=config, chained=True, prefetch=128), got)
        # the next product's weight asked for as the programs end (more rows than programs, or fewer)
        for following in (torch.randn(7 * n + 3, 3 * k).to(DEVICE, dtype), w[:3]):
            for nbytes in (128, 2048, 1 << 16):
                assert torch.equal(skinny_linear(x, w, b, config=config, chained=True, next_weight=following,
                                                 next_bytes=nbytes), got)
    with pytest.raises(ValueError, match="count of bytes"):
        skinny_linear(x, w, b, config=config, prefetch=-1)
    with pytest.raises(ValueError, match="count of bytes"):
        skinny_linear(x, w, b, config=config, next_weight=w, next_bytes=-1)
    wide = torch.randn(rows, 2 * k).to(DEVICE, dtype)
    assert not supported(wide, w)
    with pytest.raises(ValueError, match="rows of width"):
        skinny_linear(wide, w)
    tall = torch.zeros(WIDE_ROWS + 1, k).to(DEVICE, dtype)  # past the widest row tile: refused, not half-written
    assert not supported(tall, w)
    with pytest.raises(ValueError, match=f"1 to {WIDE_ROWS} rows, got {WIDE_ROWS + 1}"):
        skinny_linear(tall, w)
    from hogwild_kernels.fused import silu_mul

    # the gate/up product takes the activation in its epilogue: silu_mul of the product, bit for bit
    glu = skinny_linear(x, w, b, config=config, glu=True)
    assert glu.shape == (rows, n // 2) and torch.equal(glu, silu_mul(got))
    if pdl.supported(DEVICE):
        assert torch.equal(skinny_linear(x, w, b, config=config, chained=True, glu=True), glu)
    with pytest.raises(ValueError, match="even row count"):
        skinny_linear(x, w[1:], glu=True)
    from hogwild_kernels.skinny import WIDE_ROWS

    assert not supported(torch.randn(WIDE_ROWS + 1, k).to(DEVICE, dtype), w)  # more rows than a wide tile: cuBLAS
    assert not supported(x.float(), w.float())  # fp32 stays exact on cuBLAS


@pytest.mark.parametrize("dtype", SKINNY_DTYPES)
@pytest.mark.parametrize("rows,n,k,delta,config", [
    (1, 48, 512, True, (16, 256, 4, 2)),  # one worker: the residual's new sum stored by the first program
    (3, 40, 768, True, (16, 512, 4, 2)),  # a ragged last strip and K block
    (4, 64, 256, False, (32, 256, 4, 3)),  # the first layer's norm: no delta, the residual is x itself
])
def test_a_product_takes_the_norm_before_it_in_its_loads(dtype, rows, n, k, delta, config):
    """skinny_norm_linear: the residual add + RMSNorm and the product in one launch, bit for bit
    what add_rms_norm then the product give (the residual's sum too)."""
    from hogwild_kernels.fused import add_rms_norm, silu_mul
    from hogwild_kernels.skinny import NORM_ROWS, normed_supported, skinny_linear, skinny_norm_linear

    g = torch.Generator().manual_seed(rows * n + k)
    x = (3 * torch.randn(rows, k, generator=g)).to(DEVICE, dtype)
    d = (3 * torch.randn(rows, k, generator=g)).to(DEVICE, dtype) if delta else None
    nw = (1 + 0.2 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    total, h = add_rms_norm(x, d, nw, 1e-6)
    want = skinny_linear(h, w, config=config)
    got, got_total = skinny_norm_linear(x, d, nw, 1e-6, w, config=config)
    assert torch.equal(got, want) and torch.equal(got_total, total)
    assert torch.equal(skinny_norm_linear(x, d, nw, 1e-6, w, config=config, glu=True)[0], silu_mul(want))
    assert (got_total is x) == (d is None)
    from hogwild_kernels import pdl

    if pdl.supported(DEVICE):
        assert torch.equal(skinny_norm_linear(x, d, nw, 1e-6, w, config=config, chained=True)[0], want)
    many = torch.randn(NORM_ROWS + 1, k).to(DEVICE, dtype)
    assert normed_supported(x, w) and not normed_supported(many, w)
    with pytest.raises(ValueError, match="at most"):
        skinny_norm_linear(many, None, nw, 1e-6, w)


def _triton_decoder_and_weight(seed: int):
    """A tiny engine's decoder (Triton attention, so its products may take the skinny kernel), a
    generator and a [64, 32] half-precision weight drawn from it."""
    import hogwild_ray as hw

    engine = hw.HogwildEngine.from_pretrained("random:tiny", DEVICE.type, "float32", cache_tokens=512,
                                              attention="triton")
    g = torch.Generator().manual_seed(seed)
    return engine.runner.decoder, g, (torch.randn(64, 32, generator=g) / 6).to(DEVICE, torch.float16)


@pytest.mark.parametrize("folds", [set(), {"activation"}])
def test_the_mlp_products_stay_on_the_skinny_kernel_with_or_without_the_activation_fold(folds):
    """The MLP's gate/up product on the skinny kernel (a decode pass's few half-precision rows):
    its activation from silu_mul after it, or, folded, in its epilogue; the same rows either way."""
    from hogwild_kernels import skinny
    from hogwild_kernels.fused import silu_mul

    decoder, g, w = _triton_decoder_and_weight(3)
    x = (2 * torch.randn(2, 32, generator=g)).to(DEVICE, torch.float16)
    config = (16, 32, 4, 2)
    decoder.products, decoder.folds = {(64, 32, 1): config}, folds
    calls = []
    real = skinny.skinny_linear

    def spy(x, weight, bias=None, config=None, chained=False, glu=False, prefetch=0, **_):
        calls.append((tuple(weight.shape), config, glu))
        return real(x, weight, bias, config=config, chained=chained, glu=glu, prefetch=prefetch)

    skinny.skinny_linear = spy
    try:
        got = decoder._linear(x, w, glu=True)
    finally:
        skinny.skinny_linear = real
    assert calls == [((64, 32), None, True) if folds else ((64, 32), config, False)]  # folded: the epilogue's shape
    assert torch.equal(got, silu_mul(real(x, w, config=config)))


def test_products_time_and_tile_rows_by_powers_of_two():
    """A pass's rows: timed as one row up to FEW_ROWS, else as its row tile (16, then the power
    of two above, up to WIDE_ROWS), so that a wide pass runs the launch shape timed for its tile."""
    from hogwild_kernels.skinny import BUCKETS, FEW_ROWS, MAX_ROWS, WIDE_CANDIDATES, WIDE_ROWS, bucket, pick, row_tile

    assert [row_tile(r) for r in (1, 16, 17, 32, 33, 64, 65, 128)] == [16, 16, 32, 32, 64, 64, 128, 128]
    assert [bucket(r) for r in (1, FEW_ROWS, FEW_ROWS + 1, 16, 17, 40, 100, WIDE_ROWS)] == [1, 1, 16, 16, 32, 64,
                                                                                            128, 128]
    assert {bucket(r) for r in range(1, WIDE_ROWS + 1)} == set(BUCKETS)
    assert pick(4096, 4096, rows=MAX_ROWS) == pick(4096, 4096) != pick(4096, 4096, rows=MAX_ROWS + 1)
    assert pick(4096, 4096, rows=128) == WIDE_CANDIDATES[0] and pick(4096, 4096, True, 128)[2:] == (8, 3)


def test_the_next_weight_is_shared_out_over_the_programs_whole_rows_each_once():
    """next_split gives each program an even share of the next weight's rows, asked for a power
    of two of rows at a time within NEXT_POINTERS lines; next_prefetch rounds the bytes down to
    a power of two of lines within a row, none for 0 or under a line."""
    from hogwild_kernels.skinny import NEXT_POINTERS, next_prefetch, next_split

    for rows, programs, lines in [(24576, 128, 16), (4096, 768, 4), (3, 128, 64), (6144, 1, 1), (1000, 7, 2048)]:
        per, at_once = next_split(rows, programs, lines)
        covered = sorted(r for p in range(programs) for r in range(p * per, min((p + 1) * per, rows)))
        assert covered == list(range(rows))  # every row by one program
        assert at_once & (at_once - 1) == 0 and 1 <= at_once <= per
        assert at_once * lines <= NEXT_POINTERS or at_once == 1
    w = torch.empty(100, 512, dtype=torch.float16)  # rows of 1 KB: 8 lines
    assert next_prefetch(w, 0, 4) == {} and next_prefetch(w, 127, 4) == {}
    got = next_prefetch(w, 3000, 4)
    assert (got["NEXT_LINES"], got["next_per"], got["next_n"], got["next_stride"]) == (8, 25, 100, 512)
    assert got["NEXT_ROWS"] == 16 and next_prefetch(w, 1 << 20, 4)["NEXT_LINES"] == 8  # the row's 8 lines at most
    with pytest.raises(ValueError, match="2-d weight"):
        next_prefetch(w.t(), 512, 4)


@pytest.mark.parametrize("folds", [set(), {"norm"}])
def test_each_product_of_a_pass_is_handed_the_next_products_weight(folds):
    """Decoder.next_bytes: each layer's QKV hands on its output projection, that the gate/up,
    that the down, and the down the next layer's QKV or, last, the LM head (which hands on
    none), with the norms folded into the products or not. The products are torch's here (the
    kernel's own bits with the next weight asked for are checked on a GPU above): what is
    checked is what each is handed."""
    import hogwild_ray as hw
    from hogwild_kernels import skinny
    from hogwild_ray.session import step_sessions

    engine = hw.HogwildEngine.from_pretrained("random:tiny", DEVICE.type, "float16", cache_tokens=512,
                                              attention="triton")
    decoder = engine.runner.decoder
    shapes = {tuple(w.shape) for lw in decoder.w.layers for w in (lw.w_qkv, lw.w_o, lw.w_gate_up, lw.w_down)}
    decoder.products = {(*nk, 1): skinny.pick(*nk) for nk in shapes | {tuple(decoder.w.lm_head.shape)}}
    decoder.folds, decoder.next_bytes = folds, 2048
    handed = []
    real_linear, real_normed = skinny.skinny_linear, skinny.skinny_norm_linear

    def product(x, weight, bias=None, config=None, chained=False, glu=False, prefetch=0, next_weight=None,
                next_bytes=0):
        handed.append((weight, next_weight, next_bytes))
        return torch.nn.functional.linear(x, weight, bias)

    def normed(x, delta, norm_weight, eps, weight, bias=None, config=None, chained=False, glu=False, prefetch=0,
               next_weight=None, next_bytes=0):
        from hogwild_kernels.fused import add_rms_norm

        total, h = add_rms_norm(x, delta, norm_weight, eps)
        return product(h, weight, bias, next_weight=next_weight, next_bytes=next_bytes), total

    skinny.skinny_linear, skinny.skinny_norm_linear = product, normed
    try:
        session = engine.start("Hello", 1, chat_template=False, max_tokens=4)
        step_sessions([session])
        step_sessions([session])
        session.close()
    finally:
        skinny.skinny_linear, skinny.skinny_norm_linear = real_linear, real_normed
    order = [w for lw in decoder.w.layers for w in (lw.w_qkv, lw.w_o, lw.w_gate_up, lw.w_down)] + [decoder.w.lm_head]
    following = {id(w): nxt for w, nxt in zip(order, order[1:] + [None])}
    assert [id(w) for w, _, _ in handed[-len(order):]] == [id(w) for w in order]  # a decode pass's products in full
    for w, nxt, nbytes in handed:  # (and prompt passes' LM heads)
        assert nxt is following[id(w)] and nbytes == 2048


@pytest.mark.parametrize("chained", [False, True])
def test_wide_passes_take_the_skinny_kernel_only_where_it_was_chosen(chained):
    """Passes of more than MAX_ROWS rows (several sessions) run a product on the skinny kernel
    only where a wide launch shape beat cuBLAS at start, chained or not; a few rows chained
    always join the chain."""
    from hogwild_kernels import skinny

    decoder, g, w = _triton_decoder_and_weight(4)
    wide = (2 * torch.randn(40, 32, generator=g)).to(DEVICE, torch.float16)
    few = wide[:3].contiguous()
    decoder.chained = chained  # the routing only: the launches below run unchained on any device
    calls = []
    real = skinny.skinny_linear

    def spy(x, weight, bias=None, config=None, chained=False, glu=False, prefetch=0, **_):
        calls.append((x.shape[0], config))
        return real(x, weight, bias, config=config, glu=glu, prefetch=prefetch)

    skinny.skinny_linear = spy
    try:
        decoder.products = {(64, 32, 1): None, (64, 32, 64): None}  # cuBLAS was as fast for both
        ref = torch.nn.functional.linear(wide, w)
        assert torch.equal(decoder._linear(wide, w), ref) and calls == []
        decoder._linear(few, w)
        assert calls == ([(3, None)] if chained else [])
        calls.clear()
        decoder.products = {(64, 32, 1): None, (64, 32, 64): (32, 32, 4, 2)}  # a wide tile won
        got = decoder._linear(wide, w)
        assert calls == [(40, (32, 32, 4, 2))]
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 4e-3
    finally:
        skinny.skinny_linear = real


def test_row_tiles_split_rows_just_past_a_power_of_two():
    from hogwild_kernels.backends import row_tiles

    assert row_tiles(80, 128) == (64, 16)  # 16 workers x 5 query heads (QwQ-32B)
    assert row_tiles(96, 128) == (64, 32)
    assert row_tiles(65, 128) == (64, 16) and row_tiles(160, 256) == (128, 32)
    # a power of two, more than one tile, nothing to save or a first tile under 64 rows: the one tile
    for rows, block_m in ((64, 64), (112, 128), (200, 128), (20, 32), (40, 64), (64, 128), (16, 16), (128, 128)):
        assert row_tiles(rows, block_m) == (block_m, 0)


@pytest.mark.parametrize("seed,workers,head_dim", [(1, 16, 32), (2, 19, 48)])
def test_two_row_tiles_match_the_reference(seed, workers, head_dim):
    """Rows just past a power of two (workers x 5 query heads a KV head) in two row tiles over
    each K/V tile: every row's output as the reference's, and as the one wide tile's (a different
    product shape: equal within rounding), through the masked tails, rows that read nothing and
    a half head dim padded to a power of two (48: 24 of 32)."""
    block_m = 128
    q, k_pool, v_pool, groups = random_case(random.Random(seed), workers, 10, 2, head_dim, page_size=4, shared=2,
                                            max_chunk=1)
    groups = to_device(groups)
    ref, _ = backends(head_dim, chunk=16)
    s = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
    outs = []
    for split in (True, False):
        tri = TritonAttention(ref.inv_freq, 1.0, head_dim**-0.5, chunk=16, kv_heads=2, split_rows=split)
        tri.block_m = block_m
        meta = tri.prepare(groups, s, s)
        [(_, _, max_pairs, tile)] = tri._launches(meta.extra[0], rep=5)
        assert max_pairs == workers and tile == block_m
        assert (tri.row_tiles(max_pairs * 5, tile)[1] > 0) == split
        outs.append(tri.attend(q, k_pool, v_pool, meta))
    torch.testing.assert_close(outs[0], reference(ref, q, k_pool, v_pool, groups), atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
