"""The opt-in FP8 path of the DiT's linear layers: each layer is its own definition (e4m3 values times their
scales, float32 accumulation), close to the layer it replaces; q, k and v as one layer are the three layers,
made before attention they are what the attention layer would make; sharded equals one process."""
import importlib
import multiprocessing

import pytest
import torch
import torch.nn.functional as F

from rank_pool import get_pool
from support.weights import load_text

rope = importlib.import_module("01_rope")
sp = importlib.import_module("03_sequence_parallel")
fused = importlib.import_module("05_fused_comm")
sf = importlib.import_module("06_self_forcing_pipeline")


def test_an_fp8_layer_is_its_definition_and_near_the_layer_it_replaces():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(2, 10, 64, generator=gen) * torch.logspace(-3, 3, 10)[None, :, None]   # rows 1e-3..1e3
    fp8 = sf.Fp8Linear(linear)
    values, scale = sf.fp8_rows(x.flatten(0, 1))
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (20, 1)
    weight = fp8.weight_fp8.float() * fp8.weight_scale.t()                         # [N, K]
    want = (values.float() * scale) @ weight.T + linear.bias
    torch.testing.assert_close(fp8(x).flatten(0, 1), want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        error = (fp8(x) - linear(x)).norm(dim=-1) / linear(x).norm(dim=-1)            # per token: scaled per row
    assert error.max() < 0.08, error


def test_q_k_v_as_one_fp8_layer_are_three_fp8_layers():
    gen = torch.Generator().manual_seed(1)
    linears = [torch.nn.Linear(64, n) for n in (48, 48, 32)]
    x = torch.randn(2, 10, 64, generator=gen) * torch.logspace(-3, 3, 10)[None, :, None]
    one, three = sf.Fp8Linear(*linears), [sf.Fp8Linear(linear) for linear in linears]
    assert torch.equal(one.weight_fp8.float(), torch.cat([f.weight_fp8.float() for f in three]))   # per channel
    assert torch.equal(one.weight_scale, torch.cat([f.weight_scale for f in three], dim=1))
    outs = one(x)
    assert [o.shape for o in outs] == [(2, 10, 48), (2, 10, 48), (2, 10, 32)]
    for got, layer in zip(outs, three):
        torch.testing.assert_close(got, layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", fused.MODES)
def test_fp8_q_k_v_made_before_attention_are_what_the_layer_would_make(mode):
    """The FP8 block's pre_attention hands self-attention (q, k, v) from one layer; the same attention with
    q, k and v as three FP8 layers of its own, projecting its input, gives the same output."""
    block = sf.build_model("tiny", torch.float32, "cpu", 0, mode=mode, fp8=True).blocks[0]
    attention = block.self_attn
    plain = sf.build_model("tiny", torch.float32, "cpu", 0, mode=mode).blocks[0].self_attn
    plain.q, plain.k, plain.v = (sf.Fp8Linear(linear) for linear in (plain.q, plain.k, plain.v))
    plain.o = attention.o
    table = rope.RopeTable(attention.head_dim, 6, 2, 3)
    layout = fused.ShardLayout(sp.SPMesh(1, 1, local=True), table, 3, 3)
    h = torch.randn(1, layout.length, attention.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q, k, v = block.fp8_qkv(h)
        got = attention.attend_projections(q, k, v, layout)
        torch.testing.assert_close(got, plain(h, layout, check=True), rtol=1e-5, atol=1e-5)


def test_the_fp8_feed_forward_is_its_three_layers_in_order():
    """The block quantizes GELU's output itself (gelu_fp8_rows) and hands it to the second layer."""
    block = sf.build_model("tiny", torch.float32, "cpu", 0, fp8=True).blocks[0]
    h = torch.randn(2, 7, block.ffn[0].weight_fp8.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(block.feed_forward(h), block.ffn(h), rtol=0, atol=0)


def block_inputs(block, batch, tokens, text, gen):
    """A block's inputs around attention, two frames of tokens / 2: x, y [batch, tokens, dim], e [batch, 2,
    6, dim], frame_index [tokens], the text's K/V [batch, heads, text, head_dim] each."""
    dim, heads = block.norm1.normalized_shape[0], block.cross_attn.num_heads
    like = dict(device=block.modulation.device, dtype=block.modulation.dtype, generator=gen)
    x, y = (torch.randn(batch, tokens, dim, **like) for _ in range(2))
    e = torch.randn(batch, 2, 6, dim, **like)
    frame_index = torch.arange(tokens, device=like["device"]) // (tokens // 2)
    text_kv = [torch.randn(batch, heads, text, dim // heads, **like) for _ in range(2)]
    return x, y, e, frame_index, text_kv


def test_the_fp8_block_around_attention_is_the_blocks_formula():
    """pre_attention and post_attention of the FP8 block (each residual sum, norm and quantization in one
    norm_fp8_rows) against the block's formula written out with its own FP8 layers: batch 2, two frames
    with their own modulation and gates."""
    block = sf.build_model("tiny", torch.float32, "cpu", 0, fp8=True).blocks[0]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        block.modulation.normal_(generator=gen)
        block.norm3.weight.normal_(1, 0.3, generator=gen), block.norm3.bias.normal_(0, 0.3, generator=gen)
    x, y, e, frame_index, text_kv = block_inputs(block, 2, 12, 5, gen)
    with torch.no_grad():
        for got, want in zip(block.pre_attention(x, e, frame_index),
                             block.fp8_qkv(block.modulated(block.norm1, x, e, frame_index, 0))):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        x1 = x + y * block.gate(e, frame_index, 2)
        x2 = x1 + block.cross_attn(block.norm3(x1), text_kv)
        want = x2 + block.feed_forward(block.modulated(block.norm2, x2, e, frame_index, 3)) * block.gate(
            e, frame_index, 5)
        torch.testing.assert_close(block.post_attention(x, y, e, frame_index, text_kv), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-pass kernel runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gelu_fp8_rows_in_one_pass_is_gelu_then_fp8_rows(dtype):
    """The Triton pass, alone and inside torch.compile, against its two-step definition with GELU in float64
    (F.gelu's float32 0.5 x (1 + tanh u) loses its digits below x ~ -4): scales within a rounding, values
    at most one e4m3 step and a rounding of GELU apart, and few of them; odd widths and one row too."""
    gen = torch.Generator("cuda").manual_seed(0)
    compiled = torch.compile(sf.gelu_fp8_rows, fullgraph=True, dynamic=False)
    for rows, width in [(1, 64), (37, 1000), (300, 1536), (4680, 8960)]:
        spread = torch.logspace(-3, 2, rows, device="cuda")[:, None]                     # rows 1e-3..1e2
        x = (torch.randn(rows, width, device="cuda", generator=gen) * spread).to(dtype)
        values, scale = sf.gelu_fp8_rows(x)
        want_values, want_scale = sf.fp8_rows(F.gelu(x.double(), approximate="tanh").to(dtype))
        assert values.dtype == sf.FP8 and scale.shape == (rows, 1)
        torch.testing.assert_close(scale, want_scale, rtol=2 ** -7, atol=0)
        got, want = values.float() * scale, want_values.float() * want_scale
        step = want.abs() * 2 ** -3 + want_scale * 2 ** -9                      # e4m3: 3 mantissa bits
        ulp = (want.abs() + torch.finfo(dtype).smallest_normal) * torch.finfo(dtype).eps    # GELU in dtype
        assert ((got - want).abs() <= (step + ulp) * 1.01).all()
        # ties between e4m3 neighbours: x * (448 / amax) lands on them where x / (amax / 448) does not
        assert (values.view(torch.uint8) != want_values.view(torch.uint8)).float().mean() < 1e-2
        in_compile = compiled(x)
        assert torch.equal(in_compile[0].view(torch.uint8), values.view(torch.uint8))
        assert torch.equal(in_compile[1], scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-pass kernel runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_fp8_rows_in_one_pass_is_its_definition(dtype):
    """The Triton pass, alone and inside torch.compile, against its definition in float64 (the residual sum
    and the norm's output each rounded to dtype once, then fp8_rows): the new x within a rounding, scales
    within a rounding, values at most one e4m3 step and a rounding apart; one-row and per-frame weights, a
    gate or none, a power-of-two width, odd widths and one row."""
    torch._dynamo.reset()                                   # each case and dtype is one more compilation
    gen = torch.Generator("cuda").manual_seed(0)
    compiled = torch.compile(sf.norm_fp8_rows, fullgraph=True, dynamic=False)
    randn = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)
    # (rows, width, groups, residual, gated, one row of weights): the block's mixes, one-row weights with
    # a per-frame gate among them
    for rows, width, groups, residual, gated, shared in [
            (1, 64, 1, False, False, False), (37, 1000, 3, True, True, False),
            (300, 1536, 1, True, True, False), (4680, 1536, 3, True, False, False),
            (96, 1536, 6, True, True, True)]:
        spread = torch.logspace(-2, 2, rows, device="cuda")[:, None]                     # rows 1e-2..1e2
        x = (randn(rows, width) * spread + 1).to(dtype)
        r = (randn(rows, width) * spread).to(dtype) if residual else None
        g = randn(groups, width).to(dtype) if gated else None
        affine_rows = 1 if shared else groups
        w, b = (1 + 0.3 * randn(affine_rows, width)).to(dtype), (0.3 * randn(affine_rows, width)).to(dtype)
        group = torch.randint(0, groups, (rows,), device="cuda", generator=gen)
        new_x, values, scale = sf.norm_fp8_rows(x, w, b, group, 1e-6, r, g)
        want_x = x if r is None else (x.double() + r.double() * (1 if g is None else g.double()[group])).to(dtype)
        affine = group if not shared else torch.zeros_like(group)
        h = F.layer_norm(want_x.double(), (width,), eps=1e-6) * w.double()[affine] + b.double()[affine]
        want_values, want_scale = sf.fp8_rows(h.to(dtype))
        if r is None:
            assert new_x is None
        else:
            torch.testing.assert_close(new_x, want_x, rtol=torch.finfo(dtype).eps, atol=0)
        torch.testing.assert_close(scale, want_scale, rtol=2 * torch.finfo(dtype).eps, atol=0)
        got, want = values.float() * scale, want_values.float() * want_scale
        step = want.abs() * 2 ** -3 + want_scale * 2 ** -9                      # e4m3: 3 mantissa bits
        ulp = (want.abs() + torch.finfo(dtype).smallest_normal) * torch.finfo(dtype).eps * 2   # two roundings
        assert ((got - want).abs() <= (step + ulp) * 1.01).all()
        assert (values.view(torch.uint8) != want_values.view(torch.uint8)).float().mean() < 2e-2
        in_compile = compiled(x, w, b, group, 1e-6, r, g)
        assert torch.equal(in_compile[1].view(torch.uint8), values.view(torch.uint8))
        assert torch.equal(in_compile[2], scale)
        assert (in_compile[0] is None) if r is None else torch.equal(in_compile[0], new_x)


def graph_breaks_around_attention(device):
    """torch.compile's graph breaks in a fresh FP8 block's pre_attention and post_attention (bf16)."""
    block = sf.build_model("tiny", torch.bfloat16, device, 0, fp8=True).blocks[0]
    x, y, e, frame_index, text_kv = block_inputs(block, 1, 96, 16, torch.Generator(device).manual_seed(4))
    with torch.no_grad():
        return [torch._dynamo.explain(sf.Block.pre_attention)(block, x, e, frame_index).graph_break_count,
                torch._dynamo.explain(sf.Block.post_attention)(block, x, y, e, frame_index, text_kv).graph_break_count]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled FP8 block runs on a GPU")
def test_the_compiled_fp8_block_around_attention_is_one_graph_each():
    """pre_attention and post_attention (the FFN's GELU kernel included) compile whole: a graph break would
    split the fusions inductor makes around the FP8 layers. In a fresh process, where the GELU kernel's op
    is not registered yet (registering it inside the traced code breaks the graph)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(graph_breaks_around_attention, ("cuda",)) == [0, 0]


def fp8_latents(mesh_shape, local=False):
    mesh = sp.SPMesh(1, 1, local=True) if local else sp.SPMesh.get(*mesh_shape)
    model = sf.build_model("tiny", torch.float32, "cpu", 3, fp8=True)
    return sf.generate(model, load_text(None, model.config, 1, 3), sf.VideoSpec(6, 32, 48, window_frames=6), mesh, 3)


def test_fp8_is_opt_in_and_n_ranks_equal_one_process():
    assert all(isinstance(m, torch.nn.Linear) for m in sf.build_model("tiny", torch.float32, "cpu", 0).blocks[0].ffn
               if not isinstance(m, torch.nn.GELU))
    assert sf.build_model("tiny", torch.float32, "cpu", 0).blocks[0].fp8_qkv is None
    fp8 = sf.build_model("tiny", torch.float32, "cpu", 0, fp8=True)
    assert isinstance(fp8.blocks[0].fp8_qkv, sf.Fp8Linear) and not hasattr(fp8.blocks[0].self_attn, "q")
    assert isinstance(fp8.blocks[0].self_attn.o, sf.Fp8Linear) and isinstance(fp8.blocks[1].ffn[2], sf.Fp8Linear)
    want = fp8_latents(None, local=True)
    for got in get_pool(4).run(fp8_latents, (2, 2)):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
