"""Stage 06 properties: the N-rank pipeline equals the single-process pipeline; checkpoints; determinism."""
import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import WORLD_SIZES
from rank_pool import RankError, get_pool
from support.weights import load_text
import self_forcing_reference as reference

sp = importlib.import_module("03_sequence_parallel")
sf = importlib.import_module("06_self_forcing_pipeline")

EXACT64 = 1e-10   # float64: 2 layers x 4 steps x chunks only reorder sums
DENSE64 = 1e-11   # float64, against another algorithm (dense prefix re-runs, complex RoPE); seen: 1e-15
TIGHT32 = 2e-5    # float32 latents of size ~3: a few ulps of accumulated reordering


def run_pipeline(mesh_shape, frames, height, width, seed, window_frames, dtype=torch.float64, local=False, batch=1):
    mesh = sp.SPMesh(1, 1, local=True) if local else sp.SPMesh.get(*mesh_shape)
    model = sf.build_model("tiny", dtype, "cpu", seed)
    text = load_text(None, model.config, batch, seed)
    return sf.generate(model, text, sf.VideoSpec(frames, height, width, window_frames=window_frames), mesh, seed)


def dense_reference(frames, height, width, seed, window_frames, batch=1):
    """The independent dense Self-Forcing of tests/self_forcing_reference.py, on the pipeline's weights."""
    model = sf.build_model("tiny", torch.float64, "cpu", seed)
    text = load_text(None, model.config, batch, seed).double()
    return reference.generate(model.state_dict(), dataclasses.asdict(sf.PRESETS["tiny"]), text, frames, height // 8,
                              width // 8,
                              seed, window_frames)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@given(data=st.data(), chunks=st.integers(1, 4), height=st.sampled_from([16, 32, 48]),
       width=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**31), windowed=st.booleans(),
       batch=st.integers(1, 2))
def test_pipeline_on_n_ranks_equals_the_dense_reference(world_size, data, chunks, height, width, seed, windowed,
                                                        batch):
    """Every window the pipeline accepts (3 frames up to past the video's end), every mesh the heads allow."""
    mesh_shape = data.draw(st.sampled_from(sp.factorizations(world_size, sf.PRESETS["tiny"].num_heads)),
                           label="mesh")
    frames = 3 * chunks
    window = data.draw(st.integers(3, frames + 3), label="window_frames") if windowed else None
    want = dense_reference(frames, height, width, seed, window, batch)
    assert want.shape == (batch, 16, frames, height // 8, width // 8)
    one = run_pipeline(None, frames, height, width, seed, window, local=True, batch=batch)
    torch.testing.assert_close(one, want, rtol=0, atol=DENSE64)
    for got in get_pool(world_size).run(run_pipeline, mesh_shape, frames, height, width, seed, window, batch=batch):
        torch.testing.assert_close(got, want, rtol=0, atol=DENSE64)
        torch.testing.assert_close(got, one, rtol=0, atol=EXACT64)


def run_model_chunks(mesh_shape, chunks, height, width, seed, local=False):
    """Raw model forwards over a few chunks with DIFFERENT timesteps per frame (the pipeline always gives a
    chunk's frames one timestep, which would hide a wrong token -> frame mapping), committing to the cache."""
    mesh = sp.SPMesh(1, 1, local=True) if local else sp.SPMesh.get(*mesh_shape)
    model = sf.build_model("tiny", torch.float64, "cpu", seed)
    gen = torch.Generator().manual_seed(seed)
    context = model.text_context(torch.randn(1, 5, model.config.text_dim, generator=gen))
    table = sf.rope.RopeTable(model.config.head_dim, 3 * chunks, height, width, dtype=torch.float64)
    state = sf.VideoState(model, table, (3 * chunks, None, 0))
    state.start(context)
    outs = []
    for c in range(chunks):
        layout = sf.fused.ShardLayout(mesh, table, 3 * c, 3)
        tokens = torch.randn(1, layout.length, 64, dtype=torch.float64, generator=gen)[:, slice(*layout.shard)]
        timestep = torch.rand(1, 3, generator=gen, dtype=torch.float64) * 1000
        assert torch.equal(layout.frame_index, torch.arange(*layout.shard) // (height * width))
        with torch.no_grad():
            outs.append(model(tokens, timestep, layout, state))
        state.commit(layout)
    return outs


@pytest.mark.parametrize("world_size", [2, 3, 8])
@given(chunks=st.integers(1, 3), height=st.integers(1, 3), width=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_model_with_per_frame_timesteps_on_n_ranks_equals_one_process(world_size, chunks, height, width, seed):
    mesh_shape = sp.mesh_shape(world_size, sf.PRESETS["tiny"].num_heads)
    want = run_model_chunks(None, chunks, height, width, seed, local=True)
    per_rank = get_pool(world_size).run(run_model_chunks, mesh_shape, chunks, height, width, seed)
    for c in range(chunks):
        torch.testing.assert_close(torch.cat([outs[c] for outs in per_rank], dim=1), want[c], rtol=0, atol=EXACT64)


@pytest.mark.parametrize("world_size, mesh_shape", [(4, (2, 2)), (8, (4, 2))])
def test_pipeline_float32_on_2d_mesh(world_size, mesh_shape):
    want = run_pipeline(None, 6, 32, 48, 7, None, torch.float32, local=True)
    for got in get_pool(world_size).run(run_pipeline, mesh_shape, 6, 32, 48, 7, None, torch.float32):
        torch.testing.assert_close(got, want, rtol=0, atol=TIGHT32)


def test_same_seed_same_latents_bit_for_bit():
    a = run_pipeline(None, 6, 32, 32, 3, None, torch.float32, local=True)
    b = run_pipeline(None, 6, 32, 32, 3, None, torch.float32, local=True)
    c = run_pipeline(None, 6, 32, 32, 4, None, torch.float32, local=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_schedule_is_self_forcing_warped_list():
    timesteps, sigmas = sf.warped_timesteps()
    torch.testing.assert_close(torch.tensor(timesteps, dtype=torch.float64),
                               torch.tensor([1000, 937.5, 2500 / 3, 625], dtype=torch.float64))
    assert sigmas == [t / 1000 for t in timesteps]


def test_patchify_roundtrip_and_patch_embedding_equals_conv():
    latents = torch.randn(2, 16, 3, 8, 12, dtype=torch.float64)
    tokens = sf.patchify(latents)
    assert tokens.shape == (2, 3 * 4 * 6, 64)
    assert torch.equal(sf.unpatchify(tokens, 3, 8, 12), latents)
    model = sf.build_model("tiny", torch.float64, "cpu", 0)
    conv = model.patch_embedding(latents).flatten(2).transpose(1, 2)            # Wan's way
    weight = model.patch_embedding.weight.permute(0, 2, 3, 4, 1).flatten(1)
    torch.testing.assert_close(torch.nn.functional.linear(tokens, weight, model.patch_embedding.bias), conv,
                               rtol=0, atol=1e-12)


def test_text_context_equals_each_blocks_own_projection():
    model = sf.build_model("tiny", torch.float64, "cpu", 0)
    for p in model.parameters():  # norm weights start at ones: make them matter
        torch.nn.init.normal_(p, std=0.3)
    text = torch.randn(2, 5, model.config.text_dim, dtype=torch.float64)
    context = model.text_embedding(torch.nn.functional.pad(text, (0, 0, 0, model.config.text_len - 5)))
    for (k, v), block in zip(model.text_context(text), model.blocks):
        a = block.cross_attn
        split = lambda t: t.unflatten(-1, (model.config.num_heads, -1)).transpose(1, 2)
        torch.testing.assert_close(k, split(a.norm_k(a.k(context))), rtol=0, atol=1e-12)
        torch.testing.assert_close(v, split(a.v(context)), rtol=0, atol=1e-12)


def test_parameter_names_are_wan_names():
    names = set(sf.build_model("tiny", torch.float32, "cpu", 0).state_dict())
    for name in ["patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
                 "time_embedding.2.weight", "time_projection.1.weight", "blocks.0.modulation", "blocks.0.norm3.weight",
                 "blocks.0.norm3.bias", "blocks.1.self_attn.q.weight", "blocks.1.self_attn.norm_k.weight",
                 "blocks.1.cross_attn.o.bias", "blocks.1.cross_attn.norm_q.weight", "blocks.0.ffn.0.weight",
                 "blocks.0.ffn.2.bias", "head.head.weight", "head.modulation"]:
        assert name in names, name
    assert not any("norm1" in n or "norm2" in n or "freqs" in n or "rope" in n for n in names)


def test_checkpoint_reloads_strictly_in_both_layouts(tmp_path):
    source = sf.build_model("tiny", torch.float32, "cpu", 1)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "self_forcing.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"generator": {f"model.{k}": v for k, v in source.state_dict().items()},
                "generator_ema": {f"model._fsdp_wrapped_module.{k}": v + 1 for k, v in source.state_dict().items()}},
               wrapped)
    for path, use_ema, offset in [(plain, False, 0), (wrapped, False, 0), (wrapped, True, 1)]:
        target = sf.build_model("tiny", torch.float32, "cpu", 2, checkpoint=str(path), use_ema=use_ema)
        for name, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[name], value + offset), name


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("blocks.1.cross_attn.k.bias"), r"missing key blocks\.1\.cross_attn\.k\.bias"),
    (lambda sd: sd.update({"blocks.0.extra": torch.zeros(1)}), r"unexpected key blocks\.0\.extra"),
    (lambda sd: sd.update({"head.modulation": torch.zeros(1, 3, 48)}),
     r"wrong shape head\.modulation: checkpoint \(1, 3, 48\) vs model \(1, 2, 48\)"),
])
def test_bad_checkpoint_names_the_key(tmp_path, edit, message):
    state = sf.build_model("tiny", torch.float32, "cpu", 1).state_dict()
    edit(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message):
        sf.build_model("tiny", torch.float32, "cpu", 1, checkpoint=str(tmp_path / "bad.pt"))


def disagreeing_run(what):
    rank = sp.world()[1]
    frames = 9 if what == "frames" and rank == 1 else 6
    seed = 5 if what == "weights" and rank == 2 else 0
    mesh_shape = (4, 1) if what == "heads" else (2, 2)
    model = sf.build_model("tiny", torch.float32, "cpu", seed, fp8=what == "fp8 weights")
    if what == "fp8 weights" and rank == 2:                   # FP8 weights are buffers, not parameters
        model.blocks[0].fp8_qkv.weight_fp8[0, 0] = 1.0
    text = load_text(None, model.config, 1, 0)
    width = 40 if what == "width" and rank == 3 else 32
    sf.generate(model, text, sf.VideoSpec(frames, 32, width), sp.SPMesh.get(*mesh_shape))


@pytest.mark.parametrize("what, message", [
    ("frames", r"ranks disagree on frames: \[6, 9, 6, 6\]"),
    ("weights", r"ranks disagree on weights"),
    ("fp8 weights", r"ranks disagree on weights"),
    ("width", r"rank 3: width=40 must be a multiple of 16"),
])
def test_bad_or_disagreeing_configuration_raises_on_every_rank(what, message):
    with pytest.raises(RankError) as info:
        get_pool(4).run(disagreeing_run, what)
    messages = info.value.messages
    assert len(messages) == 4 and len(set(messages.values())) == 1, messages
    import re
    assert re.search(message, messages[0]), messages[0]


def test_bad_windows_sinks_and_prompt_schedules_are_rejected():
    model = sf.build_model("tiny", torch.float32, "cpu", 0)
    text = load_text(None, model.config, 1, 0)
    mesh = sp.SPMesh(1, 1, local=True)
    with pytest.raises(ValueError, match=r"window_frames=5 must be >= sink_frames=3 \+ chunk_frames=3"):
        sf.generate(model, text, sf.VideoSpec(6, 16, 16, window_frames=5, sink_frames=3), mesh)
    with pytest.raises(ValueError, match="sink_frames=4 must be whole chunks"):
        sf.generate(model, text, sf.VideoSpec(6, 16, 16, sink_frames=4), mesh)
    with pytest.raises(ValueError, match="a prompt schedule starts with a prompt at frame 0"):
        sf.generate(model, [(3, text)], sf.VideoSpec(6, 16, 16), mesh)
    with pytest.raises(ValueError, match="prompt frames must increase, got 3 then 3"):
        sf.generate(model, [(0, text), (3, text), (3, text)], sf.VideoSpec(6, 16, 16), mesh)
    with pytest.raises(ValueError, match="prompts at frames 4 and 5 would both begin with the chunk at frame 6"):
        sf.generate(model, [(0, text), (4, text), (5, text)], sf.VideoSpec(9, 16, 16), mesh)
    with pytest.raises(ValueError, match=r"text embedding at frame 3 is \(2, 16, 32\)"):
        sf.generate(model, [(0, text), (3, text.expand(2, -1, -1))], sf.VideoSpec(6, 16, 16), mesh)
    with pytest.raises(ValueError, match="window_frames=2 must be >= sink_frames=0 \\+ chunk_frames=3"):
        sf.generate(model, text, sf.VideoSpec(6, 16, 16, window_frames=2), mesh)
    with pytest.raises(ValueError, match=r"frames=7 must be a multiple of chunk_frames=3 \(whole chunks\)"):
        sf.generate(model, text, sf.VideoSpec(7, 16, 16), mesh)
    with pytest.raises(ValueError, match=r"text embedding is \(1, 16, 31\)"):
        sf.generate(model, text[..., :31], sf.VideoSpec(6, 16, 16), mesh)


def graph_keys(mesh_shape, chunks, window, local=False):
    """The CUDA-graph key of each chunk of a video, run eagerly through a GraphedForward's own caches."""
    mesh = sp.SPMesh(1, 1, local=True) if local else sp.SPMesh.get(*mesh_shape)
    model = sf.build_model("tiny", torch.float64, "cpu", 0)
    table = sf.rope.RopeTable(model.config.head_dim, 3 * chunks, 2, 3, dtype=torch.float64)
    plan = sf.VideoSpec(3 * chunks, 32, 48, window_frames=window).cache_plan
    forward = sf.GraphedForward(model, sf.VideoState(model, table, plan), "none", 60)
    forward.state.start(model.text_context(torch.zeros(1, 4, model.config.text_dim, dtype=torch.float64)))
    keys = []
    with torch.no_grad():
        for c in range(chunks):
            layout = sf.fused.ShardLayout(mesh, table, 3 * c, 3)
            forward.state.make_room(layout)
            keys.append(forward.state.visible(layout))
            x = torch.zeros(1, layout.n_local, 64, dtype=torch.float64)
            sf.EagerForward.__call__(forward, x, torch.zeros(1, 3, dtype=torch.float64), layout)
            forward.state.commit(layout)
    return keys


@pytest.mark.parametrize("world_size, mesh_shape", [(1, None), (2, (1, 2)), (4, (2, 2))])
@pytest.mark.parametrize("window", [None, 3, 5, 6, 7, 10])
def test_graph_key_is_the_visible_cache_so_a_window_reuses_one_graph(world_size, mesh_shape, window):
    """A graph is replayed whenever its key repeats, so the key must change exactly when the cache a chunk
    sees does: one graph per chunk without a window, one per distinct visible length with one."""
    chunks, tpf = 6, 6
    per_rank = ([graph_keys(None, chunks, window, local=True)] if world_size == 1 else
                get_pool(world_size).run(graph_keys, mesh_shape, chunks, window))
    visible_frames = [3 * c if window is None else min(3 * c, window - 3) for c in range(chunks)]
    for keys in per_rank:
        assert [sum(key[1]) for key in keys] == [f * tpf for f in visible_frames]
        assert len(set(keys)) == len(set(visible_frames))


def test_a_deadline_ends_the_process_with_one_clear_line():
    code = ("import importlib, time\nsf = importlib.import_module('06_self_forcing_pipeline')\n"
            "with sf.capture_deadline(1, 'the test wait'):\n    time.sleep(60)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: rank 0: the test wait did not finish within 1 s; rerun "
                                                    "with --exchange symm (peer copies instead of NCCL) or with --no-graph")


def test_every_parameter_tensor_moves_the_latents():
    """A dead path (a block's cross-attention dropped, a modulation never added) is a bug that the
    comparisons above cannot see if every side shares it: perturbing any one parameter tensor of the model
    must move the pipeline's latents."""
    model = sf.build_model("tiny", torch.float64, "cpu", 0)
    text = load_text(None, model.config, 1, 0)
    mesh = sp.SPMesh(1, 1, local=True)
    run = lambda: sf.generate(model, text, sf.VideoSpec(6, 32, 32, window_frames=6), mesh)
    base = run()
    gen = torch.Generator().manual_seed(1)
    dead = []
    for name, param in model.named_parameters():
        saved = param.detach().clone()
        with torch.no_grad():
            param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
        if (run() - base).abs().max() < 1e-6:
            dead.append(name)
        with torch.no_grad():
            param.copy_(saved)
    assert not dead, f"parameters that do not reach the latents: {dead}"
    assert torch.equal(run(), base)
