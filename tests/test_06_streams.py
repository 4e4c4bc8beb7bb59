"""Streams without an end: sink frames, a window, positions past the RoPE table's time rows and prompt
switches with a KV re-cache. The pipeline on 1, 2, 3, 4 and 8 ranks equals the independent dense reference
(tests/self_forcing_reference.py), and each planted bug below is caught by that comparison."""
import dataclasses
import importlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import WORLD_SIZES
from rank_pool import get_pool
from support.weights import load_text
import self_forcing_reference as reference

sp = importlib.import_module("03_sequence_parallel")
sf = importlib.import_module("06_self_forcing_pipeline")
causal = sf.causal

DENSE64 = 1e-11   # float64, against another algorithm


def tiny_model(seed, rope_frames):
    """The tiny preset with a short RoPE table: a stream of a few chunks already runs past its time rows."""
    model = sf.build_model("tiny", torch.float64, "cpu", seed)
    model.config = dataclasses.replace(model.config, rope_frames=rope_frames)
    return model


def schedule(seed, switches):
    """The prompts: one from frame 0, then one per switch frame, each with its own features."""
    config = sf.PRESETS["tiny"]
    return [(frame, load_text(None, config, 1, seed + i).double()) for i, frame in enumerate([0, *switches])]


def run_stream(mesh_shape, frames, video, seed, switches, rope_frames, local=False):
    mesh = sp.SPMesh(1, 1, local=True) if local else sp.SPMesh.get(*mesh_shape)
    model = tiny_model(seed, rope_frames)
    return sf.generate(model, schedule(seed, switches), dataclasses.replace(video, frames=frames), mesh, seed)


def dense(frames, video, seed, switches):
    model = tiny_model(seed, 1)
    return reference.generate(model.state_dict(), dataclasses.asdict(sf.PRESETS["tiny"]), None, frames,
                              video.latent_height, video.latent_width, seed, video.window_frames,
                              sink_frames=video.sink_frames, prompts=schedule(seed, switches),
                              rebuild_sink=video.rebuild_sink)


@st.composite
def streams(draw):
    """(frames, VideoSpec, switch frames, RoPE table frames): random sinks, windows, switches, short tables."""
    chunks = draw(st.integers(2, 6), label="chunks")
    sink = 3 * draw(st.integers(0, 2), label="sink chunks")
    window = draw(st.one_of(st.none(), st.integers(sink + 3, sink + 9)), label="window_frames")
    frames = 3 * chunks
    switches = sorted(draw(st.sets(st.sampled_from(range(3, frames, 3)), max_size=2), label="switch chunks"))
    switches = [f - draw(st.integers(0, 2)) for f in switches]   # a switch between chunks starts the next one
    video = sf.VideoSpec(frames, 16, draw(st.sampled_from([16, 32])), window_frames=window, sink_frames=sink,
                         rebuild_sink=draw(st.booleans(), label="rebuild_sink"))
    return frames, video, switches, draw(st.integers(1, 6), label="RoPE table frames")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=6)
@given(data=st.data(), stream=streams(), seed=st.integers(0, 2**31))
def test_streams_on_n_ranks_equal_the_dense_reference(world_size, data, stream, seed):
    frames, video, switches, rope_frames = stream
    mesh_shape = data.draw(st.sampled_from(sp.factorizations(world_size, sf.PRESETS["tiny"].num_heads)), label="mesh")
    want = dense(frames, video, seed, switches)
    for got in get_pool(world_size).run(run_stream, mesh_shape, frames, video, seed, switches, rope_frames):
        torch.testing.assert_close(got, want, rtol=0, atol=DENSE64)


LONG = sf.VideoSpec(18, 16, 16, window_frames=9, sink_frames=3)     # the sink shifts from the fourth chunk


def planted_sink_eviction(monkeypatch):
    """The sink evicted like any window frame once the window has moved past it."""
    evict = causal.KVCache.evict_until

    def forgets_the_sink(cache, cutoff):
        sink, cache.sink_tokens = cache.sink_tokens, 0
        evict(cache, cutoff)
        cache.sink_tokens = sink
    monkeypatch.setattr(causal.KVCache, "evict_until", forgets_the_sink)


def planted_sink_in_place(monkeypatch):
    """The sink's keys left at their absolute frames 0..S-1 instead of just before the window."""
    monkeypatch.setattr(causal, "sink_shift", lambda end, window, sink: 0)


def planted_sink_one_frame_off(monkeypatch):
    """The sink moved one frame too far (overlapping the window's first frame)."""
    shift = causal.sink_shift
    monkeypatch.setattr(causal, "sink_shift", lambda end, window, sink: shift(end, window, sink) + 1
                        if shift(end, window, sink) else 0)


def planted_recache_under_the_old_prompt(monkeypatch):
    """The window re-run before the new text's K/V are in place."""
    recache = sf.recache

    def old_prompt(forward, layouts, text, *rest):
        old = [(k.clone(), v.clone()) for k, v in forward.state.text_kv]
        set_text = forward.state.set_text
        forward.state.set_text = lambda kv: set_text(old)
        recache(forward, layouts, text, *rest)
        del forward.state.set_text
        set_text(forward.model.text_context(text))
    monkeypatch.setattr(sf, "recache", old_prompt)


def planted_recache_skipped(monkeypatch):
    """Only the text changes at a switch: the self-attention cache keeps the old prompt's K/V."""
    monkeypatch.setattr(sf, "recache", lambda forward, layouts, text, *rest:
                        forward.state.set_text(forward.model.text_context(text)))


@pytest.mark.parametrize("plant, switches", [
    (planted_sink_eviction, []), (planted_sink_in_place, []), (planted_sink_one_frame_off, []),
    (planted_recache_under_the_old_prompt, [9]), (planted_recache_skipped, [9])])
def test_a_planted_bug_is_caught(plant, switches, monkeypatch):
    want = dense(LONG.frames, LONG, 0, switches)
    torch.testing.assert_close(run_stream(None, LONG.frames, LONG, 0, switches, 4, local=True), want, rtol=0,
                               atol=DENSE64)
    plant(monkeypatch)
    got = run_stream(None, LONG.frames, LONG, 0, switches, 4, local=True)
    assert (got - want).abs().max() > 1e-6


def test_a_stream_past_the_old_limit_keeps_its_state_bounded(monkeypatch):
    """1101 latent frames (upstream stops at 1024) with a sink, a window and a switch: every cache keeps one
    storage of the window's size, and its bookkeeping stays as small as the window."""
    states, make_state = [], sf.VideoState.__init__
    monkeypatch.setattr(sf.VideoState, "__init__", lambda state, *a: (states.append(state), make_state(state, *a))[1])
    model, mesh = sf.build_model("tiny", torch.float32, "cpu", 0), sp.SPMesh(1, 1, local=True)
    video = sf.VideoSpec(1101, 16, 16, window_frames=12, sink_frames=3)
    prompts = [(0, load_text(None, model.config, 1, 0)), (600, load_text(None, model.config, 1, 1))]
    count = 0
    for latents in sf.stream(model, prompts, video, mesh):
        count += 1
        if count == 10:
            storage = [cache.kv.data_ptr() for cache in states[0].caches]
    assert count == 367 and latents.shape == (1, 16, 3, 2, 2) and torch.isfinite(latents).all()
    for cache, address in zip(states[0].caches, storage):
        assert cache.kv.shape[0] == 12 and cache.kv.data_ptr() == address and len(cache.chunks) <= 4


@pytest.mark.parametrize("rebuild_sink", [False, True])
def test_a_switch_inside_the_sink_equals_the_dense_reference(rebuild_sink):
    """The chunk after the switch is itself a sink chunk: it is made under the new prompt."""
    video = sf.VideoSpec(12, 16, 16, window_frames=9, sink_frames=6, rebuild_sink=rebuild_sink)
    torch.testing.assert_close(run_stream(None, 12, video, 3, [3], 2, local=True), dense(12, video, 3, [3]),
                               rtol=0, atol=DENSE64)


def cache_keys(video, switches=()):
    """Every chunk's CUDA-graph key (VideoState.visible) in a stream, re-cache passes included, on one rank."""
    model, mesh = sf.build_model("tiny", torch.float32, "cpu", 0), sp.SPMesh(1, 1, local=True)
    keys, visible = set(), sf.VideoState.visible

    def record(state, layout):
        keys.add(visible(state, layout))
        return keys
    prompts = [(0, load_text(None, model.config, 1, 0))] + [(f, load_text(None, model.config, 1, 1)) for f in switches]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sf.VideoState, "visible", record)
        patch.setattr(sf.EagerForward, "__call__", lambda forward, x, t, layout: (
            forward.state.visible(layout), forward.model(x, t, layout, forward.state))[1])
        list(sf.stream(model, prompts, video, mesh, options=sf.RunOptions(graphs=False)))
    return keys


@pytest.mark.parametrize("window, sink, rebuild", [(12, 3, False), (9, 0, False), (10, 3, True), (15, 6, False)])
def test_the_warm_up_sees_every_cache_length_of_a_stream_of_any_length(window, sink, rebuild):
    """So a stream's warm-up (compile, capture) takes the same time for a minute or an hour of video."""
    video = sf.VideoSpec(120, 16, 16, window_frames=window, sink_frames=sink, rebuild_sink=rebuild)
    warm = sf.warm_up_video(video)
    assert warm.frames <= window + 2 and warm.cache_plan == video.cache_plan
    assert cache_keys(video, [30, 61, 90]) == cache_keys(warm)
    assert cache_keys(video) != cache_keys(dataclasses.replace(warm, frames=warm.frames - 3))   # no shorter one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host wait exists only with a GPU")
def test_a_long_stream_never_waits_for_the_gpu_between_chunks():
    """Once its shapes repeat (window full, sink moving, time rows past the table), a stream queues each
    chunk's work without waiting for the GPU: a blocking copy or sync between hand-outs fails here."""
    model = sf.build_model("tiny", torch.float32, "cuda", 0)
    model.config = dataclasses.replace(model.config, rope_frames=6)
    text = load_text(None, model.config, 1, 0).cuda()
    video = sf.VideoSpec(30, 16, 16, window_frames=9, sink_frames=3)
    chunks = sf.stream(model, text, video, sp.SPMesh(1, 1, local=True), 0, sf.RunOptions(graphs=False))
    for _ in range(5):                                   # compiled code made, every cache length seen
        next(chunks)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in chunks:
            pass
    finally:
        torch.cuda.set_sync_debug_mode(0)
