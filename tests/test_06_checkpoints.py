"""Stage 06 reads real checkpoints in every form people have: Self-Forcing's .pt (tested beside the
pipeline), Wan2.1's safetensors (one file or shards with an index), and a diffusers release."""
import importlib
import json
import os

import types

import pytest
import torch
from safetensors.torch import save_file

from support import weights
from support.harness import BadInput

sf = importlib.import_module("06_self_forcing_pipeline")
rope = importlib.import_module("01_rope")


def save_sharded(state, folder, name="diffusion_pytorch_model", shards=2):
    """state as `shards` safetensors files plus the *.safetensors.index.json that lists them."""
    os.makedirs(folder, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"{name}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, os.path.join(folder, file))
        weight_map.update({k: file for k in part})
    with open(os.path.join(folder, f"{name}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_every_form_loads_to_the_same_weights(tmp_path):
    source = sf.build_model("tiny", torch.float32, "cpu", 1).state_dict()
    single = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(single))
    save_sharded(source, str(tmp_path / "wan_shards"))
    diffusers_state = {weights.diffusers_name(k): v for k, v in source.items()}
    save_sharded(diffusers_state, str(tmp_path / "Wan-Diffusers" / "transformer"))
    for path in [single, tmp_path / "wan_shards", tmp_path / "wan_shards" / "diffusion_pytorch_model.safetensors.index.json",
                 tmp_path / "Wan-Diffusers", tmp_path / "Wan-Diffusers" / "transformer"]:
        target = sf.build_model("tiny", torch.float32, "cpu", 2, checkpoint=str(path))
        for name, value in source.items():
            assert torch.equal(target.state_dict()[name], value), (path, name)


def test_the_diffusers_names_round_trip_and_are_distinct():
    names = list(sf.build_model("tiny", torch.float32, "cpu", 0).state_dict())
    theirs = [weights.diffusers_name(n) for n in names]
    assert len(set(theirs)) == len(names)
    assert [weights.wan_name(t) for t in theirs] == names
    assert "scale_shift_table" in theirs and "blocks.1.attn2.to_out.0.weight" in theirs
    assert "blocks.0.norm2.weight" in theirs and "condition_embedder.time_proj.bias" in theirs


def test_diffusers_wan_model_has_exactly_these_names_and_computes_the_same():
    """Against diffusers' own WanTransformer3DModel (skipped without diffusers): the same names and shapes,
    and, with the weights carried over by name, the same flow for a 3-frame video (one chunk, no cache,
    where causal and bidirectional attention coincide)."""
    diffusers = pytest.importorskip("diffusers")
    preset = sf.PRESETS["tiny"]
    theirs = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=preset.num_heads,
        attention_head_dim=preset.dim // preset.num_heads, in_channels=16, out_channels=16,
        text_dim=preset.text_dim, freq_dim=preset.freq_dim, ffn_dim=preset.ffn_dim,
        num_layers=preset.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).double()
    ours = sf.build_model("tiny", torch.float64, "cpu", 3)
    for p in ours.parameters():     # norm weights start at ones and the head at random: make all of them matter
        torch.nn.init.normal_(p, std=0.2)
    mapped = {weights.diffusers_name(k): v for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(mapped, strict=True)

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 4, 6, generator=gen, dtype=torch.float64)
    text = torch.randn(1, preset.text_len, preset.text_dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        want = theirs(latents, torch.tensor([700.0], dtype=torch.float64), text, return_dict=False)[0]
        table = rope.RopeTable(preset.dim // preset.num_heads, 3, 2, 3, dtype=torch.float64)
        layout = sf.fused.ShardLayout(sf.sp.SPMesh(1, 1, local=True), table, 0, 3)
        state = types.SimpleNamespace(caches=[None] * 2, text_kv=ours.text_context(text))
        flow = ours(sf.patchify(latents), torch.full((1, 3), 700.0, dtype=torch.float64), layout, state)
    # diffusers embeds the timestep and builds its RoPE in float32, so agreement is float32's, not float64's
    got = sf.unpatchify(flow, 3, 4, 6)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("damage, message", [
    (lambda path: open(path, "r+b").truncate(os.path.getsize(path) // 2), "not a readable safetensors file"),
    (lambda path: open(path, "wb").write(b"\x00" * 64), "not a readable safetensors file"),
    (lambda path: os.remove(path), "is missing"),
])
def test_a_damaged_safetensors_checkpoint_is_named(tmp_path, damage, message):
    source = sf.build_model("tiny", torch.float32, "cpu", 1).state_dict()
    save_sharded(source, str(tmp_path))
    shard = tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"
    damage(str(shard))
    with pytest.raises(BadInput, match=message) as info:
        sf.build_model("tiny", torch.float32, "cpu", 1, checkpoint=str(tmp_path))
    assert str(shard) in str(info.value)
