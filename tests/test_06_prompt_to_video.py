"""The optional front of stage 06: a prompt through umT5 in. A tiny random umT5 in the layout of a Wan2.1
diffusers release; skipped where the optional packages are absent."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

sf = importlib.import_module("06_self_forcing_pipeline")
from support import extras  # noqa: E402
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["a", "red", "fox", "runs", "in", "the", "snow"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A tiny Wan2.1-diffusers-shaped folder: tokenizer/ and text_encoder/ (umT5 with the tiny preset's text
    width)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("wan-tiny-diffusers")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    config = transformers.UMT5Config(vocab_size=len(vocab), d_model=sf.PRESETS["tiny"].text_dim, d_kv=8, d_ff=64,
                                     num_layers=1, num_heads=4)
    transformers.UMT5EncoderModel(config).save_pretrained(folder / "text_encoder")
    return str(folder)


def test_a_prompt_becomes_its_own_tokens_features(wan_folder):
    text = extras.encode_prompt(wan_folder, "  a red   fox\n runs ", 16, torch.device("cpu"))
    assert text.shape == (1, 4, sf.PRESETS["tiny"].text_dim) and text.dtype == torch.float32
    again = extras.encode_prompt(wan_folder, "a red fox runs", 16, torch.device("cpu"))
    assert torch.equal(text, again)                       # whitespace is squeezed, as WanPipeline does
    shorter = extras.encode_prompt(wan_folder, "a red fox", 16, torch.device("cpu"))
    assert shorter.shape[1] == 3 and not torch.allclose(shorter, text[:, :3])   # every token sees the whole prompt


def test_the_command_goes_from_a_prompt_to_latents(wan_folder, tmp_path):
    proc = subprocess.run([sys.executable, "06_self_forcing_pipeline.py", "--prompt", "a red fox runs in the snow",
                           "--wan-folder", wan_folder, "--frames", "6", "--height", "32", "--width", "32",
                           "--output", str(tmp_path / "latents.pt")], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "prompt: 7 umT5 tokens" in proc.stdout
    assert torch.load(tmp_path / "latents.pt")["latents"].shape == (1, 16, 6, 4, 4)


def test_without_the_extras_the_flags_say_what_to_install(monkeypatch):
    present = object()    # as if every optional package but transformers were installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else present)
    message = extras.extras_problem("a fox", "/anywhere", None)
    assert message == f"--prompt needs the optional packages transformers: {extras.EXTRAS}"
    assert extras.extras_problem(None, None, None) is None
    assert extras.extras_problem("a fox", None, "text.pt") == "give --prompt or --text-embedding, not both"
