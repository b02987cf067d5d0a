"""Audio-feature -> face transformer with NeuroSync's published architecture (torch).

Imported only by the transformer lipsync backend (``pip install -e ".[lipsync-transformer]"``);
the default install has no torch and never imports this module.

The structure, sizes and parameter names were checked (facts only; this code is ours)
against NeuroSync's public model code, as stored in x5471140/NeuroSync_Local_API_humanoid,
utils/model/model.py at commit 6b45f328 (the 2025-03-29 model: RoPE inside attention, no
global positional encoding) and utils/config.py (hidden 1024, 8 layers, 16 heads, 256 in,
68 out, 128-frame windows); the trainer (as stored in wolfi/NeuroSync_Trainer_Lite,
utils/model.py at 66391c12, and utils/checkpoint_utils.py) has the same parameter names.
Published facts used here:

* encoder: ``embedding`` Linear(256 -> width), then ``transformer_encoder`` (a ModuleList)
  of post-norm layers ``x = norm1(x + self_attn(x)); x = norm2(x + ffn(x))``, then a final
  ``layer_norm``;
* decoder: its input *is* the encoder output, which is also the cross-attention memory;
  ``transformer_decoder`` layers ``norm1(x + self_attn(x))``, ``norm2(x +
  multihead_attn(x, memory))``, ``norm3(x + ffn(x))``; final ``layer_norm``, then
  ``fc_output`` Linear(width -> 68);
* attention: ``q_linear``/``k_linear``/``v_linear``/``out_linear`` (with biases), scaled dot
  product (1/sqrt(head_dim)), no mask; rotary embeddings on queries and keys of every
  attention (cross-attention included), positions 0..L-1, frequencies
  ``10000 ** (-2i / head_dim)``, rotating *interleaved* pairs (dims 2i, 2i + 1);
* ffn: ``linear1`` (width -> 4 * width), ReLU, ``linear2``; LayerNorms with default eps;
* checkpoints: ``torch.save(model.state_dict())`` of the top module (keys ``encoder.*`` and
  ``decoder.*``, no buffers) loaded with ``strict=True``; the trainer's full checkpoints nest
  it under ``model_state_dict``.

At full size that is 235.5M parameters (0.94 GB in float32). Outputs 0..60 are the face
values in EARFaceBlendShape order scaled by 100, 61..67 seven emotions; scaling and
clean-up live in transformer_backend.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AudioEncoder",
    "FaceDecoder",
    "FaceTransformer",
    "ModelConfig",
    "RotaryAttention",
    "apply_rotary",
    "config_from_state_dict",
    "load_model",
    "read_state_dict",
    "rotary_tables",
]


@dataclass(frozen=True)
class ModelConfig:
    input_dim: int = 256
    output_dim: int = 68  # 52 ARKit + 9 head/eye rotations + 7 emotions
    width: int = 1024
    encoder_layers: int = 8
    decoder_layers: int = 8
    heads: int = 16
    ff_mult: int = 4
    rope_base: float = 10000.0
    # NeuroSync_Trainer_Lite's variant also rotates the whole embedding (encoder input and
    # decoder input) before the layers; same parameters, so only this flag tells them apart.
    global_rope: bool = False

    def __post_init__(self) -> None:
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} even-sized heads")


def rotary_tables(length: int, dim: int, base: float, device: torch.device | str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, dim // 2) cos and sin of ``position * base ** (-2i / dim)``, in float32."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                         * (-math.log(base) / dim))
    angle = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq
    return torch.cos(angle), torch.sin(angle)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of the last dim by its angle; ``x`` is
    (..., L, D), ``cos``/``sin`` (L, D // 2)."""
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class RotaryAttention(nn.Module):
    def __init__(self, width: int, heads: int, rope_base: float = 10000.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.rope_base = rope_base
        self.q_linear = nn.Linear(width, width)
        self.k_linear = nn.Linear(width, width)
        self.v_linear = nn.Linear(width, width)
        self.out_linear = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self._split(self.q_linear(x))
        k = self._split(self.k_linear(memory))
        v = self._split(self.v_linear(memory))
        cos, sin = rope
        q = apply_rotary(q, cos[: q.shape[2]], sin[: q.shape[2]])
        k = apply_rotary(k, cos[: k.shape[2]], sin[: k.shape[2]])
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_linear(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = RotaryAttention(cfg.width, cfg.heads, cfg.rope_base)
        self.ffn = FeedForward(cfg.width, cfg.ff_mult * cfg.width)
        self.norm1 = nn.LayerNorm(cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, rope))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = RotaryAttention(cfg.width, cfg.heads, cfg.rope_base)
        self.multihead_attn = RotaryAttention(cfg.width, cfg.heads, cfg.rope_base)
        self.ffn = FeedForward(cfg.width, cfg.ff_mult * cfg.width)
        self.norm1 = nn.LayerNorm(cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.norm3 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, rope))
        x = self.norm2(x + self.multihead_attn(x, memory, rope))
        return self.norm3(x + self.ffn(x))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Linear(cfg.input_dim, cfg.width)
        self.transformer_encoder = nn.ModuleList(EncoderLayer(cfg)
                                                 for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                wide_rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.embedding(x)
        if wide_rope is not None:
            x = apply_rotary(x, *wide_rope)
        for layer in self.transformer_encoder:
            x = layer(x, rope)
        return self.layer_norm(x)


class FaceDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.transformer_decoder = nn.ModuleList(DecoderLayer(cfg)
                                                 for _ in range(cfg.decoder_layers))
        self.fc_output = nn.Linear(cfg.width, cfg.output_dim)
        self.layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, memory: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                wide_rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = memory if wide_rope is None else apply_rotary(memory, *wide_rope)
        for layer in self.transformer_decoder:
            x = layer(x, memory, rope)
        return self.fc_output(self.layer_norm(x))


class FaceTransformer(nn.Module):
    """(batch, frames, 256) audio features -> (batch, frames, 68); windows of 128 frames in
    the published use. Parameter names match NeuroSync's state dicts."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.encoder = AudioEncoder(self.cfg)
        self.decoder = FaceDecoder(self.cfg)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n = features.shape[1]
        head_dim = self.cfg.width // self.cfg.heads
        # One table per forward, shared by all 24 attention blocks at full size.
        rope = rotary_tables(n, head_dim, self.cfg.rope_base, features.device)
        wide = (rotary_tables(n, self.cfg.width, self.cfg.rope_base, features.device)
                if self.cfg.global_rope else None)
        return self.decoder(self.encoder(features, rope, wide), rope, wide)


# --- checkpoints -----------------------------------------------------------------------------

_WRAPPERS = ("model_state_dict", "state_dict")  # trainer checkpoints, common conventions
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DataParallel


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a NeuroSync-format file: a bare ``state_dict()`` (the
    published ``model.pth``) or a training checkpoint holding one under
    ``model_state_dict``. Loaded with ``weights_only=True``: no pickled code runs."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for name, tensor in obj.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = tensor
    return out


def config_from_state_dict(state: dict[str, torch.Tensor], heads: int = 16,
                           **overrides: object) -> ModelConfig:
    """Sizes read off the tensors; heads cannot be (published: 16) and must be given."""
    try:
        width, input_dim = state["encoder.embedding.weight"].shape
        output_dim = state["decoder.fc_output.weight"].shape[0]
        hidden = state["encoder.transformer_encoder.0.ffn.linear1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a NeuroSync-format state dict: no {e}") from None

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)})

    cfg = ModelConfig(
        input_dim=int(input_dim), output_dim=int(output_dim), width=int(width),
        encoder_layers=count("encoder.transformer_encoder."),
        decoder_layers=count("decoder.transformer_decoder."),
        heads=heads, ff_mult=int(hidden) // int(width),
    )
    return replace(cfg, **overrides) if overrides else cfg


def load_model(path: str | Path, heads: int = 16, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, **overrides: object) -> FaceTransformer:
    """Build the model a checkpoint describes and load it strictly; eval mode."""
    state = read_state_dict(path)
    model = FaceTransformer(config_from_state_dict(state, heads=heads, **overrides))
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()
