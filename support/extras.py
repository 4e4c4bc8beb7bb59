"""The optional ends of the pipeline: a prompt through umT5 in (transformers, and a local Wan2.1 diffusers
release's text_encoder/ and tokenizer/), an mp4 out (imageio with imageio-ffmpeg). The core, its tests and
CI never need these packages; without them the flags that use them stop at once with one line."""
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


def extras_problem(prompt, wan_folder, text_embedding, video=None):
    """What stops --prompt (umT5 of --wan-folder) or an mp4 --video (a message), or None."""
    if prompt and text_embedding:
        return "give --prompt or --text-embedding, not both"
    needed = (["transformers"] if prompt else []) + (["imageio", "imageio_ffmpeg"] if video else [])
    absent = missing(needed)
    if absent:
        flags = " and ".join(f for f, on in (("--prompt", prompt), ("--video", video)) if on)
        return f"{flags} need{'s' if ' and ' not in flags else ''} the optional packages {', '.join(absent)}: {EXTRAS}"
    if not prompt:
        return None
    if not wan_folder:
        return "--prompt needs --wan-folder: a local Wan2.1 diffusers release (text_encoder/, tokenizer/)"
    absent = [name for name in ("text_encoder", "tokenizer") if not os.path.isdir(os.path.join(wan_folder, name))]
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
    turns them into 8-bit RGB and encodes them, so the caller goes on at once (with the GPU's next chunk)."""

    def __init__(self, path, fps=16):
        import imageio.v2 as imageio
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # written under another name, renamed when whole (a special file, /dev/null, in place)
        root, ext = os.path.splitext(path)
        self.partial = path if os.path.exists(path) and not os.path.isfile(path) else f"{root}.partial{os.getpid()}{ext}"
        files.unfinished.add(self.partial)
        # x264's "veryfast" preset: the encoder keeps up with the frames on one thread (its default,
        # "medium", fell a second behind a 3 s video)
        self.writer = imageio.get_writer(self.partial, fps=fps, macro_block_size=1,
                                         ffmpeg_params=["-preset", "veryfast"])
        self.path, self.count, self.error = path, 0, None
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=self._encode, daemon=True)
        self.thread.start()

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
            if self.error is None and self.partial != self.path:
                os.replace(self.partial, self.path)
        except OSError as e:
            self.error = self.error or e
        files.unfinished.discard(self.partial)
        if self.partial != self.path and os.path.exists(self.partial):
            os.remove(self.partial)
        return self.error and f"--video {self.path}: writing failed ({self.error})"
