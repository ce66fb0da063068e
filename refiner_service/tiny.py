"""A tiny random-weight refiner of the SDXL-refiner architecture family, built offline.

It has every part the real ``stabilityai/stable-diffusion-xl-refiner-1.0`` has (only ``tokenizer_2`` and
``text_encoder_2``, a ``text_time`` UNet with aesthetic-score conditioning, a four-block VAE, Euler), at a
few MB instead of 6 GB, so tests and demos drive the production ``from_pretrained`` code path with no
weights and no network. Its output is noise-like by design: it proves plumbing, not quality.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

TINY_MODEL = "tiny"
# Bump when the builder changes so that stale caches are rebuilt rather than reused.
_TINY_VERSION = 1
_MAX_LENGTH = 77  # CLIP's context length; padding="max_length" overflows without it


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet: 256 printable characters standing for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a small CLIP BPE tokenizer: the byte alphabet, its ``</w>`` forms, a few
    merges for the default prompts, and the start/end tokens."""
    alphabet = _bytes_to_unicode()
    merges = [("h", "i"), ("g", "h</w>"), ("hi", "gh</w>"), ("q", "u"), ("a", "l"), ("l", "y</w>"),
              ("d", "e"), ("s", "h"), ("a", "r"), ("p</w>", ","), ("b", "l"), ("u", "r")]
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges),
              "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_tiny_refiner(dest: Path, seed: int = 0) -> Path:
    """Build the tiny refiner and ``save_pretrained`` it into ``dest`` (created; < 1 s, ~4 MB).

    Args:
        dest: Target folder; it gets ``model_index.json`` and one sub-folder per component.
        seed: Seed of the random weights; the same seed gives the same weights.

    Returns:
        ``dest``.
    """
    import importlib

    import torch

    # diffusers and transformers are only partly annotated: use them as untyped modules here.
    diffusers: Any = importlib.import_module("diffusers")
    transformers: Any = importlib.import_module("transformers")

    vocab, merges = tiny_tokenizer_files()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_MAX_LENGTH)
    hidden, projection, time_dim = 32, 32, 8
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
        torch.manual_seed(seed)
        text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, projection_dim=projection, max_position_embeddings=_MAX_LENGTH,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ))
        unet = diffusers.UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # Must equal the text encoder's hidden size (not its projection).
            cross_attention_dim=hidden, attention_head_dim=(2, 4), use_linear_projection=True,
            norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            # With aesthetic scores: 5 time ids (size, crop, aesthetic) + the pooled text embedding.
            projection_class_embeddings_input_dim=time_dim * 5 + projection,
        )
        vae = diffusers.AutoencoderKL(  # four blocks: vae_scale_factor 8, like the real one
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), sample_size=64,
        )
    scheduler = diffusers.EulerDiscreteScheduler(  # the published refiner's scheduler settings
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder, tokenizer=None, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest)
    return dest


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/trellisbox`` (default ``~/.cache/trellisbox``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trellisbox"


def tiny_refiner_path(cache_dir: Path | None = None) -> Path:
    """The tiny refiner's folder, built on first use; safe when several processes race to build it."""
    folder = (cache_dir or cache_root()) / f"tiny-refiner-v{_TINY_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: a reader never sees a half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-refiner-", dir=folder.parent))
    try:
        build_tiny_refiner(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "model_index.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log.warning("built the tiny random-weight refiner (test model, noise-like output) in %s", folder)
    return folder
