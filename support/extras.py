"""The optional ends of the pipeline: a prompt through umT5 in (transformers, and a local Wan2.1 diffusers
release's text_encoder/ and tokenizer/), an mp4 out (imageio with imageio-ffmpeg), FlashAttention-4's
kernels (flash-attn-4). The core, its tests and CI never need these packages; without them the flags that
use them stop at once with one line."""
import importlib.util
import os
import queue
import threading

import torch
import torch.distributed as dist

from support import files

EXTRAS = "pip install transformers imageio imageio-ffmpeg"


def missing(packages):
    return [name for name in packages if importlib.util.find_spec(name) is None]


def flash_attention_4_problem(dtype, head_dim):
    """What stops FlashAttention-4 (the flash-attn-4 package's CuTe kernels) here (a message), or None."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return "--attention flash-attn-4 needs a Hopper or newer GPU (compute capability 9.0+)"
    if dtype not in (torch.bfloat16, torch.float16) or head_dim % 8 or not 8 <= head_dim <= 128:
        return (f"--attention flash-attn-4 runs bfloat16 or float16 heads of 8-128 channels (multiples of "
                f"8), not {dtype} heads of {head_dim}")
    if missing(["flash_attn"]) or missing(["flash_attn.cute"]):
        return "--attention flash-attn-4 needs the optional package flash-attn-4: pip install flash-attn-4"
    return None


def flash_attention_4():
    """FlashAttention-4's forward as attend(q, k, v) -> (out, log-sum-exp) on [B, H, S, D] and [B, H, S]."""
    from flash_attn.cute import flash_attn_func

    def attend(q, k, v):
        out, lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),   # [B, S, H, D]
                                   return_lse=True)
        return out.transpose(1, 2), lse
    return attend


def extras_problem(prompt, wan_folder, text_embedding, video=None):
    """What stops --prompt (umT5 of --wan-folder) or an mp4 --video (a message), or None."""
    if prompt and text_embedding:
        return "give --prompt or --text-embedding, not both"
    needed = (["transformers"] if prompt else []) + (["imageio", "imageio_ffmpeg"] if video else [])
    absent = missing(needed)
    if absent:
        flags = " and ".join(f for f, on in (("--prompt", prompt), ("--video", video)) if on)
        verb = "needs" if " and " not in flags else "need"
        return f"{flags} {verb} the optional packages {', '.join(absent)}: {EXTRAS}"
    if not prompt:
        return None
    if not wan_folder:
        return "--prompt needs --wan-folder: a local Wan2.1 diffusers release (text_encoder/, tokenizer/)"
    absent = [name for name in ("text_encoder", "tokenizer")
              if not os.path.isdir(os.path.join(wan_folder, name))]
    if absent:
        return f"--wan-folder {wan_folder} has no {' or '.join(absent)} folder"
    return None


@torch.no_grad()
def encode_prompt(wan_folder, prompt, text_len, device):
    """umT5 features [1, L, 4096] of a prompt, made as diffusers' WanPipeline makes them: whitespace
    squeezed, the encoder's last hidden state, cut to the prompt's own L tokens (the model pads to
    text_len)."""
    from transformers import AutoTokenizer, UMT5EncoderModel
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(wan_folder, "tokenizer"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoder = UMT5EncoderModel.from_pretrained(os.path.join(wan_folder, "text_encoder"), torch_dtype=dtype)
    tokens = tokenizer([" ".join(prompt.split())], padding="max_length", max_length=text_len, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    encoder = encoder.to(device).eval()
    hidden = encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
    return hidden[:, :int(tokens.attention_mask.sum())].float().cpu()


def prompt_features(wan_folder, prompt, text_len, device, mesh):
    """Rank 0 encodes the prompt; every rank gets the features (one small broadcast)."""
    features = [encode_prompt(wan_folder, prompt, text_len, device) if mesh.rank == 0 else None]
    if mesh.world_size > 1:
        dist.broadcast_object_list(features, src=0)
    return features[0]


def to_uint8(pixels):
    """Pixels [3, T, H, W] in [-1, 1] -> what a viewer sees: [T, H, W, 3] bytes."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)


class VideoWriter:
    """Frames into an mp4 as they arrive: write(pixels [3, T, H, W] in [-1, 1]) hands them to a thread that
    turns them into 8-bit RGB and encodes them, so the caller goes on at once (with the GPU's next chunk).

    The mp4 is fragmented, a keyframe and a fragment every second: a stream that is cut off (Ctrl-C, a full
    disk, a dead rank, a killed process) leaves a playable file of every second written before it. At most
    `pending` writes wait for the encoder, so a stream longer than memory stays flat: if the encoder falls
    behind, write() waits for it."""

    def __init__(self, path, fps=16, pending=8):
        import imageio.v2 as imageio
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # x264's "veryfast" preset: the encoder keeps up with the frames on one thread (its default,
        # "medium", fell a second behind a 3 s video). "zerolatency": no lookahead, no B-frames, threads
        # within a frame, so each frame leaves the encoder as it comes and the file is done soon after the
        # last chunk
        fragments = ["-g", str(fps), "-movflags", "frag_keyframe+empty_moov+default_base_moof",
                     "-flush_packets", "1"]
        self.writer = imageio.get_writer(path, fps=fps, macro_block_size=1,
                                         ffmpeg_params=["-preset", "veryfast", "-tune", "zerolatency",
                                                        *fragments])
        self.path, self.count, self.error = path, 0, None
        self.queue = queue.Queue(maxsize=pending)
        self.thread = threading.Thread(target=self._encode, daemon=True)
        self.thread.start()
        files.on_interrupt.append(self.stop)

    def write(self, pixels):
        self.queue.put(pixels)

    def _encode(self):
        while (pixels := self.queue.get()) is not None:
            try:
                for frame in to_uint8(pixels).numpy():                                       # [H, W, 3] each
                    self.writer.append_data(frame)
                    self.count += 1
            except Exception as e:  # noqa: BLE001 -- reported by close(), in the caller's thread
                self.error = self.error or e

    def close(self):
        """Wait for every frame to be encoded, and close the file. Returns what went wrong (a one-line
        message), or None: the caller reports it on every rank, after keeping the frames elsewhere."""
        self.queue.put(None)
        self.thread.join()
        try:
            self.writer.close()
        except OSError as e:
            self.error = self.error or e
        files.on_interrupt.remove(self.stop)
        return self.error and self.failure()

    def failure(self):
        """What went wrong, in a line."""
        return (f"--video {self.path}: writing failed ({self.error}); the file keeps the frames encoded "
                f"before it ({self.count})")

    def stop(self, seconds=1.0):
        """An interrupted run: the frames waiting are handed to the encoder (for `seconds` at most), which
        finishes the file once this process has gone. Returns what the stop's line says of the file."""
        try:
            self.queue.put(None, timeout=seconds)
            self.thread.join(timeout=seconds)
        except queue.Full:
            pass
        return f"{self.path} keeps the {self.count} frames made before the stop (playable)"
