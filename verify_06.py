"""Checks stage 06 on the GPU(s) of a job: CUDA-graph latents == eager latents, and with several ranks the
job's latents == one GPU's (rank 0 runs the single-GPU reference alone while the others wait), in float32
(to 1e-5) and bfloat16 (within bfloat16's own distance from float32), whatever --dtype says. Exits non-zero
on failure. On CPU the tests prove the same (python -m pytest).

Uses
    03_sequence_parallel: SPMesh
    06_self_forcing_pipeline: parser, set_up, build_model, generate, RunOptions, attention_backends,
        exchange_name, finish

Run
    python verify_06.py --preset wan-1.3b --frames 9
    torchrun --nproc_per_node=2 verify_06.py --preset wan-1.3b --frames 9
"""
import importlib

import torch
import torch.distributed as dist

from bench_06 import first_chunk_forward
from support.harness import run_main
from support.timing import relative_rms
from support.weights import load_text

sp = importlib.import_module("03_sequence_parallel")
sf = importlib.import_module("06_self_forcing_pipeline")


def parser():
    p = sf.parser(__doc__)
    p.checks.append(lambda args: None if torch.cuda.is_available() else
                    "verify_06.py compares GPU runs; on CPU the tests prove the same (python -m pytest)")
    return p


def main(argv=None):
    run = sf.set_up(parser().parse_args(argv), "verify_06", needs_gpus="verify_06.py")
    a, mesh, video, device = run.args, run.mesh, run.video, run.device
    bf16, f32 = (sf.build_model(a.preset, d, device, a.seed, mode=a.mode, key_parts=a.key_parts)
                 for d in (torch.bfloat16, torch.float32))
    text = load_text(a.text_embedding, bf16.config, 1, a.seed)
    latents = lambda model, on, graphs: sf.generate(model, text, video, on, a.seed,
                                                    sf.RunOptions(graphs, a.graph_timeout))
    graph16, eager16 = latents(bf16, mesh, True), latents(bf16, mesh, False)
    graph32, eager32 = latents(f32, mesh, True), latents(f32, mesh, False)
    one16, one32 = graph16, graph32
    # one forward (first chunk, empty cache) both ways: shows whether a single pass already differs
    with torch.no_grad(), sf.attention_backends(device):
        flows = [first_chunk_forward(run, bf16, text, graphs, 937.5)().clone() for graphs in (True, False)]
    if mesh.world_size > 1:
        if mesh.rank == 0:
            one = sp.SPMesh(1, 1, device, local=True)
            one16, one32 = latents(bf16, one, True), latents(f32, one, True)
        dist.barrier()
    if mesh.rank == 0:
        report(run, flows, graph16, eager16, graph32, eager32, one16, one32)
    sf.finish(a.graph_timeout)


def report(run, flows, graph16, eager16, graph32, eager32, one16, one32):
    """float32 shows that two ways compute the same function (1e-5: reordered sums over 14 forwards). In
    bfloat16 a library may pick another kernel (another summation order) for a captured call, and 14 forwards
    of a random-weight model amplify that: bfloat16 runs must be no further apart than bfloat16 is from
    float32."""
    mesh, video = run.mesh, run.video
    bf16_noise = relative_rms(one16, one32)
    rows = [("one forward, CUDA graph vs eager, bfloat16", relative_rms(*flows), float("inf")),
            ("CUDA graph vs eager, float32", relative_rms(graph32, eager32), 1e-5),
            ("CUDA graph vs eager, bfloat16", relative_rms(graph16, eager16), bf16_noise)]
    if mesh.world_size > 1:
        rows += [(f"{mesh.world_size} GPUs vs 1 GPU, float32", relative_rms(graph32, one32), 1e-5),
                 (f"{mesh.world_size} GPUs vs 1 GPU, bfloat16", relative_rms(graph16, one16), bf16_noise)]
    rows.append(("(1 GPU: bfloat16 vs float32)", bf16_noise, float("inf")))
    print(f"verify_06: {run.args.preset}, {mesh.world_size} x {torch.cuda.get_device_name()} (ulysses "
          f"{mesh.ulysses_degree} x ring {mesh.ring_degree}), {video.frames} latent frames at "
          f"{video.height}x{video.width}, exchange {sf.exchange_name(mesh)}; relative RMS of the latents")
    failed = [name for name, err, bound in rows if not err <= bound]
    for name, err, bound in rows:
        bound_text = f"(bound {bound:.1e})" if bound != float("inf") else ""
        print(f"  {name:<42s} {err:9.2e}   {bound_text}{'  FAILED' if name in failed else ''}")
    if failed:
        raise SystemExit(f"verify_06 failed: {failed}")


if __name__ == "__main__":
    run_main(main)
