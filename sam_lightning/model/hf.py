"""Hugging Face `transformers.SamModel` folders, both ways: our own tested key mapping.

The transformers wheel ships no converter (its `convert_sam_to_hf.py` lives in the repository
only) and nothing converts back, so this module holds the mapping between segment-anything's
state-dict names and transformers' (`HF_KEY_RULES`), and the architecture fields of each side's
config. A folder written here is what `SamModel.save_pretrained` writes: `config.json` and
`model.safetensors` (the tied copy `prompt_encoder.shared_embedding.positional_embedding` left
out, as transformers leaves it out), plus the `SamProcessor` settings of the model's image size.

The names differ, the computation does not: transformers' `SamModel` implements segment-anything's
modules one for one. One setting must be carried over by hand: segment-anything's two-way
transformer uses `nn.LayerNorm`'s default eps (1e-5) where transformers' config defaults to 1e-6.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import SamConfig, SamImageProcessor, SamProcessor

from sam_lightning.errors import UserError
from sam_lightning.model.specs import MODEL_SPECS, SamSpec

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
#: transformers ties this key to `shared_image_embedding.positional_embedding` and does not save it
HF_TIED_KEY = "prompt_encoder.shared_embedding.positional_embedding"

#: segment-anything name (regex) -> transformers name, applied in order to every key
HF_KEY_RULES: tuple[tuple[str, str], ...] = (
    # image encoder
    (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^image_encoder\.", "vision_encoder."),
    # prompt encoder
    (
        r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
        "shared_image_embedding.positional_embedding",
    ),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    # mask decoder
    (
        r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.",
        r"mask_decoder.transformer.layers.\1.layer_norm\2.",
    ),
    (
        r"^mask_decoder\.transformer\.norm_final_attn\.",
        "mask_decoder.transformer.layer_norm_final_attn.",
    ),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    # the 3-layer MLPs: first layer proj_in, middle layers.0, last proj_out
    (
        r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0\.",
        r"mask_decoder.\1.proj_in.",
    ),
    (
        r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.1\.",
        r"mask_decoder.\1.layers.0.",
    ),
    (
        r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.2\.",
        r"mask_decoder.\1.proj_out.",
    ),
)
_COMPILED = tuple((re.compile(pattern), repl) for pattern, repl in HF_KEY_RULES)
#: segment-anything's TwoWayAttentionBlock norms: nn.LayerNorm's default eps
SAM_DECODER_LAYER_NORM_EPS = 1e-5


def hf_key(sam_key: str) -> str:
    """The transformers `SamModel` name of a segment-anything `Sam` state-dict key."""
    for pattern, repl in _COMPILED:
        sam_key = pattern.sub(repl, sam_key, count=1)
    return sam_key


def sam_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A segment-anything state dict under transformers' names (the tied copy left out)."""
    return {hf_key(k): v for k, v in state.items()}


def hf_to_sam_state_dict(
    hf_state: dict[str, torch.Tensor], sam_keys: list[str], source: str | Path = "HF folder"
) -> dict[str, torch.Tensor]:
    """transformers' tensors back under segment-anything's names.

    The inverse of `hf_key` over `sam_keys`, the keys of the `Sam` they go into; a key of
    neither side (a transformers head we do not know) is named rather than dropped.
    """
    names = {hf_key(k): k for k in sam_keys}
    hf_state = {k: v for k, v in hf_state.items() if k != HF_TIED_KEY}
    unknown = sorted(set(hf_state) - set(names))
    missing = sorted(set(names) - set(hf_state))
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} unknown keys (first: {', '.join(unknown[:3])})")
        if missing:
            problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        raise UserError(
            f"{source} is not a transformers SamModel of this architecture: " + "; ".join(problems)
        )
    return {names[k]: v for k, v in hf_state.items()}


# ---- configs -------------------------------------------------------------------------------
def hf_config(spec: SamSpec) -> SamConfig:
    """The transformers `SamConfig` of a segment-anything architecture."""
    return SamConfig(
        vision_config={
            "hidden_size": spec.encoder_embed_dim,
            "num_hidden_layers": spec.encoder_depth,
            "num_attention_heads": spec.encoder_num_heads,
            "global_attn_indexes": list(spec.global_attn_indexes),
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "window_size": spec.window_size,
            "output_channels": spec.prompt_embed_dim,
            "num_pos_feats": spec.prompt_embed_dim // 2,
            "mlp_ratio": 4.0,
            "qkv_bias": True,
            "use_abs_pos": True,
            "use_rel_pos": True,
            "layer_norm_eps": 1e-6,
        },
        prompt_encoder_config={
            "hidden_size": spec.prompt_embed_dim,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "mask_input_channels": spec.mask_in_chans,
            "num_point_embeddings": 4,
            "layer_norm_eps": 1e-6,
        },
        mask_decoder_config={
            "hidden_size": spec.prompt_embed_dim,
            "mlp_dim": spec.decoder_mlp_dim,
            "num_hidden_layers": spec.decoder_depth,
            "num_attention_heads": spec.decoder_num_heads,
            "attention_downsample_rate": 2,
            "num_multimask_outputs": 3,
            "iou_head_depth": 3,
            "iou_head_hidden_dim": spec.iou_head_hidden_dim,
            "layer_norm_eps": SAM_DECODER_LAYER_NORM_EPS,
        },
    )


def spec_from_hf_config(config: dict[str, Any], source: str | Path = "config.json") -> SamSpec:
    """The segment-anything architecture a transformers SAM `config.json` describes."""
    if config.get("model_type") != "sam":
        raise UserError(
            f"{source}: model_type is {config.get('model_type')!r}, expected 'sam' "
            "(a folder written by transformers' SamModel.save_pretrained)"
        )
    try:
        vision = config["vision_config"]
        prompt = config["prompt_encoder_config"]
        decoder = config["mask_decoder_config"]
        width = int(vision["hidden_size"])
        mlp_dim = vision.get("mlp_dim") or int(width * float(vision.get("mlp_ratio", 4.0)))
        unsupported = {
            "vision mlp_dim": (int(mlp_dim), 4 * width),
            "vision qkv_bias": (bool(vision.get("qkv_bias", True)), True),
            "vision use_abs_pos": (bool(vision.get("use_abs_pos", True)), True),
            "vision use_rel_pos": (bool(vision.get("use_rel_pos", True)), True),
            "vision num_pos_feats": (
                int(vision.get("num_pos_feats", 128)),
                int(prompt["hidden_size"]) // 2,
            ),
            "mask decoder num_multimask_outputs": (int(decoder.get("num_multimask_outputs", 3)), 3),
            "mask decoder iou_head_depth": (int(decoder.get("iou_head_depth", 3)), 3),
            "mask decoder attention_downsample_rate": (
                int(decoder.get("attention_downsample_rate", 2)),
                2,
            ),
        }
        spec = SamSpec(
            encoder_embed_dim=width,
            encoder_depth=int(vision["num_hidden_layers"]),
            encoder_num_heads=int(vision["num_attention_heads"]),
            global_attn_indexes=tuple(int(i) for i in vision["global_attn_indexes"]),
            image_size=int(vision["image_size"]),
            patch_size=int(vision["patch_size"]),
            window_size=int(vision["window_size"]),
            prompt_embed_dim=int(prompt["hidden_size"]),
            decoder_depth=int(decoder["num_hidden_layers"]),
            decoder_mlp_dim=int(decoder["mlp_dim"]),
            decoder_num_heads=int(decoder["num_attention_heads"]),
            iou_head_hidden_dim=int(decoder["iou_head_hidden_dim"]),
            mask_in_chans=int(prompt["mask_input_channels"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{source}: not a complete SamConfig ({type(err).__name__}: {err})"
        ) from None
    odd = [
        f"{name} {got} (expected {want})"
        for name, (got, want) in unsupported.items()
        if got != want
    ]
    if odd:
        raise UserError(
            f"{source}: segment-anything's Sam cannot hold this model: {'; '.join(odd)}"
        )
    return spec


def model_name_for_spec(spec: SamSpec) -> str | None:
    """Which of `MODEL_SPECS` has this architecture (the download file aside), if any."""
    wanted = _architecture(spec)
    return next((n for n, s in MODEL_SPECS.items() if _architecture(s) == wanted), None)


def _architecture(spec: SamSpec) -> dict[str, Any]:
    """The fields that make a size; the input side is a setting of it (`model.image_size`)."""
    values = asdict(spec)
    values.pop("checkpoint_file")
    values.pop("image_size")
    return values


def _closest_difference(spec: SamSpec) -> str:
    """What differs from the nearest known size, for the message of an unknown architecture."""
    got = _architecture(spec)
    best = min(
        MODEL_SPECS.items(),
        key=lambda item: sum(got[k] != v for k, v in _architecture(item[1]).items()),
    )
    name, other = best[0], _architecture(best[1])
    diffs = [
        f"{f.name}={got[f.name]} ({name}: {other[f.name]})"
        for f in fields(SamSpec)
        if f.name in got and got[f.name] != other[f.name]
    ]
    return f"closest is {name}, which differs in {', '.join(diffs)}"


# ---- folders -------------------------------------------------------------------------------
def is_hf_folder(path: str | Path) -> bool:
    """A folder with a transformers `config.json` (what `read_hf_folder` reads)."""
    path = Path(path)
    return path.is_dir() and (path / HF_CONFIG).is_file()


def read_hf_config(folder: str | Path) -> tuple[SamSpec, str]:
    """The architecture of a transformers SAM folder and the name of our size it equals."""
    folder = Path(folder)
    try:
        config = json.loads((folder / HF_CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {folder / HF_CONFIG}: {err}") from None
    spec = spec_from_hf_config(config, folder / HF_CONFIG)
    name = model_name_for_spec(spec)
    if name is None:
        raise UserError(
            f"{folder} holds a SAM of an architecture none of our sizes has: "
            f"{_closest_difference(spec)}"
        )
    return spec, name


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors` (or of the shards its index names)."""
    folder = Path(folder)
    if (folder / HF_WEIGHTS).is_file():
        files = [folder / HF_WEIGHTS]
    elif (folder / HF_WEIGHTS_INDEX).is_file():
        index = json.loads((folder / HF_WEIGHTS_INDEX).read_text())
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise UserError(
            f"{folder} has no {HF_WEIGHTS}: found {found}. Save the model with "
            "SamModel.save_pretrained(folder) (safetensors, the default) and pass that folder"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (OSError, SafetensorError) as err:
            raise UserError(f"cannot read {file}: {err}") from None
    return state


def write_hf_folder(state: dict[str, torch.Tensor], spec: SamSpec, folder: str | Path) -> Path:
    """Write a segment-anything state dict as a transformers SamModel folder.

    `config.json` (transformers' own `SamConfig.save_pretrained`), `model.safetensors` under
    transformers' names, and `preprocessor_config.json`: a `SamProcessor` that resizes the
    longest side to the model's image size and pads to the square, as `SamPredictor` does.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(spec)
    config.architectures = ["SamModel"]
    config.save_pretrained(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sam_to_hf_state_dict(state).items()}
    save_file(tensors, folder / HF_WEIGHTS, metadata={"format": "pt"})
    size = spec.image_size
    processor = SamProcessor(
        image_processor=SamImageProcessor(
            size={"longest_edge": size}, pad_size={"height": size, "width": size}
        )
    )
    processor.save_pretrained(folder)
    return folder
