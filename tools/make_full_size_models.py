"""Full-size random models for speed and memory measurements, never committed.

    python tools/make_full_size_models.py [--out bench/models] [--only NAME ...]

Each model has a real checkpoint's config (BLIP-base, BLIP-large, BLIP-2
OPT-2.7b, CLIP ViT-B/32, CLIP ViT-L/14, LLaVA-1.5-7b), so its compute and memory are exactly
the real model's, with random weights. Tensors are written shard by shard straight from numpy, so building
the 3.7B-parameter BLIP-2 needs about one shard of RAM, not the model's 15 GB:
the tensor names and shapes come from transformers building the model on the
meta device (no memory), the values from a seeded normal(0, 0.02) (LayerNorm
weights 1, biases 0.02-scaled noise, CLIP's logit_scale its initial
log(1/0.07)), as float32 like the published checkpoints. The tokenizer and
processor files are the tiny fixtures' (the vocabulary is small, the ids the
model can produce are not: the text is meaningless anyway). The CLIP models
take only the tokenizer from tests/fixtures/models/clip-tiny (its ids are all
below 794, the real vocabulary has 49408; model_max_length set to the 77
positions) and get the image processor openai's repositories have, a legacy
preprocessor_config.json: shortest edge 224, centre crop 224, bicubic, CLIP's
mean and std. LLaVA-1.5-7b (7.06 B parameters) is written in bfloat16
(14 GB), with the tiny LLaVA fixture's tokenizer and chat template and
llava-hf's 336-pixel CLIP preprocessor and processor settings.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file
from transformers import (Blip2Config, Blip2ForConditionalGeneration, BlipConfig, BlipForConditionalGeneration,
                          CLIPConfig, CLIPModel, LlavaConfig, LlavaForConditionalGeneration)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "models"
SHARD_BYTES = 2 * 1024**3

BLIP_TEXT = dict(
    vocab_size=30524,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    bos_token_id=30522,
    sep_token_id=102,
    pad_token_id=0,
)


def blip_base():
    vision = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  image_size=384, patch_size=16, layer_norm_eps=1e-5)
    text = dict(BLIP_TEXT, encoder_hidden_size=768)
    return BlipConfig(vision_config=vision, text_config=text, architectures=["BlipForConditionalGeneration"])


def blip_large():
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=384, patch_size=16, layer_norm_eps=1e-5)
    text = dict(BLIP_TEXT, encoder_hidden_size=1024)
    return BlipConfig(vision_config=vision, text_config=text, architectures=["BlipForConditionalGeneration"])


def blip2_opt_2_7b():
    vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    qformer = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   cross_attention_frequency=2, encoder_hidden_size=1408, vocab_size=30522)
    text = dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=50304, max_position_embeddings=2048, word_embed_proj_dim=2560, bos_token_id=2,
                pad_token_id=1, eos_token_id=50118, do_layer_norm_before=True, tie_word_embeddings=True)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                       image_token_index=50265, architectures=["Blip2ForConditionalGeneration"])


# openai's text tower settings, shared by both CLIP configs (only the width differs).
CLIP_TEXT = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=12, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def clip(vision, text, projection_dim):
    vision = dict(vision, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=projection_dim)
    text = dict(CLIP_TEXT, **text, projection_dim=projection_dim)
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection_dim,
                      logit_scale_init_value=2.6592, architectures=["CLIPModel"])


def clip_vit_base_patch32():
    return clip(dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=32),
                dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8), 512)


def clip_vit_large_patch14():
    return clip(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14),
                dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12), 768)


# openai/clip-vit-*'s preprocessor_config.json, in its legacy form ("size": 224
# is the shortest edge for CLIP).
CLIP_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

def llava_1_5_7b():
    """llava-hf/llava-1.5-7b-hf's config: CLIP ViT-L/14-336 read at layer -2,
    Vicuna-7B (Llama-2-7B's shapes, 32064 tokens, 4096 positions)."""
    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, projection_dim=768)
    text = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       architectures=["LlavaForConditionalGeneration"])


# llava-hf/llava-1.5-7b-hf's preprocessor_config.json: CLIP at 336 pixels.
LLAVA_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}

MODELS = {
    "blip-base": (blip_base, BlipForConditionalGeneration, "blip-tiny"),
    "blip-large": (blip_large, BlipForConditionalGeneration, "blip-tiny"),
    "blip2-opt-2.7b": (blip2_opt_2_7b, Blip2ForConditionalGeneration, "blip2-opt-tiny"),
    "clip-vit-base-patch32": (clip_vit_base_patch32, CLIPModel, "clip-tiny"),
    "clip-vit-large-patch14": (clip_vit_large_patch14, CLIPModel, "clip-tiny"),
    "llava-1.5-7b": (llava_1_5_7b, LlavaForConditionalGeneration, "llava-tiny"),
}

# Written in bfloat16, as the published checkpoint's float16 halves it (14 GB
# instead of 28): what a user with a 7B model runs, and what fits beside
# transformers' copy in a 24 GB machine one at a time.
BF16_MODELS = {"llava-1.5-7b"}


def tensor_specs(config, cls):
    """(name, shape) of every tensor the checkpoint stores, from a meta-device model."""
    with torch.device("meta"):
        model = cls(config)
    tied = set()
    lm = getattr(model, "language_model", None) or getattr(model, "text_decoder", None)
    if lm is not None and lm.get_output_embeddings() is not None:
        if lm.get_output_embeddings().weight is lm.get_input_embeddings().weight:
            prefix = "language_model." if hasattr(model, "language_model") else "text_decoder."
            tied = {n for n, p in model.named_parameters(remove_duplicate=False)
                    if p is lm.get_output_embeddings().weight and n.startswith(prefix) and "lm_head" in n}
    specs = []
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name in tied:
            continue
        seen.add(id(p))
        specs.append((name, tuple(p.shape)))
    for name, b in model.named_buffers():
        if "position_ids" in name:
            continue
        specs.append((name, tuple(b.shape)))
    return specs


def values(rng, name, shape):
    """normal(0, 0.02), except norm weights (1) and CLIP's logit_scale, as
    transformers initialises them."""
    if len(shape) == 1 and name.endswith(".weight") and "norm" in name.lower():
        return np.ones(shape, dtype=np.float32)
    if name == "logit_scale":
        return np.full(shape, 2.6592, dtype=np.float32)
    # asarray: a 0-d draw comes back as a numpy scalar, which safetensors refuses.
    return np.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))


def write(name, out_root):
    make_config, cls, fixture = MODELS[name]
    config = make_config()
    out = out_root / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    specs = tensor_specs(config, cls)
    bf16 = name in BF16_MODELS
    element_bytes = 2 if bf16 else 4
    weight_map, shard, shard_bytes, shards = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            # Only the count: holding every shard's arrays here kept the whole
            # model in memory (the 14 GB LLaVA was OOM-killed at 22 GB).
            shards.append(len(shard))
            file = f"part-{len(shards):05d}.safetensors"
            if bf16:
                save_torch_file(shard, str(out / file), metadata={"format": "pt"})
            else:
                save_file(shard, str(out / file), metadata={"format": "pt"})
            for key in shard:
                weight_map[key] = file
            shard, shard_bytes = {}, 0

    total = 0
    for tensor_name, shape in specs:
        array = values(rng, tensor_name, shape)
        total += array.size
        nbytes = array.size * element_bytes
        if shard_bytes + nbytes > SHARD_BYTES:
            flush()
        # bf16 at once, so a shard holds 2 bytes a value, not the 4 of its draw.
        shard[tensor_name] = torch.from_numpy(array).to(torch.bfloat16) if bf16 else array
        shard_bytes += nbytes
    flush()
    # Name the shards as save_pretrained does.
    n = len(shards)
    renamed = {}
    for i in range(1, n + 1):
        old = out / f"part-{i:05d}.safetensors"
        new = f"model-{i:05d}-of-{n:05d}.safetensors"
        old.rename(out / new)
        renamed[f"part-{i:05d}.safetensors"] = new
    index = {"metadata": {"total_size": total * element_bytes}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    is_clip = isinstance(config, CLIPConfig)
    is_llava = isinstance(config, LlavaConfig)
    # CLIP takes only the fixture's tokenizer: its processor is the tiny model's size.
    wanted = ("tokenizer", "special_tokens", "vocab", "merges") if is_clip else (
        "tokenizer", "processor", "preprocessor", "special_tokens", "vocab")
    for f in (FIXTURES / fixture).iterdir():
        if f.name.startswith(wanted):
            shutil.copy(f, out / f.name)
    if is_llava:
        shutil.copy(FIXTURES / fixture / "chat_template.jinja", out / "chat_template.jinja")
        (out / "preprocessor_config.json").write_text(json.dumps(LLAVA_PREPROCESSOR, indent=2) + "\n")
        processor = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
                     "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}
        (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        # The fixture's small vocabulary: its <image> and <pad> ids stand in
        # for the real 32000 and 32001 (the model's 32064 rows cover both).
        added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
        config.text_config.pad_token_id = next(t["id"] for t in added if t["content"] == "<pad>")
        config.dtype = "bfloat16"
    if is_clip:
        (out / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2) + "\n")
        tokenizer_config = out / "tokenizer_config.json"
        cfg = json.loads(tokenizer_config.read_text())
        cfg["model_max_length"] = config.text_config.max_position_embeddings
        tokenizer_config.write_text(json.dumps(cfg, indent=2) + "\n")
    if hasattr(config, "image_token_index"):
        # The processor writes the tokenizer's own <image> id; the config must agree.
        added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
        config.image_token_index = next(t["id"] for t in added if t["content"] == "<image>")
    config.save_pretrained(out)
    processor = out / "processor_config.json"
    if processor.exists() and not is_llava:
        cfg = json.loads(processor.read_text())
        size = config.vision_config.image_size
        image = cfg.get("image_processor", cfg)
        image["size"] = {"height": size, "width": size}
        if "num_query_tokens" in cfg:
            cfg["num_query_tokens"] = config.num_query_tokens
        processor.write_text(json.dumps(cfg, indent=2))
    print(f"{name}: {total / 1e9:.2f}B parameters, {n} shards, {out}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "models"))
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), default=sorted(MODELS))
    args = parser.parse_args()
    for name in args.only:
        write(name, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
