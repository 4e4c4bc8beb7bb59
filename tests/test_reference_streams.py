"""The dense reference's stream rules (tests/self_forcing_reference.py): sink frames, long-stream positions,
prompt switches with a re-cache. Anchors against the one-prompt, sink-free reference and against itself;
the pipeline's weights are only built here (stage 06 is not otherwise used)."""
import dataclasses
import functools
import importlib

import pytest
import torch

from support.weights import load_text
import self_forcing_reference as reference

sf = importlib.import_module("06_self_forcing_pipeline")
LAT = 2             # latent height and width: 16 x 16 pixels, one token per frame after 2x2 patches
C = reference.CHUNK_FRAMES


@functools.lru_cache(maxsize=None)
def weights(seed):
    """(state dict, config dict, ModelConfig) of the tiny preset in float64."""
    model = sf.build_model("tiny", torch.float64, "cpu", seed)
    return model.state_dict(), dataclasses.asdict(sf.PRESETS["tiny"]), model.config


def text(seed, batch=1, length=None):
    """umT5-like stand-in features [batch, length or text_len, text_dim], float64."""
    features = load_text(None, weights(0)[2], batch, seed).double()
    return features if length is None else features[:, :length]


def run(frames, seed=0, window=None, batch=1, **stream):
    sd, config, _ = weights(seed)
    return reference.generate(sd, config, text(seed, batch), frames, LAT, LAT, seed, window, **stream)


def first_differing_frame(a, b):
    """The first latent frame where a and b [B, 16, F, h, w] differ at all, or None."""
    same = [torch.equal(a[:, :, f], b[:, :, f]) for f in range(a.shape[2])]
    return None if all(same) else same.index(False)


def differs_in_every_frame_from(a, b, frame):
    return all(not torch.equal(a[:, :, f], b[:, :, f]) for f in range(frame, a.shape[2]))


# ---- the rules themselves, without the model

def test_visibility_keeps_the_sink_and_the_latest_frames():
    assert reference.visible_frames(12, None, 3) == frozenset(range(12))
    assert reference.visible_frames(12, 6, 0) == frozenset(range(6, 12))
    assert reference.visible_frames(12, 6, 3) == frozenset([0, 1, 2, 9, 10, 11])
    assert reference.visible_frames(15, 7, 3) == frozenset([0, 1, 2, 11, 12, 13, 14])   # W - S need not be C k
    assert reference.visible_frames(6, 9, 3) == frozenset(range(6))


def test_sink_keys_sit_just_before_the_window():
    assert reference.key_positions(9, 9, None, 3).tolist() == list(range(9))
    assert reference.key_positions(9, 9, 12, 3).tolist() == list(range(9))               # e <= W: no shift
    assert reference.key_positions(15, 15, 6, 3).tolist() == [9, 10, 11] + list(range(3, 15))
    assert reference.key_positions(12, 12, 9, 3).tolist() == [3, 4, 5] + list(range(3, 12))


def test_recached_chunks():
    assert reference.recached_chunks(6, None, 0, False) == [0, 1]
    assert reference.recached_chunks(9, None, 3, False) == [1, 2]
    assert reference.recached_chunks(9, None, 3, True) == [0, 1, 2]
    assert reference.recached_chunks(9, 6, 3, False) == []                   # the window is the chunk itself
    assert reference.recached_chunks(9, 6, 3, True) == [0]
    assert reference.recached_chunks(12, 9, 3, False) == [3]                 # [max(3, 15 - 6), 12)
    assert reference.recached_chunks(12, 7, 3, False) == [3]                 # [11, 12): a part of chunk 3
    assert reference.recached_chunks(9, 6, 0, False) == [2]                  # e = 12: [12 - 6, 9)
    assert reference.recached_chunks(9, 8, 0, False) == [1, 2]               # e = 12: [4, 9)


def test_recache_rewrites_records_in_ascending_chunks():
    W, S = 9, 3
    records = [(0, reference.visible_frames(reference.chunk_end(f), W, S)) for f in range(12)]
    before = list(records)
    reference.recache(records, 12, 1, W, S, rebuild_sink=False)
    assert records[:9] == before[:9]                                         # sink and evicted chunks kept
    assert records[9:] == [(1, frozenset([0, 1, 2, 9, 10, 11]))] * 3

    records = list(before)
    reference.recache(records, 9, 1, None, S, rebuild_sink=True)
    assert records[0:3] == [(1, frozenset(range(3)))] * 3
    assert records[3:6] == [(1, frozenset(range(6)))] * 3
    assert records[6:9] == [(1, frozenset(range(9)))] * 3
    assert records[9:] == before[9:]                                         # (not generated yet at s = 9)

    records = list(before[:9])
    reference.recache(records, 9, 1, 9, 0, rebuild_sink=False)               # e = 12: [3, 9), chunks 1, 2
    assert records[:3] == before[:3]
    assert records[3:6] == [(1, frozenset(range(3, 6)))] * 3                 # chunk 0 is not re-cached
    assert records[6:9] == [(1, frozenset(range(3, 9)))] * 3


def test_prompt_of_a_chunk_is_the_last_entry_at_or_before_its_first_frame():
    assert [reference.prompt_of_chunk([0, 4, 9], s) for s in (0, 3, 6, 9, 12)] == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("window, sink, schedule", [(6, 4, [0]), (5, 3, [0]), (None, -3, [0]), (9, 0, [1]),
                                                    (9, 0, [0, 6, 6]), (9, 0, [0, 9, 6]), (9, 0, [])])
def test_bad_streams_are_refused(window, sink, schedule):
    with pytest.raises(ValueError):
        reference.check_stream(window, sink, [(frame, None) for frame in schedule])


# ---- anchors on the tiny model

@pytest.mark.parametrize("frames, window, batch", [(9, None, 1), (12, 4, 2), (9, 3, 1), (6, 8, 1), (12, 6, 1)])
def test_one_prompt_without_sink_equals_the_block_causal_reference(frames, window, batch):
    sd, config, _ = weights(1)
    features = text(1, batch)
    want = reference.generate_block_causal(sd, config, features, frames, LAT, LAT, 1, window)
    assert torch.equal(reference.generate(sd, config, features, frames, LAT, LAT, 1, window), want)
    assert torch.equal(reference.generate(sd, config, features, frames, LAT, LAT, 1, window, sink_frames=0,
                                          prompts=[(0, features)], rebuild_sink=True), want)


def test_a_single_schedule_entry_equals_the_plain_run():
    sd, config, _ = weights(2)
    plain = run(12, seed=2, window=6)
    ignored = text(99)                                                       # prompts replace text
    got = reference.generate(sd, config, ignored, 12, LAT, LAT, 2, 6, prompts=[(0, text(2))])
    assert torch.equal(got, plain)
    past_the_end = [(0, text(2)), (12, text(7))]                             # a switch never reached
    assert torch.equal(reference.generate(sd, config, ignored, 12, LAT, LAT, 2, 6, prompts=past_the_end), plain)


@pytest.mark.parametrize("sink, window", [(3, 9), (3, None), (6, 15)])
def test_a_window_over_the_whole_video_makes_the_sink_a_no_op(sink, window):
    assert torch.equal(run(9, seed=3, window=window, sink_frames=sink), run(9, seed=3, window=None))


def test_identical_prompts_unwindowed_recache_changes_nothing():
    """W None, S = 0: the re-cache recomputes every frame under the same features and visible sets, so the
    video is unchanged, noise included (a re-cache draws none)."""
    sd, config, _ = weights(4)
    features = text(4)
    plain = run(12, seed=4)
    switched = reference.generate(sd, config, features, 12, LAT, LAT, 4, None,
                                  prompts=[(0, features), (6, features.clone())])
    assert first_differing_frame(switched, plain) is None


@pytest.mark.parametrize("window, sink, switch, rebuild", [(6, 0, 6, False), (9, 3, 12, False),
                                                           (7, 3, 9, False), (9, 3, 9, True)])
def test_identical_prompts_with_a_window_differ_from_the_switch_chunk_on(window, sink, switch, rebuild):
    """The re-cached frames see fewer frames (only the sink and re-cached chunks), so the same features still
    move the video, from the switch on and never before."""
    sd, config, _ = weights(5)
    features = text(5)
    plain = run(18, seed=5, window=window, sink_frames=sink)
    switched = reference.generate(sd, config, features, 18, LAT, LAT, 5, window, sink_frames=sink,
                                  rebuild_sink=rebuild, prompts=[(0, features), (switch, features.clone())])
    assert first_differing_frame(switched, plain) == switch
    assert differs_in_every_frame_from(switched, plain, switch)


@pytest.mark.parametrize("window, sink, rebuild, switch_at, chunk",
                         [(None, 0, False, 6, 6), (6, 0, False, 4, 6), (9, 3, False, 9, 9), (6, 3, True, 6, 6),
                          (6, 3, False, 6, 6)])
def test_the_second_prompt_moves_frames_from_its_chunk_on_only(window, sink, rebuild, switch_at, chunk):
    sd, config, _ = weights(6)
    first = text(6)

    def with_second(features):
        return reference.generate(sd, config, first, 15, LAT, LAT, 6, window, sink_frames=sink,
                                  rebuild_sink=rebuild, prompts=[(0, first), (switch_at, features)])

    a, b = with_second(text(7)), with_second(text(8, length=5))             # the other one shorter: padded
    assert first_differing_frame(a, b) == chunk
    assert differs_in_every_frame_from(a, b, chunk)


def test_rebuilding_the_sink_matters_only_after_a_switch():
    sd, config, _ = weights(9)
    prompts = [(0, text(9)), (9, text(10))]
    kept, rebuilt = (reference.generate(sd, config, text(9), 15, LAT, LAT, 9, 9, sink_frames=3, prompts=prompts,
                                        rebuild_sink=rebuild) for rebuild in (False, True))
    assert first_differing_frame(kept, rebuilt) == 9
    assert torch.equal(run(15, seed=9, window=9, sink_frames=3),
                       run(15, seed=9, window=9, sink_frames=3, rebuild_sink=True))


def test_the_sink_position_shift_moves_the_video(monkeypatch):
    """15 frames, W = 6, S = 3: from chunk 2 (e = 9 > W) the sink is rotated at e - W + g; the planted
    variant that keeps it at its absolute positions must differ from there on."""
    shifted = run(15, seed=11, window=6, sink_frames=3)
    monkeypatch.setattr(reference, "SHIFT_SINK_POSITIONS", False)
    absolute = run(15, seed=11, window=6, sink_frames=3)
    assert first_differing_frame(shifted, absolute) == 6
    assert differs_in_every_frame_from(shifted, absolute, 6)


def test_a_window_differs_from_a_sink_window_of_the_same_size():
    """Rule 2 with S > 0 drops frames the sink-free window would see: the sink must change the video."""
    plain, sink = run(12, seed=12, window=6), run(12, seed=12, window=6, sink_frames=3)
    assert first_differing_frame(plain, sink) == 6
