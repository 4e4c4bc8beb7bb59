"""Stage 01 -- Wan2.1's 3D rotary position embedding, and a precomputed table of it.

The idea
    F latent frames x H rows x W columns are F*H*W tokens in (frame, row, column) order. Wan2.1 rotates each
    query/key head vector (d = 128) by its token's position: its 64 channel pairs (2i, 2i+1) are complex
    numbers, 64 - 2*(64//3) = 22 for time and 21 each for height and width, with 1-D RoPE frequencies
    10000^(-2i/part_dim). A chunk from global frame s (`start_frame`) has time positions s..s+F-1. Any token
    range is rows of one table per video shape: `RopeTable` keeps time rows [frames, 22] and frame rows
    [H*W, 42] and slices both: kilobytes, not the 17 MB of a row per token (21 frames at 480x832).
Positions that never run out
    Upstream's table has 1024 time rows, so longer streams fail. Here time is the unbounded global frame
    index: past `frames` the table computes a chunk's time rows (3 frames x 22 angles a chunk, bit-identical,
    no communication). q.k depends only on position differences: a window (stage 02) bounds them, and sink
    frames move to sit just before it (rotate_time: R(f + d) = R(d) R(f)), as in LongLive and Rolling Forcing.
    Sinks kept at frames 0..S-1 cost nothing but drift far past the 21 trained frames; moving them costs
    rotating S frames of keys per layer and chunk (3 x 1560 tokens x 12 heads x 128 at Wan-1.3B).
Shapes
    q, k: [batch, tokens, heads, head_dim]; RopeTable.rows: cos, sin [tokens, head_dim // 2]. causal_rope (on
    the fly, float64, as Self-Forcing's causal_model.py) and apply_rope(x, *table.rows(first, end)) agree.
Run
    python 01_rope.py      checks norms, relative positions, table == on-the-fly (past its rows too), a chunk
                           from s == frames s.. of the video, rotate_time
    torchrun --nproc_per_node=2 01_rope.py   every rank runs the same checks, rank 0 prints"""
import torch

from support.harness import Parser, check, is_rank_zero, non_negative, positive, run_main

THETA = 10000.0
MAX_TIME_POSITIONS = 1024  # upstream's table rows per axis; here later frames are computed as needed


def head_dim_problem(head_dim):
    """A message saying what is wrong with head_dim for the 3-axis split, or None."""
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
    steps = torch.arange(0, 2 * num_pairs, 2, dtype=torch.float64, device=positions.device)
    inv_freq = 1.0 / theta ** (steps / (2 * num_pairs))                # on positions' device: no copy
    return torch.outer(positions.to(torch.float64), inv_freq)          # [len(positions), num_pairs], float64


def grid_angles(head_dim, frame_positions, height, width, theta=THETA):
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
    return angles.reshape(frames * height * width, head_dim // 2)      # [tokens, pairs], (frame, row, column)


def apply_rope(x, cos, sin):
    """Pairs (2i, 2i+1) interleaved, as Wan2.1; computes in the wider of x's and cos's dtypes, returns x's."""
    if x.dim() != 4 or cos.shape != (x.shape[1], x.shape[3] // 2) or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: x must be [batch, tokens, heads, head_dim] and cos/sin "
                         f"[tokens, head_dim/2]; got x {tuple(x.shape)}, cos {tuple(cos.shape)}")
    compute = torch.promote_types(x.dtype, cos.dtype)
    real, imag = x.to(compute).unflatten(-1, (-1, 2)).unbind(-1)        # each [B, N, H, D/2]
    cos, sin = cos[:, None, :].to(compute), sin[:, None, :].to(compute)  # [N, 1, D/2]
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def causal_rope(x, grid, start_frame, theta=THETA):
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
    """x [..., head_dim] rotated at time f -> at f + frames (only the time pairs turn); float32 or wider."""
    t_pairs = axis_pairs(x.shape[-1])[0]
    at = torch.full((1,), frames, dtype=torch.float64, device=x.device)     # made there: a copy from the
    angles = axis_angles(at, t_pairs, theta)[0]                              # host would wait for the GPU
    compute = torch.promote_types(x.dtype, torch.float32)
    real, imag = x[..., :2 * t_pairs].to(compute).unflatten(-1, (-1, 2)).unbind(-1)  # each [..., t_pairs]
    cos, sin = angles.cos().to(compute), angles.sin().to(compute)
    turned = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)
    return torch.cat([turned.to(x.dtype), x[..., 2 * t_pairs:]], dim=-1)


class RopeTable:

    def __init__(self, head_dim, frames, height, width, theta=THETA, dtype=torch.float32, device="cpu"):
        t_pairs, h_pairs, w_pairs = axis_pairs(head_dim)
        self.head_dim, self.frames, self.height, self.width = head_dim, frames, height, width
        self.theta, self.dtype, self.device = theta, dtype, torch.device(device)
        self.tokens_per_frame = height * width
        time = axis_angles(torch.arange(frames), t_pairs, theta)                        # [frames, t_pairs]
        place = grid_angles(head_dim, torch.zeros(1), height, width, theta)[:, t_pairs:]  # [H*W, h + w pairs]
        self.time_cos, self.time_sin = (f(time).to(device=device, dtype=dtype)
                                        for f in (torch.cos, torch.sin))
        self.place_cos, self.place_sin = (f(place).to(device=device, dtype=dtype)
                                          for f in (torch.cos, torch.sin))

    def time_rows(self, first_frame, end_frame):
        """cos, sin [end - first, t_pairs] of time positions first..end-1, made past the table's rows."""
        if end_frame <= self.frames:
            return self.time_cos[first_frame:end_frame], self.time_sin[first_frame:end_frame]
        at = torch.arange(first_frame, end_frame, device=self.device)          # made there, as rotate_time's
        angles = axis_angles(at, self.time_cos.shape[1], self.theta)
        return (f(angles).to(self.dtype) for f in (torch.cos, torch.sin))

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
        """(cos, sin) of a chunk from global `start_frame`, or of its token range shard = (first, end)."""
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
    parser = Parser(__doc__, head_dim_flag)
    parser.add_argument("--frames", type=positive, default=6, help="latent frames (>= 3)")
    parser.add_argument("--height", type=positive, default=4)
    parser.add_argument("--width", type=positive, default=5)
    parser.add_argument("--heads", type=positive, default=3)
    parser.add_argument("--head-dim", type=positive, default=128)
    parser.add_argument("--seed", type=non_negative, default=0)
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
        "moved", rotate_time(causal_rope(frame, (1, H, W), 1), F + 4), causal_rope(frame, (1, H, W), F + 5),
        tol)
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
