"""Weights from the files people have, under Wan2.1's original names, loaded strictly.

Forms read: a torch .pt (a plain state dict, or Self-Forcing's {'generator' | 'generator_ema': ...});
safetensors (one file, shards with their *.index.json, or a folder of either); a diffusers release (its
top folder, or the component's folder), whose names are renamed to the original ones. Every problem is a
BadInput naming the file, or the key where a key is at fault."""
import json
import os

import torch

from support.harness import BadInput

# Wan2.1's original DiT names for diffusers' WanTransformer3DModel names: the inverse of the renaming in
# diffusers' scripts/convert_wan_to_diffusers.py. Whole dot-separated segments are matched; the first match
# wins.
DIFFUSERS_TO_WAN = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
    *((f"attn{i}.{theirs}", f"{ours}.{mine}") for i, ours in ((1, "self_attn"), (2, "cross_attn"))
      for theirs, mine in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"),
                           ("norm_q", "norm_q"), ("norm_k", "norm_k"))),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm3"),                    # the affine norm before cross-attention
    ("scale_shift_table", "modulation"),   # a block's; the model's own (the head's) is named below
)
DIFFUSERS_TO_WAN_WHOLE = {"scale_shift_table": "head.modulation"}


def vae_diffusers_to_wan(levels, blocks_per_level):
    """The Wan VAE decoder's original names for diffusers' AutoencoderKLWan names (the inverse of the same
    conversion script): up level i's resnet j is upsamples[i * (blocks + 1) + j], its upsampler the next."""
    resnet = (("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
              ("conv2", "residual.6"), ("conv_shortcut", "shortcut"))
    table = [("post_quant_conv", "conv2"), ("decoder.conv_in", "decoder.conv1"),
             ("decoder.norm_out", "decoder.head.0"), ("decoder.conv_out", "decoder.head.2"),
             ("decoder.mid_block.attentions.0", "decoder.middle.1")]
    for k, index in ((0, 0), (1, 2)):
        table += [(f"decoder.mid_block.resnets.{k}.{a}", f"decoder.middle.{index}.{b}") for a, b in resnet]
    for i in range(levels):
        base = i * (blocks_per_level + 1)
        for j in range(blocks_per_level):
            table += [(f"decoder.up_blocks.{i}.resnets.{j}.{a}", f"decoder.upsamples.{base + j}.{b}")
                      for a, b in resnet]
        table.append((f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.upsamples.{base + blocks_per_level}"))
    return tuple(table)


def rename(name, table, whole=None):
    """`name` with the first matching (from, to) run of whole segments of `table` replaced; `whole`
    renames one full name."""
    if whole and name in whole:
        return whole[name]
    dotted = f".{name}."
    for old, new in table:
        if f".{old}." in dotted:
            return dotted.replace(f".{old}.", f".{new}.", 1)[1:-1]
    return name


def inverse(table):
    return tuple((new, old) for old, new in table)


def read_weights(path, flag="--checkpoint", use_ema=False, component="transformer"):
    """A checkpoint's tensors under the names in the file (any form above; a diffusers release's top folder
    counts as its `component` folder)."""
    if not os.path.exists(path):
        raise BadInput(f"{flag} {path}: no such file or folder")
    if os.path.isdir(path) or path.endswith((".safetensors", ".json")):
        return read_safetensors(safetensors_files(path, flag, component), flag)
    return read_torch_checkpoint(path, flag, use_ema)


def read_torch_checkpoint(path, flag, use_ema):
    """A torch .pt checkpoint's tensors: a plain state dict, or Self-Forcing's layout."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:   # a legacy (pre-zip) torch.save file cannot be memory-mapped: read it whole
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- pickle and zip each fail their own way on a bad file
        raise BadInput(f"{flag} {path}: not a torch checkpoint (torch.load raised "
                       f"{type(e).__name__})") from None
    if isinstance(state, dict) and ("generator" in state or "generator_ema" in state):
        key = "generator_ema" if use_ema else "generator"
        if key not in state:
            raise BadInput(f"{path}: no '{key}' entry (has {sorted(state)})")
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.replace("_fsdp_wrapped_module.", "").removeprefix("model."): v for k, v in state.items()}


def safetensors_files(path, flag="--checkpoint", component="transformer"):
    """The files of a safetensors checkpoint: one file, an *.index.json and its shards, or a folder of
    either (a diffusers release's top folder counts as its `component` folder)."""
    if os.path.isdir(path):
        sub = os.path.join(path, component)
        folder = sub if os.path.isdir(sub) else path
        names = sorted(os.listdir(folder))
        index = [n for n in names if n.endswith(".safetensors.index.json")]
        if index:
            return safetensors_files(os.path.join(folder, index[0]), flag, component)
        files = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
        if not files:
            raise BadInput(f"{flag} {path}: no .safetensors files in {folder}")
        return files
    if path.endswith(".json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{flag} {path}: not a safetensors index ({type(e).__name__})") from None
        return [os.path.join(os.path.dirname(path), shard) for shard in sorted(set(weight_map.values()))]
    return [path]


def read_safetensors(files, flag="--checkpoint"):
    """The tensors of safetensors files, each problem naming its file."""
    from safetensors.torch import load_file
    state = {}
    for file in files:
        if not os.path.isfile(file):
            raise BadInput(f"{flag}: shard {file} is missing")
        try:
            state.update(load_file(file))
        except Exception as e:  # noqa: BLE001 -- a truncated or corrupt file fails inside the parser
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
            raise BadInput(f"{flag} {file}: not a readable safetensors file ({reason})") from None
    return state


def load_strictly(module, state, path, ignored=()):
    """Load `state` into `module` strictly: a missing key, an unexpected one (except under the `ignored`
    prefixes, e.g. a whole VAE's encoder) or a wrong shape raises BadInput naming the key."""
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignored))}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = ([f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected] +
                [f"wrong shape {w}" for w in wrong])
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise BadInput(f"{path} does not fit the model: " + "; ".join(problems[:10]) + more)
    module.load_state_dict(state, strict=True)


def load_text(path, config, batch, seed, flag="--text-embedding "):
    """umT5 features [B, L, text_dim] from a tensor file ([L, text_dim] is batch 1), or random stand-ins
    (path None). `config` gives text_dim and text_len; f"{flag}{path}" names the file in a one-line error."""
    if path is None:   # random stand-in for umT5 features (--prompt encodes real ones)
        return torch.randn(batch, config.text_len, config.text_dim,
                           generator=torch.Generator().manual_seed(seed + 1))
    expected = f"a tensor [L, {config.text_dim}] or [B, L, {config.text_dim}] with L <= {config.text_len}"
    if not os.path.isfile(path):
        raise BadInput(f"{flag}{path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    try:
        text = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a bad file fails inside pickle or zip in many ways
        raise BadInput(f"{flag}{path}: not a torch tensor file ({type(e).__name__}); "
                       f"expected {expected}") from None
    if not isinstance(text, torch.Tensor):
        raise BadInput(f"{flag}{path} holds a {type(text).__name__}; expected {expected}")
    text = text[None] if text.dim() == 2 else text
    if text.dim() != 3 or text.shape[2] != config.text_dim or not 1 <= text.shape[1] <= config.text_len:
        raise BadInput(f"{flag}{path} is {tuple(text.shape)}; expected {expected}")
    return text


def wan_name(diffusers_name):
    """A DiT parameter's original Wan2.1 name for its diffusers name."""
    return rename(diffusers_name, DIFFUSERS_TO_WAN, DIFFUSERS_TO_WAN_WHOLE)


def diffusers_name(wan):
    """A DiT parameter's diffusers name for its original Wan2.1 name."""
    return rename(wan, inverse(DIFFUSERS_TO_WAN), {v: k for k, v in DIFFUSERS_TO_WAN_WHOLE.items()})


def load_dit(model, path, use_ema=False):
    """A DiT checkpoint in any form, loaded strictly into `model` (diffusers names renamed first)."""
    state = read_weights(path, "--checkpoint", use_ema, "transformer")
    if "scale_shift_table" in state or any(k.startswith("condition_embedder.") for k in state):
        state = {wan_name(k): v for k, v in state.items()}
    load_strictly(model, state, path)


def load_vae_decoder(vae, path, levels, blocks_per_level):
    """A Wan VAE in any form (Wan2.1_VAE.pth, or a diffusers release's vae/), loaded strictly into `vae`,
    whose names are the original decoder's (`conv2`, `decoder.*`); the encoder's weights are left out."""
    state = read_weights(path, "--vae", component="vae")
    if any(k.startswith(("post_quant_conv.", "decoder.conv_in.")) for k in state):
        table = vae_diffusers_to_wan(levels, blocks_per_level)
        state = {rename(k, table): v for k, v in state.items()}
        ignored = ("encoder.", "quant_conv.")
    else:
        ignored = ("encoder.", "conv1.")
    load_strictly(vae, state, path, ignored)
