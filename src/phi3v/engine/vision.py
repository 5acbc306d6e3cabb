"""Image side of Phi-3-vision: CLIP tower, 2x2 merge, sub_GN/glb_GN layout, projector (spec §4-5).

Names follow the checkpoint under `model.vision_embed_tokens`: `img_processor.vision_model.*`,
`img_projection.{0,2}`, `glb_GN`, `sub_GN`. Only the CLIP layers whose output is used are built
(features come from hidden_states[-2], so the last layer and post_layernorm never run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.page_out import page_out
from . import clip_packed
from .config import Phi3VConfig, VisionConfig

# Checkpoint tensors the vision side never uses; the loader skips them (see unused_vision_keys).
_PREFIX = "model.vision_embed_tokens.img_processor.vision_model."
# Crops per CLIP call by default: activations of 4 crops (~4 x 577 tokens) stay small at full size, and
# on a CPU one call over more crops is no faster per crop.
DEFAULT_VISION_CHUNK = 4


def unused_vision_keys(cfg: VisionConfig) -> list[str]:
    """Regexes of checkpoint keys that are present but not needed (CLIP layers past the feature layer)."""
    skipped = [str(i) for i in range(cfg.layers_used, cfg.num_hidden_layers)]
    keys = [_PREFIX.replace(".", r"\.") + r"post_layernorm\..*"]
    if skipped:
        keys.append(_PREFIX.replace(".", r"\.") + r"encoder\.layers\.(" + "|".join(skipped) + r")\..*")
    return keys


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        # _weight skips the random init: the checkpoint overwrites it, and normal_ on the meta device
        # runs a Python reference that imports torch._dynamo (~0.7 s of every load and `phi3v info`).
        positions = cfg.num_patches_per_side**2 + 1
        self.position_embedding = nn.Embedding(positions, cfg.hidden_size,
                                               _weight=torch.empty(positions, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, 336, 336) -> (N, 577, C): CLS first, patches in raster order."""
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, C, 24, 24)
        patches = patches.flatten(2).transpose(1, 2)  # (N, 576, C)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        c = cfg.hidden_size
        self.q_proj, self.k_proj = nn.Linear(c, c), nn.Linear(c, c)
        self.v_proj, self.out_proj = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, C = x.shape

        def heads(t):  # (N, T, C) -> (N, heads, T, head_dim)
            return t.view(N, T, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(N, T, C))


class ClipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h.mul_(torch.sigmoid_(1.702 * h)))  # quick_gelu, in place: one temporary


class ClipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)

    # The oneDNN pack of this layer's products (clip_packed.PackedLayer; ClipVisionModel.pack sets it),
    # a plain attribute: not a parameter or buffer, so checkpoints and state_dict never see it.
    packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.is_grad_enabled() and self.packed.fits(x):
            return self.packed(self, x)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.layers_used))


class ClipVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, checkpoint name
        self.encoder = ClipEncoder(cfg)

    # Run the layers on oneDNN pre-packed weights (clip_packed.py) when the tower is bf16 on the CPU;
    # the pack is made at the first encoding (or by pack()). False: the plain nn.Linear path.
    packed_weights: bool = True

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, 336, 336) -> the first layer's input (N, 577, C)."""
        self._pack_if_useful()
        return self.pre_layrnorm(self.embeddings(pixels))

    def _pack_if_useful(self) -> None:
        layers = self.encoder.layers
        if not layers or layers[0].packed is not None or getattr(self, "_pack_tried", False):
            return
        self._pack_tried = True
        weight = self.pre_layrnorm.weight
        if (self.packed_weights and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                and clip_packed.enabled_by_env()):
            self.pack()

    def pack(self) -> bool:
        """Pack every layer's products for oneDNN (any float dtype; a copy of ~the layers' weights:
        the originals, when memory-mapped, are handed back to the OS) -> whether it was done
        (False: no oneDNN ops in this torch, or quantized / non-CPU layers)."""
        if not clip_packed.available():
            return False
        tokens = self.embeddings.position_embedding.weight.shape[0] * DEFAULT_VISION_CHUNK
        packs = [clip_packed.PackedLayer.of(layer, tokens) for layer in self.encoder.layers]
        if any(p is None for p in packs):
            return False
        for layer, p in zip(self.encoder.layers, packs):
            layer.packed = p
        # The packs are what runs now: the products' weights go back to the OS (file-backed pages only).
        page_out(m.weight for layer in self.encoder.layers
                 for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2))
        return True

    def unpack(self) -> None:
        """Back to the plain nn.Linear path (and no automatic pack later)."""
        self._pack_tried = True
        for layer in self.encoder.layers:
            layer.packed = None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, 336, 336) -> patch features (N, 576, C) of the feature layer, CLS dropped."""
        x = self.embed(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:]


class ClipTower(nn.Module):
    """Holds `vision_model` so parameter names match `img_processor.vision_model.*`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = ClipVisionModel(cfg)


class ImageEmbedding(nn.Module):
    """pixel_values + image_sizes -> per-image sequences of decoder-width vectors."""

    # Crops per CLIP call (None or 0: all of them in one call). Set per model: phi3v.load(vision_chunk=...).
    vision_chunk: int | None = DEFAULT_VISION_CHUNK

    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        v = cfg.vision
        merged = 4 * cfg.image_dim_out
        self.img_processor = ClipTower(v)
        self.img_projection = nn.Sequential(
            nn.Linear(merged, cfg.text.hidden_size), nn.GELU(), nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size)
        )
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged))
        self.crop_size = v.image_size
        self.grid = v.num_patches_per_side // 2  # 12 merged cells per side

    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """crops (N, 3, 336, 336) -> merged features (N, 12, 12, 4C)."""
        return self.merge(self.img_processor.vision_model(crops))

    def merge(self, feats: torch.Tensor) -> torch.Tensor:
        """patch features (N, 576, C) -> merged features (N, 12, 12, 4C)."""
        N, _, C = feats.shape
        g = self.grid
        # (N, 24, 24, C) -> (N, 12, 2, 12, 2, C) -> (N, 12, 12, 2, 2, C): blocks TL, TR, BL, BR.
        feats = feats.view(N, g, 2, g, 2, C).permute(0, 1, 3, 2, 4, 5)
        return feats.reshape(N, g, g, 4 * C)

    def layout(self, merged: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """merged (1 + rows*cols, 12, 12, 4C) for one image -> (T, 4C) in reference order:
        [sub-image grid, each grid row + sub_GN] ++ glb_GN ++ [global 12 rows, each + sub_GN]."""
        g, width = self.grid, merged.shape[-1]
        sep = self.sub_GN.reshape(1, 1, width).to(merged.dtype)
        subs = merged[1:].view(rows, cols, g, g, width).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, width)
        subs = torch.cat([subs, sep.expand(rows * g, 1, width)], dim=1).reshape(-1, width)
        glob = torch.cat([merged[0], sep.expand(g, 1, width)], dim=1).reshape(-1, width)
        return torch.cat([subs, self.glb_GN.reshape(1, width).to(merged.dtype), glob], dim=0)

    def project(self, merged: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """merged (1 + rows*cols, 12, 12, 4C) of one image -> its features (T, hidden)."""
        return self.img_projection(self.layout(merged, rows, cols).to(self.img_projection[0].weight.dtype))

    def encoding(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, chunk: int | None = -1,
                 ready=None) -> ImageEncoding:
        """An ImageEncoding of these images (pixel_values (I, n+1, 3, 336, 336), image_sizes (I, 2));
        chunk -1 = this tower's vision_chunk."""
        images = [(pixel_values[i], (int(h), int(w))) for i, (h, w) in enumerate(image_sizes.tolist())]
        return ImageEncoding(self, images, self.vision_chunk if chunk == -1 else chunk, ready)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (I, n+1, 3, 336, 336), image_sizes (I, 2) [H, W] -> list of (T_k, hidden).

        Only the global view and the real crops of each image go through CLIP (padding crops are
        skipped), at most `vision_chunk` crops per call, images one after the other (the same
        features as one call over every crop, up to float rounding; activation memory follows the
        chunk, not the crop count).
        """
        return self.encoding(pixel_values, image_sizes).run()


class ImageEncoding:
    """The features of a list of images, computed a piece at a time (what lets a server encode a
    newcomer's images between the decode steps of the others, and a video's many frames without
    holding every crop's activations at once).

    Each step() runs CLIP once on the next (at most) `chunk` real crops (or as many as the step
    names), in image order (a piece may end one image and begin the next), and lays out and
    projects each image whose crops are all in. A step may also run only `layers` of CLIP's layers
    on its piece (the next steps run the rest; same operations, same results), which bounds one
    step's time below one crop's. `ready(k)`, when given, is asked as image k is reached: features
    it returns (another request encoded the same content meanwhile) are used without encoding.
    """

    def __init__(self, tower: ImageEmbedding, images: list[tuple[torch.Tensor, tuple[int, int]]],
                 chunk: int | None, ready=None):
        """images: (pixel_values (n+1, 3, 336, 336), (H, W)) each. chunk None or 0: every crop in one call."""
        self.tower, self.images, self.ready = tower, images, ready
        self.chunk = chunk if chunk and chunk > 0 else None
        size = tower.crop_size
        self.grids = [(h // size, w // size) for _, (h, w) in images]
        for (pixels, _), (r, c) in zip(images, self.grids):
            if 1 + r * c > pixels.shape[0]:
                raise ValueError(f"an image of {r}x{c} crops has only {pixels.shape[0] - 1} crops of pixels")
        self.features: list[torch.Tensor | None] = [None] * len(images)  # (T_k, hidden) once image k is done
        self.calls = 0  # CLIP calls (pieces) so far
        self._parts: list[tuple[int, int]] = []  # the piece in flight (split by layers): (image, crops) each
        self._hidden: torch.Tensor | None = None  # its hidden states (crops, 577, C) after `_layer` layers
        self._layer = 0
        self._image, self._crop = 0, 0  # the next crop to encode: image index, crop index in it
        self._merged: list[torch.Tensor] = []  # the current image's merged crops so far, (n_i, 12, 12, 4C) each

    @property
    def done(self) -> bool:
        return self._image >= len(self.images) and self._hidden is None

    def run(self) -> list[torch.Tensor]:
        while not self.done:
            self.step()
        return self.features

    @torch.inference_mode()
    def step(self, chunk: int | None = None, layers: int | None = None) -> list[int]:
        """Encode the next piece of at most `chunk` crops (None: this encoding's chunk; 0: every
        crop left), or with `layers`, at most that many CLIP layers of it -> the indices of the
        images it completed."""
        clip = self.tower.img_processor.vision_model
        depth = len(clip.encoder.layers)
        completed: list[int] = []
        if self._hidden is None:  # a new piece
            parts = self._gather(self.chunk if chunk is None else chunk, completed)
            if not parts:
                return completed
            dtype, device = self.tower.img_projection[0].weight.dtype, self.tower.glb_GN.device
            crops = (parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts])).to(device, dtype)
            self.calls += 1
            self._parts = [(k, pixels.shape[0]) for k, pixels in parts]
            if not layers or layers >= depth:
                return completed + self._finish(self.tower.encode_crops(crops))  # (crops, 12, 12, 4C)
            self._hidden, self._layer = clip.embed(crops), 0
        end = depth if not layers else min(depth, self._layer + layers)
        for layer in clip.encoder.layers[self._layer:end]:
            self._hidden = layer(self._hidden)
        self._layer = end
        if end < depth:
            return completed
        hidden, self._hidden = self._hidden, None
        return completed + self._finish(self.tower.merge(hidden[:, 1:]))

    def _gather(self, chunk: int, completed: list[int]) -> list[tuple[int, torch.Tensor]]:
        """The next piece's crops -> [(image index, its crops (n, 3, 336, 336) in the piece)];
        images that `ready` gives are added to `completed` instead."""
        parts: list[tuple[int, torch.Tensor]] = []
        room = chunk or sum(1 + r * c for r, c in self.grids)
        image, crop = self._image, self._crop
        while room > 0 and image < len(self.images):
            if crop == 0 and self.ready is not None:
                found = self.ready(image)
                if found is not None:
                    self.features[image] = found
                    completed.append(image)
                    image += 1
                    continue
            r, c = self.grids[image]
            take = min(room, 1 + r * c - crop)
            parts.append((image, self.images[image][0][crop:crop + take]))
            room -= take
            crop += take
            if crop == 1 + r * c:
                image, crop = image + 1, 0
        self._image, self._crop = image, crop
        return parts

    def _finish(self, merged: torch.Tensor) -> list[int]:
        """The piece's merged crops (n, 12, 12, 4C) to their images -> the images now complete."""
        completed, at = [], 0
        for k, n in self._parts:
            self._merged.append(merged[at:at + n])
            at += n
            r, c = self.grids[k]
            if sum(m.shape[0] for m in self._merged) == 1 + r * c:  # image k is complete
                whole = self._merged[0] if len(self._merged) == 1 else torch.cat(self._merged)
                self.features[k] = self.tower.project(whole, r, c)
                self._merged = []
                completed.append(k)
        self._parts = []
        return completed
