"""An independent, dense reference of Wan2.1's VAE decoder, for the tests.

Written from Wan2.1's definition (wan/modules/vae.py: CausalConv3d, RMS_norm, ResidualBlock, AttentionBlock,
Resample, Decoder3d), not from stage 07's code: one process, the whole video at once, channels first, every
causal convolution padded with zeros on the past side, the 2x upsampling done as nearest 2x then a 3x3
convolution. It reads the weights by their checkpoint names, and its widths and layer count from them and from the
decoder's configuration; that those names and shapes are Wan2.1's own is tested apart (Wan2.1_VAE.pth's
names load strictly, the release's parameter count).

Wan2.1 decodes latent frame by latent frame with time caches; over a whole video that is one causal pass,
except that 'upsample3d' keeps the video's first latent frame as one frame and runs its time convolution
over the later frames only (its time cache starts as zeros at the second latent frame).
"""
import torch
import torch.nn.functional as F


def causal_conv(x, weight, bias):
    """x [B, C, T, H, W]: zeros before the first frame (kt - 1 of them), symmetric zeros in space."""
    kt, kh, kw = weight.shape[2:]
    return F.conv3d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)), weight, bias)


def rms_norm(x, gamma):
    """F.normalize over the channels (dim 1) * sqrt(C) * gamma."""
    return F.normalize(x, dim=1) * x.shape[1] ** 0.5 * gamma


def residual_block(sd, name, x):
    h = causal_conv(F.silu(rms_norm(x, sd[f"{name}.residual.0.gamma"])), sd[f"{name}.residual.2.weight"],
                    sd[f"{name}.residual.2.bias"])
    h = causal_conv(F.silu(rms_norm(h, sd[f"{name}.residual.3.gamma"])), sd[f"{name}.residual.6.weight"],
                    sd[f"{name}.residual.6.bias"])
    if f"{name}.shortcut.weight" in sd:
        x = causal_conv(x, sd[f"{name}.shortcut.weight"], sd[f"{name}.shortcut.bias"])
    return x + h


def per_frame(x):
    B, C, T, H, W = x.shape
    return x.transpose(1, 2).reshape(B * T, C, H, W)


def video_of(frames, B):
    BT, C, H, W = frames.shape
    return frames.reshape(B, BT // B, C, H, W).transpose(1, 2)


def attention_block(sd, name, x):
    """One head over each frame's positions."""
    B, C, T, H, W = x.shape
    frames = rms_norm(per_frame(x), sd[f"{name}.norm.gamma"])
    q, k, v = F.conv2d(frames, sd[f"{name}.to_qkv.weight"], sd[f"{name}.to_qkv.bias"]).chunk(3, dim=1)
    q, k, v = (t.flatten(2).transpose(1, 2)[:, None] for t in (q, k, v))               # [B*T, 1, HW, C]
    out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B * T, C, H, W)
    return x + video_of(F.conv2d(out, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"]), B)


def resample(sd, name, x, in_time):
    """'upsample3d' (in_time): two frames from each latent frame but the first, then both modes: nearest
    2x in space and a 3x3 convolution."""
    B = x.shape[0]
    if in_time and x.shape[2] > 1:
        rest = causal_conv(x[:, :, 1:], sd[f"{name}.time_conv.weight"], sd[f"{name}.time_conv.bias"])
        b, c2, t, h, w = rest.shape
        rest = rest.reshape(b, 2, c2 // 2, t, h, w)
        rest = torch.stack((rest[:, 0], rest[:, 1]), 3).reshape(b, c2 // 2, 2 * t, h, w)
        x = torch.cat([x[:, :, :1], rest], dim=2)
    frames = F.interpolate(per_frame(x), scale_factor=2.0, mode="nearest")
    frames = F.conv2d(frames, sd[f"{name}.resample.1.weight"], sd[f"{name}.resample.1.bias"], padding=1)
    return video_of(frames, B)


def decode(sd, config, z):
    """The whole video's latents z [B, 16, T, h, w] -> pixels [B, 3, 4T - 3, 8h, 8w] in [-1, 1]."""
    shape = (1, -1, 1, 1, 1)
    x = z * torch.tensor(config.latents_std, dtype=z.dtype).view(shape) + torch.tensor(
        config.latents_mean, dtype=z.dtype).view(shape)
    x = causal_conv(x, sd["conv2.weight"], sd["conv2.bias"])
    x = causal_conv(x, sd["decoder.conv1.weight"], sd["decoder.conv1.bias"])
    x = residual_block(sd, "decoder.middle.0", x)
    x = attention_block(sd, "decoder.middle.1", x)
    x = residual_block(sd, "decoder.middle.2", x)
    index = 0
    for level in range(config.levels):
        for _ in range(config.num_res_blocks + 1):
            x = residual_block(sd, f"decoder.upsamples.{index}", x)
            index += 1
        if level < config.levels - 1:
            x = resample(sd, f"decoder.upsamples.{index}", x, config.temporal_upsample[level])
            index += 1
    x = causal_conv(F.silu(rms_norm(x, sd["decoder.head.0.gamma"])), sd["decoder.head.2.weight"],
                    sd["decoder.head.2.bias"])
    return x.clamp(-1, 1)
