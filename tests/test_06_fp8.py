"""The opt-in FP8 path of the DiT's linear layers: each layer is its own definition (e4m3 values times their
scales, float32 accumulation), close to the layer it replaces, and sharded equals one process."""
import importlib

import torch

from rank_pool import get_pool
from support.weights import load_text

sp = importlib.import_module("03_sequence_parallel")
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


def fp8_latents(mesh_shape, local=False):
    mesh = sp.SPMesh(1, 1, local=True) if local else sp.SPMesh.get(*mesh_shape)
    model = sf.build_model("tiny", torch.float32, "cpu", 3, fp8=True)
    return sf.generate(model, load_text(None, model.config, 1, 3), sf.VideoSpec(6, 32, 48, window_frames=6), mesh, 3)


def test_fp8_is_opt_in_and_n_ranks_equal_one_process():
    assert all(isinstance(m, torch.nn.Linear) for m in sf.build_model("tiny", torch.float32, "cpu", 0).blocks[0].ffn
               if not isinstance(m, torch.nn.GELU))
    fp8 = sf.build_model("tiny", torch.float32, "cpu", 0, fp8=True)
    assert isinstance(fp8.blocks[0].self_attn.q, sf.Fp8Linear) and isinstance(fp8.blocks[1].ffn[2], sf.Fp8Linear)
    want = fp8_latents(None, local=True)
    for got in get_pool(4).run(fp8_latents, (2, 2)):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
