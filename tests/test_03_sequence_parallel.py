"""Stage 03 properties on pools of 1, 2, 3, 4 and 8 gloo ranks: sharded == single-process attention."""
import importlib

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import WORLD_SIZES
from rank_pool import RankError, get_pool

sp = importlib.import_module("03_sequence_parallel")
causal = importlib.import_module("02_causal_attention")

EXACT = 1e-12  # float64 on CPU: sharding only changes the summation order (ring merges by log-sum-exp)


def inputs(chunks, tokens, heads, head_dim, seed, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, chunks * tokens, heads, head_dim, dtype=torch.float64, generator=gen) for _ in range(3)]


def reference(q, k, v, chunks, tokens, use_cache, window_tokens):
    """One process, one masked pass: chunk c sees itself and (with a cache) the earlier chunks' tokens
    within the last window_tokens ending at its own end."""
    key = torch.arange(chunks * tokens)
    query_end = (key // tokens + 1) * tokens
    mask = key[None, :] < query_end[:, None]
    mask &= key[None, :] >= (query_end[:, None] - (window_tokens or 10**9) if use_cache else query_end[:, None] - tokens)
    out = causal.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
    return out.transpose(1, 2)


def run_sharded(ulysses, ring, chunks, tokens, heads, head_dim, seed, use_cache, window_tokens):
    """On each rank: its shard of every chunk through sp_attention; returns its output shards."""
    mesh = sp.SPMesh.get(ulysses, ring)
    q, k, v = inputs(chunks, tokens, heads, head_dim, seed)
    first, end = mesh.token_shard(tokens)
    cache = causal.KVCache(chunks * tokens, window_tokens) if use_cache else None
    outs = []
    for c in range(chunks):
        sl = slice(c * tokens + first, c * tokens + end)
        chunk = (c * tokens, (c + 1) * tokens)
        outs.append(sp.sp_attention(q[:, sl], k[:, sl], v[:, sl], mesh, chunk, cache))
        if cache is not None:
            sp.commit_chunk(cache, mesh, chunk)
    return outs


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@given(data=st.data(), chunks=st.integers(1, 3), heads=st.sampled_from([1, 2, 3, 4, 6, 8, 12]),
       head_dim=st.sampled_from([4, 8, 16]), use_cache=st.booleans(), seed=st.integers(0, 2**31))
def test_sharded_attention_equals_one_process(world_size, data, chunks, heads, head_dim, use_cache, seed):
    ulysses, ring = data.draw(st.sampled_from(sp.factorizations(world_size, heads)), label="mesh")
    tokens = data.draw(st.integers(1, 4 * world_size + 3), label="tokens per chunk")   # often uneven, sometimes < world
    window_tokens = data.draw(st.one_of(st.none(), st.integers(tokens, 3 * tokens)), label="window_tokens")
    per_rank = get_pool(world_size).run(run_sharded, ulysses, ring, chunks, tokens, heads, head_dim, seed,
                                        use_cache, window_tokens)
    got = torch.cat([torch.cat([outs[c] for outs in per_rank], dim=1) for c in range(chunks)], dim=1)
    want = reference(*inputs(chunks, tokens, heads, head_dim, seed), chunks, tokens, use_cache, window_tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=EXACT)


def test_shard_bounds_cover_the_sequence_contiguously():
    for length in range(0, 30):
        for parts in (1, 2, 3, 4, 8):
            bounds = sp.shard_bounds(length, parts)
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def gather_case(tokens):
    mesh = sp.SPMesh.get(ring_degree=1)
    x = torch.arange(tokens, dtype=torch.float64).view(1, tokens, 1)
    first, end = mesh.token_shard(tokens)
    return sp.gather_tokens(x[:, first:end], mesh, tokens)


@pytest.mark.parametrize("world_size", [3, 8])
def test_gather_tokens_restores_the_sequence(world_size):
    for got in get_pool(world_size).run(gather_case, 13):
        assert got.flatten().tolist() == list(range(13))


# ----------------------------------------------------------------------------- bad configurations

def bad_heads():
    mesh = sp.SPMesh.get(4, 1)
    q = torch.zeros(1, 2, 6, 8)
    sp.sp_attention(q, q, q, mesh, (0, 8))


def bad_mesh():
    sp.SPMesh(3, 1)


def disagreeing_mesh():
    rank = torch.distributed.get_rank()
    sp.SPMesh(2, 2) if rank == 0 else sp.SPMesh(4, 1)


def disagreeing_batch():
    mesh = sp.SPMesh.get(4, 1)
    q = torch.zeros(2 if mesh.rank == 0 else 1, 2, 4, 8)
    sp.sp_attention(q, q, q, mesh, (0, 8))


def one_rank_with_wrong_shard():
    mesh = sp.SPMesh.get(4, 1)
    q = torch.zeros(1, 3 if mesh.rank == 2 else 2, 4, 8)
    sp.sp_attention(q, q, q, mesh, (0, 8))


@pytest.mark.parametrize("case, message", [
    (bad_heads, r"rank 0: 6 heads do not split over a Ulysses degree of 4"),
    (bad_mesh, r"SPMesh: rank 0: ulysses 3 x ring 1 does not multiply to the world size 4"),
    (disagreeing_mesh, r"SPMesh: ranks disagree on ulysses_degree: \[2, 4, 4, 4\]"),
    (disagreeing_batch, r"ranks disagree on batch: \[2, 1, 1, 1\]"),
    (one_rank_with_wrong_shard, r"rank 2: holds 3 tokens but its shard of a 8-token chunk is 2"),
])
def test_bad_configuration_raises_the_same_error_on_every_rank(case, message):
    pool = get_pool(4)
    with pytest.raises(RankError) as info:
        pool.run(case)
    messages = info.value.messages
    assert sorted(messages) == [0, 1, 2, 3], "every rank must raise, not only the one with bad input"
    assert len(set(messages.values())) == 1, messages
    assert info.value.errors[0][0] == "BadInput"   # a ValueError that the stages report in one line
    import re
    assert re.search(message, messages[0]), messages[0]
    assert pool.alive and pool.run(gather_case, 5)  # nothing hung; the pool still works


@given(batch=st.integers(1, 3), heads=st.integers(1, 4), queries=st.integers(1, 40), run=st.integers(1, 30),
       parts=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_keys_split_into_runs_give_the_same_attention(batch, heads, queries, run, parts, seed):
    """split_key_attention (the GPU's batch of key runs, merged by log-sum-exp) == attention in one pass."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, 16, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(batch, heads, parts * run, 16, dtype=torch.float64, generator=gen) for _ in range(2))
    out = sp.split_key_attention(q, k, v, parts)
    assert (out - causal.attention(q, k, v)).abs().max() < EXACT


@given(tiles=st.integers(1, 2000), keys=st.integers(1, 40000), processors=st.integers(1, 200),
       most=st.integers(1, 8))
def test_key_parts_cut_equal_runs_and_fill_better(tiles, keys, processors, most):
    parts = sp.key_parts(tiles, keys, processors, most)
    waves = lambda p: -(-p * tiles // processors)                 # a partly filled wave costs a whole one
    assert 1 <= parts <= most and keys % parts == 0
    assert parts == 1 or (keys // parts >= 8 * 128 and parts / waves(parts) > 1 / waves(1))


def test_key_parts_at_the_dit_shapes():
    """12 heads x 37 tiles of a chunk's 4680 queries on an H200's 132 processors: two runs, 3.4 -> 6.7
    waves."""
    assert [sp.key_parts(12 * 37, 4680 * c, 132, 8) for c in (1, 4, 7)] == [2, 2, 2]
    assert sp.key_parts(12 * 37, 1000, 132, 8) == 1                     # runs too short to pay
    assert sp.key_parts(12 * 37, 32760, 132, 1) == 1
    assert sp.key_parts(132, 32768, 132, 8) == 1                        # one full wave: nothing to fill
    assert sp.key_parts(132 + 1, 32768, 132, 2) == 2                    # 2 waves, 1 tile in the last: 3 waves
