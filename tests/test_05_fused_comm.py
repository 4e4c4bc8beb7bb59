"""Stage 05 properties: fused == overlap == unfused SP attention layer == the layer on one process."""
import importlib

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import WORLD_SIZES
from rank_pool import RankError, get_pool

rope = importlib.import_module("01_rope")
sp = importlib.import_module("03_sequence_parallel")
fused = importlib.import_module("05_fused_comm")

EXACT = 1e-12  # float64 layer: sharding and fusion only reorder sums


def make_case(dim, heads, chunks, chunk_frames, height, width, seed):
    torch.manual_seed(seed)
    layer = fused.CausalSelfAttention(dim, heads).double()
    for p in layer.parameters():  # RMSNorm weights start at ones: make them matter
        torch.nn.init.normal_(p, std=0.5)
    table = rope.RopeTable(dim // heads, chunks * chunk_frames, height, width, dtype=torch.float64)
    x_chunks = [torch.randn(1, chunk_frames * height * width, dim, dtype=torch.float64) for _ in range(chunks)]
    return layer, table, x_chunks


def run_layer(mesh_shape, case, mode, use_cache):
    layer, table, x_chunks = make_case(*case)
    mesh = sp.SPMesh.get(*mesh_shape)
    with torch.no_grad():
        return fused.run_layer_chunks(fused.with_mode(layer, mode), x_chunks, mesh, table, case[3], use_cache)


def run_all_modes(mesh_shape, case, use_cache):
    return [run_layer(mesh_shape, case, mode, use_cache) for mode in fused.MODES]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@given(data=st.data(), heads=st.sampled_from([1, 2, 3, 4, 6, 12]), head_dim=st.sampled_from([6, 8, 12]),
       chunks=st.integers(1, 3), chunk_frames=st.integers(1, 3), height=st.integers(1, 3), width=st.integers(1, 4),
       use_cache=st.booleans(), seed=st.integers(0, 2**31))
def test_fused_equals_unfused_equals_one_process(world_size, data, heads, head_dim, chunks, chunk_frames, height,
                                                 width, use_cache, seed):
    mesh_shape = data.draw(st.sampled_from(sp.factorizations(world_size, heads)), label="mesh")
    case = (heads * head_dim, heads, chunks, chunk_frames, height, width, seed)
    layer, table, x_chunks = make_case(*case)
    with torch.no_grad():
        want = fused.run_layer_chunks(fused.with_mode(layer, "unfused"), x_chunks, sp.SPMesh(1, 1, local=True),
                                      table, chunk_frames, use_cache)
    per_rank = get_pool(world_size).run(run_all_modes, mesh_shape, case, use_cache)
    for m, mode in enumerate(fused.MODES):
        for c in range(chunks):
            got = torch.cat([modes[m][c] for modes in per_rank], dim=1)
            torch.testing.assert_close(got, want[c], rtol=0, atol=EXACT, msg=lambda e: f"{mode}, chunk {c}: {e}")


def test_pack_qkv_layout_is_one_block_per_destination():
    B, n, heads, D, U = 2, 5, 4, 6, 2
    q, k, v = (torch.randn(B, n, heads * D, dtype=torch.float64) for _ in range(3))
    cos, sin = torch.ones(n, D // 2, dtype=torch.float64), torch.zeros(n, D // 2, dtype=torch.float64)
    ones = torch.ones(heads * D, dtype=torch.float64)
    send = fused.pack_qkv(q, k, v, ones, ones, cos, sin, heads, U, 1e-6)
    assert send.shape == (U, n, 3, B, heads // U, D)
    # destination u gets heads u*H/U .. of every token; V passes through untouched
    torch.testing.assert_close(send[1, :, 2], v.view(B, n, heads, D)[:, :, 2:].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(send[0, :, 0], fused.rms_norm(q, ones, 1e-6).view(B, n, heads, D)[:, :, :2]
                               .transpose(0, 1), rtol=0, atol=0)


ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="as on a GPU, where the 1-GPU model runs it")


@pytest.mark.parametrize("pack", ["eager", pytest.param("compiled", marks=ON_GPU),
                                  pytest.param("one Triton pass", marks=ON_GPU)])
def test_pack_qkv_into_a_cache_slot_is_the_same_packing(pack):
    """With kv_out (one member), K/V land in the slot, exactly the one-buffer packing's, and nothing else is
    written; the buffer holds Q alone."""
    compiled = pack != "eager"
    device, dtype = ("cuda", torch.float32) if compiled else ("cpu", torch.float64)
    pack = {"eager": fused.pack_qkv, "compiled": torch.compile(fused.pack_qkv),
            "one Triton pass": fused.pack_qkv_rows}[pack]
    B, n, heads, D, held = 3, 5, 4, 6, 3                                  # B != 2: [n, B, 2] != [n, 2, B]
    q, k, v = (torch.randn(B, n, heads * D, dtype=dtype, device=device) for _ in range(3))
    angle = torch.rand(n, D // 2, dtype=dtype, device=device) * 6
    weight = torch.rand(heads * D, dtype=dtype, device=device) + 0.5
    args = (weight, weight.flip(0), angle.cos(), angle.sin(), heads, 1, 1e-6)
    whole = fused.pack_qkv(q, k, v, *args)                                 # [1, n, 3, B, H, D]
    tol = 1e-5 if compiled else 0                                          # compiled vs eager: rounding
    for offset in (0, held):                                               # slots at two places in a cache
        cache = torch.full((held + n + 2, 2, B, heads, D), float("nan"), dtype=dtype, device=device)
        send = pack(q, k, v, *args, kv_out=cache[offset:offset + n])
        assert send.shape == (1, n, 1, B, heads, D)
        torch.testing.assert_close(send[0, :, 0], whole[0, :, 0], rtol=tol, atol=tol)
        torch.testing.assert_close(cache[offset:offset + n], whole[0, :, 1:], rtol=tol, atol=tol)
        assert cache[:offset].isnan().all() and cache[offset + n:].isnan().all()


@ON_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pack_qkv_rows_in_one_pass_is_pack_qkv(dtype):
    """The Triton pass against pack_qkv run eagerly in the same dtype, with the same roundings: a few values
    apart, by a few of the dtype's last places of their pair's size (RoPE rotates pairs); V and the layout
    exact. Ulysses groups of 1-8 members, V sent apart (v None), q/k/v as views of one [B, n, 3 dim]
    projection (the FP8 layer's) or not, K/V into a slot inside a cache, odd head sizes."""
    gen = torch.Generator("cuda").manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)
    places = 8 if dtype == torch.float32 else 4         # float32: the sum's order, FMA, rsqrt's approximation
    for B, n, heads, D, U, with_v, rows in [
            (1, 4680, 12, 128, 1, True, "views"), (2, 37, 12, 128, 2, True, "apart"),
            (2, 5, 6, 8, 3, False, "q apart"), (3, 4, 4, 12, 4, True, "views"), (1, 7, 12, 16, 1, True, "k apart"),
            (2, 3, 8, 16, 8, True, "q apart")]:
        dim = heads * D
        qkv = (randn(B, n, 3 * dim) * torch.tensor([3.0, 0.2, 1.0], device="cuda").repeat_interleave(dim)).to(dtype)
        q, k, v = qkv.split(dim, -1)                                        # rows 3 dim apart
        q, k, v = {"views": (q, k, v), "apart": (q.contiguous(), k.contiguous(), v.contiguous()),
                   "q apart": (q.contiguous(), k, v), "k apart": (q, k.contiguous(), v)}[rows]
        v = v if with_v else None
        weights = [(1 + 0.3 * randn(dim)).to(dtype) for _ in range(2)]
        angle = torch.rand(n, D // 2, device="cuda", generator=gen) * 6
        args = (*weights, angle.cos(), angle.sin(), heads, U, 1e-6)
        got, want = fused.pack_qkv_rows(q, k, v, *args), fused.pack_qkv(q, k, v, *args)
        assert got.shape == want.shape and got.dtype == want.dtype
        pair = want.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*want.shape[:-1], -1, 2)
        assert ((got.float() - want.float()).abs() <= places * torch.finfo(dtype).eps * pair.flatten(-2)).all()
        if dtype != torch.float32:                    # a rounding flipped by the sum's order, here and there
            assert (got != want).float().mean() < 1e-2
        if with_v:
            assert torch.equal(got[:, :, 2], want[:, :, 2])
            cache = torch.full((n + 3, 2, B, heads, D), float("nan"), dtype=dtype, device="cuda")
            send = fused.pack_qkv_rows(q, k, v, *args, kv_out=cache[1:n + 1])   # K/V into a slot, Q alone
            assert torch.equal(send, got[:, :, :1])
            assert torch.equal(cache[1:n + 1], got[:, :, 1:].permute(1, 2, 3, 0, 4, 5).flatten(3, 4))
            assert cache[:1].isnan().all() and cache[n + 1:].isnan().all()


def wrong_input_on_one_rank():
    mesh = sp.SPMesh.get(2, 1)
    table = rope.RopeTable(8, 3, 2, 2, dtype=torch.float64)
    layout = fused.ShardLayout(mesh, table, 0, 3)
    layer = fused.CausalSelfAttention(16, 2).double()
    x = torch.zeros(1, layout.n_local + (mesh.rank == 1), 16, dtype=torch.float64)
    layer(x, layout, check=True)


def test_wrong_input_on_one_rank_raises_everywhere():
    with pytest.raises(RankError) as info:
        get_pool(2).run(wrong_input_on_one_rank)
    assert set(info.value.messages.values()) == {
        "BadInput: CausalSelfAttention: rank 1: x is (1, 7, 16), expected [batch, 6, 16] "
        "(ranks rejecting their input: [1])"}


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        fused.CausalSelfAttention(12, 2, mode="fast")
