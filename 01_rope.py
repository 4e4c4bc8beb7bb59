"""Stage 01 -- Wan2.1's 3D rotary position embedding, and a precomputed table of it.

The idea
    A video latent of F frames x H rows x W columns becomes F*H*W tokens, ordered (frame, row, column).
    Wan2.1 rotates every query/key head vector (head_dim d = 128) by angles that depend on the token's
    (frame, row, column): the d/2 = 64 consecutive channel pairs (2i, 2i+1) are complex numbers, split
    into a time part of 64 - 2*(64//3) = 22 pairs and height / width parts of 64//3 = 21 pairs each.
    Each part uses the ordinary 1-D RoPE frequencies theta^(-2i/part_dim), theta = 10000.

    The causal (Self-Forcing) variant takes `start_frame`: a chunk whose first latent frame is global
    frame s uses time positions s..s+F-1. This global time index is what later stages reproduce per rank.

    Because tokens are ordered (frame, row, column), the rotation of any contiguous token range -- a
    chunk, or one rank's shard of a chunk -- is a contiguous run of rows of one table built once per video
    shape (the paper's "RoPE precomputation"). A row is a token's time part beside its height/width part,
    so `RopeTable` keeps the two apart: time rows [frames, 22 pairs] and frame rows [H*W, 42 pairs]. A
    chunk's rows are a slice of each, side by side, and the table costs kilobytes, not the 17 MB per 21
    frames at 480x832 of one row per token.

Positions that never run out
    Upstream's table has 1024 time rows, and a longer stream fails (Causal-Forcing issue #2). Here a time
    position is the global frame index with no upper bound: past its `frames` time rows the table makes a
    chunk's time rows from the same formula when the chunk starts (3 frames x 22 angles, once per chunk,
    shared by every layer and step), so every rank still rotates its own tokens from the global time index
    with no communication. q.k depends only on position differences, so what a long stream must bound is
    the distance between a query and the keys it sees: a window does that (stage 02), and sink frames that
    every chunk keeps seeing sit just before the window (`rotate_time` moves their keys by whole frames:
    R(f + d) = R(d) R(f)), as LongLive's "infinity" mode and Rolling Forcing place theirs. The alternative,
    sinks at their absolute frames 0..S-1, costs nothing per chunk but lets the sink's distance grow
    without bound, far past the 21 frames the model was trained on; moving the sink costs one rotation of
    S frames of keys per layer and chunk (3 frames x 1560 tokens x 12 heads x 128 at Wan-1.3B shapes).

Shapes
    q, k:             [batch, tokens, heads, head_dim]
    RopeTable.rows    cos, sin [tokens, head_dim // 2]: time pairs, then height, then width pairs

Two ways to rotate, which must agree:
    causal_rope(x, grid, start_frame)       computes the angles on the fly for a chunk, as upstream does
                                            (https://github.com/guandeh17/Self-Forcing causal_model.py)
    apply_rope(x, *table.rows(first, end))  slices the precomputed table

Run
    python 01_rope.py                 checks norm preservation, relative positions, table == on-the-fly
                                      (past the table's time rows too), chunk(start_frame=s) == frames s..
                                      of the whole video, and a key moved by rotate_time
    torchrun --nproc_per_node=2 01_rope.py   every rank runs the same checks, rank 0 prints
"""
import torch

from support.harness import Parser, check, is_rank_zero, positive, run_main

THETA = 10000.0
MAX_TIME_POSITIONS = 1024  # upstream's table rows per axis; here later frames are computed as needed


def head_dim_problem(head_dim):
    """What is wrong with a head_dim for the 3-axis split (a message), or None."""
    if head_dim % 2 != 0 or head_dim < 6:
        return f"head_dim must be even and >= 6 for the 3-axis RoPE split, got {head_dim}"
    return None


def axis_pairs(head_dim):
    """Complex pairs given to (time, height, width), as Wan2.1 splits head_dim."""
    problem = head_dim_problem(head_dim)
    if problem:
        raise ValueError(problem)
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def axis_angles(positions, num_pairs, theta=THETA):
    """Angles [len(positions), num_pairs] of 1-D RoPE: position * theta^(-2i / (2*num_pairs)), float64."""
    inv_freq = 1.0 / theta ** (torch.arange(0, 2 * num_pairs, 2, dtype=torch.float64) / (2 * num_pairs))
    return torch.outer(positions.to(torch.float64), inv_freq)


def grid_angles(head_dim, frame_positions, height, width, theta=THETA):
    """Angles [len(frame_positions) * height * width, head_dim // 2], tokens in (frame, row, column) order."""
    t_pairs, h_pairs, w_pairs = axis_pairs(head_dim)
    frames = len(frame_positions)
    t = axis_angles(frame_positions, t_pairs, theta)                    # [frames, t_pairs]
    h = axis_angles(torch.arange(height), h_pairs, theta)               # [height, h_pairs]
    w = axis_angles(torch.arange(width), w_pairs, theta)                # [width, w_pairs]
    angles = torch.cat([
        t[:, None, None, :].expand(frames, height, width, t_pairs),
        h[None, :, None, :].expand(frames, height, width, h_pairs),
        w[None, None, :, :].expand(frames, height, width, w_pairs),
    ], dim=-1)                                                          # [frames, height, width, pairs]
    return angles.reshape(frames * height * width, head_dim // 2)


def apply_rope(x, cos, sin):
    """Rotate x [batch, tokens, heads, head_dim] by per-token cos/sin [tokens, head_dim // 2].

    Channel pairs (2i, 2i+1) are one complex number (interleaved layout, as in Wan2.1). The rotation runs
    in the wider of x's and the table's dtype and the result is cast back to x's dtype.
    """
    if x.dim() != 4 or cos.shape != (x.shape[1], x.shape[3] // 2) or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: x must be [batch, tokens, heads, head_dim] and cos/sin "
                         f"[tokens, head_dim/2]; got x {tuple(x.shape)}, cos {tuple(cos.shape)}")
    compute = torch.promote_types(x.dtype, cos.dtype)
    real, imag = x.to(compute).unflatten(-1, (-1, 2)).unbind(-1)        # each [B, N, H, D/2]
    cos, sin = cos[:, None, :].to(compute), sin[:, None, :].to(compute)  # [N, 1, D/2]
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def causal_rope(x, grid, start_frame, theta=THETA):
    """Rotate a whole chunk x [B, F*H*W, heads, head_dim] whose first frame is global frame `start_frame`.

    Angles are built on the fly for this chunk and the rotation runs in float64, as upstream does. This
    is the plain reference that the table and every sharded version must match.
    """
    frames, height, width = grid
    if x.shape[1] != frames * height * width:
        raise ValueError(f"causal_rope: x has {x.shape[1]} tokens but grid {tuple(grid)} has "
                         f"{frames * height * width}")
    check_time_range(start_frame, frames)
    angles = grid_angles(x.shape[-1], torch.arange(start_frame, start_frame + frames), height, width, theta)
    angles = angles.to(x.device)
    return apply_rope(x, angles.cos(), angles.sin())


def check_time_range(start_frame, num_frames):
    if start_frame < 0 or num_frames < 1:
        raise ValueError(f"frames {start_frame}..{start_frame + num_frames - 1}: time positions start at 0")


def rotate_time(x, frames, theta=THETA):
    """x [..., head_dim] (rotated at some time position f) -> the same rotated at f + frames: its time
    pairs turn by frames * theta^(-2i/44); height and width pairs stay. Runs in float32 or wider."""
    t_pairs = axis_pairs(x.shape[-1])[0]
    angles = axis_angles(torch.tensor([frames]), t_pairs, theta)[0].to(x.device)        # [t_pairs]
    compute = torch.promote_types(x.dtype, torch.float32)
    real, imag = x[..., :2 * t_pairs].to(compute).unflatten(-1, (-1, 2)).unbind(-1)   # each [..., t_pairs]
    cos, sin = angles.cos().to(compute), angles.sin().to(compute)
    turned = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)
    return torch.cat([turned.to(x.dtype), x[..., 2 * t_pairs:]], dim=-1)


class RopeTable:
    """cos/sin of a (frames, height, width) grid, built once: time rows [frames, t_pairs] and frame rows
    [height * width, h_pairs + w_pairs]. A token range's rows are a slice of each, side by side; time
    positions past `frames` are made from the same formula when asked for (bit-identical)."""

    def __init__(self, head_dim, frames, height, width, theta=THETA, dtype=torch.float32, device="cpu"):
        t_pairs, h_pairs, w_pairs = axis_pairs(head_dim)
        self.head_dim, self.frames, self.height, self.width = head_dim, frames, height, width
        self.theta, self.dtype, self.device = theta, dtype, torch.device(device)
        self.tokens_per_frame = height * width
        time = axis_angles(torch.arange(frames), t_pairs, theta)                        # [frames, t_pairs]
        place = grid_angles(head_dim, torch.zeros(1), height, width, theta)[:, t_pairs:]  # [H*W, h + w pairs]
        self.time_cos, self.time_sin = (f(time).to(device=device, dtype=dtype) for f in (torch.cos, torch.sin))
        self.place_cos, self.place_sin = (f(place).to(device=device, dtype=dtype) for f in (torch.cos, torch.sin))

    def time_rows(self, first_frame, end_frame):
        """cos, sin [end - first, t_pairs] of time positions first..end-1: the table's, or made past it."""
        if end_frame <= self.frames:
            return self.time_cos[first_frame:end_frame], self.time_sin[first_frame:end_frame]
        angles = axis_angles(torch.arange(first_frame, end_frame), self.time_cos.shape[1], self.theta)
        return (f(angles).to(device=self.device, dtype=self.dtype) for f in (torch.cos, torch.sin))

    def rows(self, first_token, end_token):
        """(cos, sin) [end - first, head_dim / 2] of global tokens first_token..end_token-1."""
        if not 0 <= first_token <= end_token:
            raise ValueError(f"tokens {first_token}..{end_token - 1} are not a token range")
        tpf = self.tokens_per_frame
        first_frame, end_frame = first_token // tpf, -(-end_token // tpf)
        frames = end_frame - first_frame
        rows = []
        for time, place in zip(self.time_rows(first_frame, end_frame), (self.place_cos, self.place_sin)):
            whole = torch.cat([time[:, None].expand(frames, tpf, time.shape[1]),
                               place[None].expand(frames, tpf, place.shape[1])], dim=-1)   # [F, H*W, D/2]
            rows.append(whole.flatten(0, 1)[first_token - first_frame * tpf:end_token - first_frame * tpf])
        return tuple(rows)

    def chunk_rows(self, start_frame, num_frames, shard=None):
        """(cos, sin) of a chunk of `num_frames` frames starting at global `start_frame`, or of the token
        sub-range shard = (first, end), counted inside the chunk, that one rank holds."""
        check_time_range(start_frame, num_frames)
        chunk_first = start_frame * self.tokens_per_frame
        first, end = shard if shard is not None else (0, num_frames * self.tokens_per_frame)
        if not 0 <= first <= end <= num_frames * self.tokens_per_frame:
            raise ValueError(f"shard {shard} is outside a chunk of {num_frames * self.tokens_per_frame} "
                             "tokens")
        return self.rows(chunk_first + first, chunk_first + end)


def head_dim_flag(args):
    """The stages' --head-dim check (a Parser `check`): a message naming the flag, or None."""
    problem = head_dim_problem(args.head_dim)
    return problem and f"--head-dim: {problem}"


def main():
    parser = Parser(__doc__, check=head_dim_flag)
    parser.add_argument("--frames", type=positive, default=6, help="latent frames (>= 3)")
    parser.add_argument("--height", type=positive, default=4)
    parser.add_argument("--width", type=positive, default=5)
    parser.add_argument("--heads", type=positive, default=3)
    parser.add_argument("--head-dim", type=positive, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.frames, args.height, args.width) < 3:
        parser.error("--frames, --height and --width must be >= 3 "
                     "(the relative-position check uses token (2, 2, 2))")
    
    F, H, W, D = args.frames, args.height, args.width, args.head_dim
    gen = torch.Generator().manual_seed(args.seed)
    q = torch.randn(1, F * H * W, args.heads, D, dtype=torch.float64, generator=gen)
    k = torch.randn(1, F * H * W, args.heads, D, dtype=torch.float64, generator=gen)
    table = RopeTable(D, F, H, W, dtype=torch.float64)
    tol = 1e-12

    whole = causal_rope(q, (F, H, W), 0)
    errs = {"norms preserved": check("norm", whole.norm(dim=-1), q.norm(dim=-1), tol)}
    errs["table == on-the-fly"] = check("table", apply_rope(q, *table.chunk_rows(0, F)), whole, tol)
    short = RopeTable(D, 1, H, W, dtype=torch.float64)              # one time row: frames 1.. made as asked
    errs["past the table's time rows == on-the-fly"] = check(
        "past", apply_rope(q, *short.chunk_rows(0, F)), whole, tol)
    frame = q[:, :H * W]                                            # one frame's tokens, moved 1 -> F + 5
    errs["rotate_time(frame 1, F + 4) == frame F + 5"] = check(
        "moved", rotate_time(causal_rope(frame, (1, H, W), 1), F + 4), causal_rope(frame, (1, H, W), F + 5), tol)
    s, n = F // 3, max(1, F // 3)
    chunk = q[:, s * H * W:(s + n) * H * W]
    errs[f"chunk start_frame={s} == frames {s}.. of the video"] = check(
        "chunk", causal_rope(chunk, (n, H, W), s), whole[:, s * H * W:(s + n) * H * W], tol)
    # q.k after rotation depends only on the position difference: the same q and k vectors placed at
    # tokens (0,0,0)/(1,1,1) and at (1,1,1)/(2,2,2) give the same dot product.
    same_q = apply_rope(q[:, :1].expand_as(q), *table.chunk_rows(0, F))
    same_k = apply_rope(k[:, :1].expand_as(k), *table.chunk_rows(0, F))
    token = lambda f, h, w: (f * H + h) * W + w
    dot = lambda i, j: (same_q[:, i] * same_k[:, j]).sum(-1)
    errs["q.k depends on position difference only"] = check(
        "relative", dot(token(1, 1, 1), token(2, 2, 2)), dot(token(0, 0, 0), token(1, 1, 1)), 1e-10)
    if is_rank_zero():                      # no process group needed: every rank checks the same
        print(f"01_rope: grid {F}x{H}x{W}, head_dim {D} = time/height/width pairs {axis_pairs(D)}")
        for name, err in errs.items():
            print(f"  {name:<45s} max error {err:.1e}")


if __name__ == "__main__":
    run_main(main)
