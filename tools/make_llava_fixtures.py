"""Build the tiny LLaVA (1.5-style: CLIP ViT + 2-layer GELU projector + Llama)
fixture models and record transformers' reference outputs for them.

Run from the repository root with the pinned versions in tools/requirements.txt
(independently of the other scripts, whose paths and noise helper it reuses):

    nice python tools/make_llava_fixtures.py [--only llava-tiny|llava-tiny-full] [--seed N]

(--seed N skips the seed search; use it with --only, the two seeds differ. The
legacy folder is written with llava-tiny.)

It writes
  tests/fixtures/models/llava-tiny/          LlavaForConditionalGeneration + LlavaProcessor,
                                             both by save_pretrained (see "Layouts")
  tests/fixtures/models/llava-tiny-legacy/   the same weights as the hub checkpoints
                                             (llava-hf/llava-1.5-7b-hf) store them, with an
                                             old-style config and processor files
  tests/fixtures/models/llava-tiny-full/     a second model: "full" features from layers
                                             [-3, -1], linear RoPE scaling, tied LM head,
                                             no projector biases
  tests/fixtures/reference/llava-tiny.json, llava-tiny-full.json
Every recorded value comes from the folders reloaded with from_pretrained
(LlavaForConditionalGeneration in float32, eval; LlavaProcessor), as a user's
download would be loaded.

How transformers answers with LLaVA (LlavaForConditionalGeneration.generate):
  prompt    = processor.apply_chat_template(messages, add_generation_prompt=True)
              (the llava-1.5 template below: "USER: <image>\\n{text} ASSISTANT:")
  input_ids = tokenizer(prompt with every "<image>" repeated N times), <s> first
              N = (30//6)*(30//6) + num_additional_image_tokens(1) - (1 if "default")
                = 25 for "default" (CLS dropped), 26 for "full"
  features  = CLIPVisionModel(pixel_values, output_hidden_states).hidden_states[L]
              (hidden_states[0] = pre_layrnorm(embeddings), [i] = output of layer i;
              post_layernorm is never used); "default" drops the CLS row; a list
              of layers is concatenated on the feature axis (in list order)
  image_features = linear_2(gelu(linear_1(features)))        # erf GELU
  inputs_embeds  = embed_tokens(input_ids) with the <image> rows replaced, in
                   order, by image_features (masked_scatter)
  Llama: positions 0..n-1 (cumsum of the mask - 1), RoPE (rotate_half layout),
  grouped-query attention (6 query heads share 2 key/value heads), SiLU-gated
  MLP, RMSNorm (computed in float32), lm_head.
generate returns input_ids followed by the new tokens; the reference records the
new tokens; text = processor.batch_decode(new_ids, skip_special_tokens=True)
(and its .strip()).

The models (sizes unusual on purpose):
  vision  CLIPVisionConfig: width 40, 4 heads (head dim 10), MLP 72, 3 layers,
          30 px, patch 6 (5x5 patches + CLS), quick_gelu, layer_norm_eps 1e-5
  text    LlamaConfig: width 48, 6 heads (head dim 8), 2 key/value heads, MLP 88,
          2 layers, rms_norm_eps 1e-5, max_position_embeddings 128,
          vocab_size = len(tokenizer), bos 1, eos 2, pad = <pad>
                            llava-tiny                 llava-tiny-full
  vision_feature_layer      -2                         [-3, -1] (concatenated: 80)
  select strategy           default (CLS dropped)      full (CLS kept)
  image_seq_length          25                         26
  RoPE                      default, theta 10000       linear, factor 2.0, theta 500000
  projector bias            yes                        no
  tie_word_embeddings       False (own lm_head)        True (lm_head = embed_tokens)
  weight layout             save_pretrained default    save_original_format=False
Transformers 5.23 supports the rope types default, linear, dynamic, yarn,
longrope, llama3 (and a few others) for Llama; "linear" is used here (inv_freq
divided by the factor), recorded in config.json as
  "rope_parameters": {"factor": 2.0, "rope_theta": 500000.0, "rope_type": "linear"}.

Layouts (transformers 5.23 findings, recorded in the JSON's "facts"):
* save_pretrained (save_original_format=True, the default) REVERTS the "llava"
  conversion mapping when it writes: the file has `language_model.model.*`,
  `language_model.lm_head.weight`, `multi_modal_projector.*` and
  `vision_tower.*`. It does NOT write the hub's `vision_tower.vision_model.*`:
  CLIPVisionModel has no `vision_model` submodule in 5.23 (its loading mapping
  is PrefixChange(prefix_to_remove="vision_model")), and a model built from
  scratch (not from_pretrained) drops PrefixChange transforms when saving. So
  llava-tiny/model.safetensors has `vision_tower.embeddings.*`, etc.
* llava-tiny-legacy has the hub layout: `vision_tower.vision_model.*`,
  `multi_modal_projector.*`, `language_model.model.*`,
  `language_model.lm_head.weight`. Loading applies
    ^language_model.lm_head -> lm_head, ^language_model -> model.language_model,
    ^vision_tower -> model.vision_tower, ^multi_modal_projector ->
    model.multi_modal_projector, then (scoped to model.vision_tower, for
    CLIPVisionModel) vision_model.X -> X, and LlavaModel's own
    ^language_model.model -> language_model (scoped to model.) removes the inner
    `model.` level (checked: no missing or unexpected keys, equal tensors).
  Re-saving a model loaded from this layout writes this layout back (the
  PrefixChange is then reverted too), unlike a model built from scratch.
  Its config.json is in the 4.x style of the hub file: text_config with
  "rope_theta" and "rope_scaling": null (no "rope_parameters", no "head_dim"),
  no hidden_act in vision_config (CLIPVisionConfig's default is quick_gelu),
  top-level image_token_index, pad_token_id, vocab_size, ignore_index,
  torch_dtype, no image_seq_length (unused by the model and processor anyway).
  Its processor files are in the hub's older split form: preprocessor_config.json
  (the image processor), processor_config.json (patch_size etc. only) and
  chat_template.json ({"chat_template": ...}); tokenizer.json and
  tokenizer_config.json are copies of llava-tiny's. transformers 5.23 loads it
  all and gives identical ids, pixels, features and logits (asserted).
* llava-tiny-full is saved with save_original_format=False: the in-memory
  names `model.vision_tower.*`, `model.multi_modal_projector.*`,
  `model.language_model.*` (and no lm_head.weight: tied).
* transformers 5 writes "rope_parameters": {"rope_theta", "rope_type", ...} in
  text_config (not rope_theta/rope_scaling) and "dtype" (not torch_dtype).
* AutoTokenizer (hence LlavaProcessor.from_pretrained) loads the tokenizer as
  TokenizersBackend (tokenizer.json as it is), although tokenizer_config.json
  names LlamaTokenizer; LlamaTokenizer.from_pretrained gives the same backend.
* Without torchvision, "image_processor_type": "CLIPImageProcessor" loads as
  CLIPImageProcessorPil (Pillow bicubic resize of the shortest edge to 30,
  center crop 30x30, rescale, CLIP mean/std; RGBA composited on white).

The tokenizer (Llama-style, as transformers 5.23's LlamaTokenizer writes it):
BPE with byte_fallback and fuse_unk, no normalizer, pre_tokenizer
Metaspace(replacement "▁", prepend_scheme "first", split false), decoder
Replace("▁", " ") + ByteFallback + Fuse + Strip(1 leading space), and a
TemplateProcessing post-processor that puts <s> first (tokenizer_config.json
has no add_bos_token key; the BOS comes from tokenizer.json). Ids: <unk>=0,
<s>=1, </s>=2, the 256 byte tokens <0x00>..<0xFF> = 3..258, the characters of
the corpus, then one token per merge; then the added special tokens <image>
and <pad> (in that order, as llava-hf's 32000/32001). The merges come from a
small deterministic BPE trainer written here (train_merges: SentencePiece-like
pieces "▁word" / punctuation runs, most frequent pair first, ties broken by the
pair's text), trained on a generated English corpus about pictures, shapes,
colours and cars (CORPUS_SEED). Anything outside the corpus alphabet (é, —, 🚗,
the newline after <image>) falls back to bytes. The saved tokenizer.json loaded
with tokenizers.Tokenizer.from_file (what the Rust crate does) gives exactly the
processor's input_ids for every prompt (asserted) and the same decode.

Chat template: llava-hf/llava-1.5's, verbatim (TEMPLATE). transformers renders
it with jinja2's ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True) plus an extension that makes `{% generation %}...
{% endgeneration %}` render its body unchanged (it only records character spans
for return_assistant_tokens_mask). Rendered forms are recorded per case, plus:
system messages get no role prefix ("{text} USER: ..."), an assistant turn is
"ASSISTANT: {text} " (trailing space), and a message whose content is a plain
string renders as just "USER: " (the template iterates the string's
characters, none of which has type "image"/"text"; the processor does not wrap
strings into [{"type": "text"}] before rendering).

Weights and seeds: random models have flat logits, so the script sets every
weight itself (init_weights, one torch.Generator per seed): linear weights
N(0, (gain / sqrt(fan_in))^2) (gain 1, projector 1.5, Llama o_proj/down_proj
OUT_GAIN), biases N(0, 0.3^2), LayerNorm/RMSNorm weights N(1, 0.2^2) and
LayerNorm biases N(0, 0.2^2) (transformers would zero biases and set norms to 1,
which would hide a forgotten bias), class embedding N(0, 1), position
embeddings N(0, 0.5^2), token embeddings N(0, EMBED_STD^2), the untied lm_head
with gain LM_GAIN = 10 (logits of std ~10, so margins are wide in absolute
terms). In the output head (the embedding itself when tied) the rows of <unk>,
<s>, <image> and <pad> are scaled by 0.05 so no answer contains a special token
but </s>, the 256 byte rows by 0.85 so answers are mostly word pieces (byte
tokens, some forming invalid UTF-8 that decodes to U+FFFD, still occur), and
the </s> row by EOS_SCALE so that some answers end on it. A tied random head
favours repeating the last input token (its logit is |e|^2), so llava-tiny-full
has small embeddings (EMBED_STD 0.3), strong layer outputs (OUT_GAIN 3) and a
final RMSNorm weight around FINAL_NORM = 8 to spread its logits; its answers
still repeat a lot.
Seeds 0..399 get a cheap greedy pass; a seed is acceptable when every greedy
decision of every case (both rows of the batch case included) has a
top-1/top-2 logit margin >= MIN_MARGIN, every answer has at least MIN_TOKENS
tokens before any </s> and no other special token, all six answers differ, at
least one answer ends on </s> and one at max_new_tokens, and Python's strip()
of each text equals a strip of Unicode White_Space (Rust's trim()). The
acceptable seeds, widest smallest margin first, must then keep their greedy
ids under +-NOISE jitter and in float64; of the first MAX_CANDIDATES that do,
the one with the most stable beam cases (same ids under jitter and in float64),
then the widest smallest margin, is kept. The committed seeds are 201
(llava-tiny, smallest margin 0.234, in the batch case) and 108 (llava-tiny-full,
0.361); all beam cases are stable. The margins are recorded per step, per case
and over all.

Generation settings recorded: greedy = dict(do_sample=False, num_beams=1,
max_new_tokens=12); beams = dict(do_sample=False, num_beams=3,
num_return_sequences=3, length_penalty=1.0, max_new_tokens=12) (early_stopping
left at its default, False). generation_config.json is what transformers writes
(bos 1, eos 2, pad = <pad>; no max length), so the lengths above are passed to
generate explicitly.
"""

import copy
import json
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import (
    CLIPImageProcessorPil,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    LogitsProcessorList,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import IMAGES, MIN_MARGIN, MODELS, NOISE, REFERENCE, Jitter, strip_padding  # noqa: E402

NAME = "llava-tiny"
LEGACY = "llava-tiny-legacy"
FULL = "llava-tiny-full"

TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

IMAGE_SIZE = 30
PATCH_SIZE = 6
MAX_NEW_TOKENS = 12
GREEDY = dict(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS)
BEAMS = dict(do_sample=False, num_beams=3, num_return_sequences=3, length_penalty=1.0, max_new_tokens=MAX_NEW_TOKENS)
# Every greedy answer has at least this many tokens before an eos.
MIN_TOKENS = 3
# The first steps whose full logit rows are recorded.
FULL_ROW_STEPS = 3
TOP_K = 5

# Weight scales (see the docstring).
VISION_GAIN = 1.0
TEXT_GAIN = 1.0
# The attention and MLP output projections of the Llama (o_proj, down_proj): the
# layers' contributions must outweigh the token embedding in the residual stream,
# or a tied head just repeats the last input token.
OUT_GAIN = {NAME: 1.0, FULL: 3.0}
EMBED_STD = {NAME: 1.0, FULL: 0.3}
# The mean of the Llama's final RMSNorm weight: with a tied head the logits scale
# with the embeddings, so a small EMBED_STD needs a larger final norm.
FINAL_NORM = {NAME: 1.0, FULL: 8.0}
PROJ_GAIN = 1.5
LM_GAIN = 10.0
# Output-head rows of the 256 byte tokens: scaled down so answers are mostly
# word pieces (byte tokens still occur).
BYTE_ROW_SCALE = 0.85
BIAS_STD = 0.3
NORM_STD = 0.2
SPECIAL_ROW_SCALE = 0.05
EOS_SCALE = {NAME: 1.5, FULL: 2.0}
SEEDS = range(400)
MAX_CANDIDATES = 6

CORPUS_SEED = 0
NUM_MERGES = 220

# ---------------------------------------------------------------------------
# The cases. Images from tests/fixtures/images.

QUESTION_A = "What color is the background?"
QUESTION_B = "Describe  this picture \u2014 caf\u00e9, na\u00efve \U0001f697?"
QUESTION_C2 = "What shape is in this picture?"
SYSTEM_D = "You are a helpful assistant. Answer in a few words."
QUESTION_D = "What is this?"
QUESTION_E = "Describe the image."


def user(text, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def case_specs(answer_a: str):
    """(name, images, messages). Case c needs case a's greedy answer."""
    return [
        ("a_single_turn", ["chelsea.png"], [user(QUESTION_A)]),
        ("b_non_ascii", ["astronaut.jpg"], [user(QUESTION_B)]),
        (
            "c_multi_turn",
            ["chelsea.png"],
            [
                user(QUESTION_A),
                {"role": "assistant", "content": [{"type": "text", "text": answer_a}]},
                user(QUESTION_C2, image=False),
            ],
        ),
        (
            "d_system",
            ["wide.png"],
            [{"role": "system", "content": [{"type": "text", "text": SYSTEM_D}]}, user(QUESTION_D)],
        ),
        ("e_batch", ["astronaut.jpg", "rgba.png"], [user(QUESTION_E)]),
    ]


# ---------------------------------------------------------------------------
# Tokenizer

CORPUS_WORDS = """a an the this that it is are was of on in at with and to for what which how
color colour shape background picture image photo describe describes shows show see there
circle square triangle red blue green yellow white black gray orange brown dark light
large small big little left right middle top bottom center cost costs fix repair car cars
truck road street cat dog animal person man woman astronaut space rocket sky cup coffee
user assistant question answer helpful words few you your can does much many
""".split()
COLORS = "red blue green yellow white black gray orange brown".split()
SHAPES = "circle square triangle".split()
OBJECTS = "cat dog car truck rocket cup astronaut person man woman".split()


def corpus():
    """A deterministic English corpus for the BPE trainer."""
    import random

    rng = random.Random(CORPUS_SEED)
    lines = []
    for _ in range(120):
        c, s, b, o = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(COLORS), rng.choice(OBJECTS)
        lines += [
            f"USER: What color is the background? ASSISTANT: The background is {b}.",
            f"USER: What shape is in this picture? ASSISTANT: A {c} {s}.",
            f"USER: Describe this picture. ASSISTANT: This image shows a {c} {s} on a {b} background.",
            f"USER: What is this? ASSISTANT: This is a {o}.",
            f"How much does it cost to fix this car? It costs a few {rng.choice(['dollars', 'words'])}.",
            " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 9)))
            + rng.choice([".", "?", "!", ",", ""]),
        ]
    lines += ["You are a helpful assistant. Answer in a few words."] * 10
    # Every printable ASCII character is in the alphabet (only non-ASCII text
    # falls back to bytes).
    lines.append(" ".join(chr(c) for c in range(33, 127) if chr(c) != "▁"))
    return lines


# SentencePiece-like pieces: a run of letters, of digits, or of other symbols,
# each with its leading "▁" (split_by_unicode_script / split_by_number).
PIECE = re.compile(r"▁?[A-Za-z]+|▁?[0-9]+|▁?[^A-Za-z0-9▁]+|▁")


def train_merges(lines, num_merges):
    """A small deterministic BPE trainer: the most frequent adjacent pair first,
    ties broken by the pair's text; merges never cross a piece."""
    counts = Counter()
    for line in lines:
        text = "▁" + line.strip().replace(" ", "▁")
        counts.update(PIECE.findall(text))
    merges = merges_of(counts, num_merges)
    alphabet = sorted({ch for w in counts for ch in w})
    return alphabet, merges


def merges_of(counts, max_merges):
    """BPE merges of counted pieces: the most frequent adjacent pair first,
    ties broken by the pair's text; merges never cross a piece; stops when
    no pair occurs twice."""
    words = {w: list(w) for w in counts}
    merges = []
    for _ in range(max_merges):
        pairs = Counter()
        for w, c in counts.items():
            syms = words[w]
            for pair in zip(syms, syms[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
    return merges


def build_tokenizer() -> LlamaTokenizer:
    alphabet, merges = train_merges(corpus(), NUM_MERGES)
    return llama_tokenizer(alphabet, merges)


def llama_tokenizer(alphabet, merges) -> LlamaTokenizer:
    """A Llama-layout byte-fallback BPE: <unk> <s> </s>, the 256 byte tokens,
    the alphabet, one token per merge, then (as llava-hf: <image> (32000
    there) then <pad> (32001), both special) the added <image> and <pad>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids("<image>") == len(vocab)
    assert tokenizer.pad_token_id == len(vocab) + 1 == len(tokenizer) - 1
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    assert tokenizer("hi").input_ids[0] == 1
    return tokenizer


def make_processor(tokenizer, strategy: str) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        resample=3,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=copy.deepcopy(tokenizer),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )


# ---------------------------------------------------------------------------
# Models


def llava_config(tokenizer, variant: str) -> LlavaConfig:
    full = variant == FULL
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=40,
        num_attention_heads=4,
        intermediate_size=72,
        num_hidden_layers=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    rope = (
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
        if full
        else {"rope_type": "default", "rope_theta": 10000.0}
    )
    text = dict(
        model_type="llama",
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=88,
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        rope_parameters=rope,
        vocab_size=len(tokenizer),
        tie_word_embeddings=full,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=26 if full else 25,
        projector_hidden_act="gelu",
        vision_feature_layer=[-3, -1] if full else -2,
        vision_feature_select_strategy="full" if full else "default",
        multimodal_projector_bias=not full,
        tie_word_embeddings=full,
    )
    assert config.text_config.head_dim == 8 and config.vision_config.hidden_act == "quick_gelu"
    return config


def init_weights(model, seed: int, variant: str):
    """Set every weight (see the docstring); deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)

    def normal_(t, mean, std):
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    config = model.config
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("lm_head.weight") and config.tie_word_embeddings:
                continue
            is_vision = ".vision_tower." in f".{name}"
            if name.endswith("language_model.norm.weight"):
                normal_(p, FINAL_NORM[variant], NORM_STD)
            elif "norm" in name.split(".")[-2] or "layer_norm" in name:
                normal_(p, 1.0 if name.endswith("weight") else 0.0, NORM_STD)
            elif name.endswith("bias"):
                normal_(p, 0.0, BIAS_STD)
            elif name.endswith("embed_tokens.weight"):
                normal_(p, 0.0, EMBED_STD[variant])
            elif name.endswith("class_embedding"):
                normal_(p, 0.0, 1.0)
            elif name.endswith("position_embedding.weight"):
                normal_(p, 0.0, 0.5)
            elif name.endswith("lm_head.weight"):
                normal_(p, 0.0, LM_GAIN / p.shape[1] ** 0.5)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                gain = VISION_GAIN if is_vision else PROJ_GAIN if "multi_modal_projector" in name else TEXT_GAIN
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    gain = OUT_GAIN[variant]
                normal_(p, 0.0, gain / fan_in**0.5)
            else:
                raise AssertionError(name)
        head = model.get_output_embeddings().weight
        text = config.text_config
        for tok in (0, 1, config.image_token_index, text.pad_token_id):
            head[tok] *= SPECIAL_ROW_SCALE
        head[text.eos_token_id] *= EOS_SCALE[variant]
        head[3:259] *= BYTE_ROW_SCALE


def make_model(seed: int, config: LlavaConfig, variant: str):
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    init_weights(model, seed, variant)
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    else:
        assert model.lm_head.weight is not model.get_input_embeddings().weight
    return model


# ---------------------------------------------------------------------------
# Running the cases


def load_images(names):
    return [Image.open(IMAGES / n) for n in names]


def prepare(processor, images, messages):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    n = len(images)
    inputs = processor(images=images, text=[prompt] * n, return_tensors="pt")
    assert inputs["attention_mask"].all(), "equal lengths: no padding"
    return prompt, inputs


def generate(model, inputs, dtype=torch.float32, **kwargs):
    return model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"].to(dtype),
        **kwargs,
    )


def new_tokens(sequences, n_input, eos):
    return [strip_padding(seq.tolist(), eos, prompt_len=n_input)[n_input:] for seq in sequences]


def specials_of(model):
    text = model.config.text_config
    return {0, 1, model.config.image_token_index, text.pad_token_id}


def greedy(model, inputs):
    eos = model.config.text_config.eos_token_id
    n = inputs["input_ids"].shape[1]
    out = generate(model, inputs, output_logits=True, return_dict_in_generate=True, **GREEDY)
    assert out.sequences[:, :n].tolist() == inputs["input_ids"].tolist()
    new_ids = new_tokens(out.sequences, n, eos)
    steps = torch.stack([s.float() for s in out.logits], dim=1)  # [batch, steps, vocab]
    margins = []
    for row, ids in enumerate(new_ids):
        top2 = torch.topk(steps[row, : len(ids)], 2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]).tolist())
    return new_ids, steps, margins


def run_cases(model, processor):
    """Greedy for every case; case c is built from case a's answer."""
    eos = model.config.text_config.eos_token_id
    cases = []
    answer_a = None
    for i, (name, image_names, messages) in enumerate(case_specs("")):
        if name == "c_multi_turn":
            messages = case_specs(answer_a)[2][2]
        prompt, inputs = prepare(processor, load_images(image_names), messages)
        new_ids, steps, margins = greedy(model, inputs)
        texts = processor.batch_decode(new_ids, skip_special_tokens=True)
        if name == "a_single_turn":
            answer_a = texts[0].strip()
        cases.append(
            dict(
                name=name,
                images=image_names,
                messages=messages,
                prompt=prompt,
                inputs=inputs,
                new_ids=new_ids,
                steps=steps,
                margins=margins,
                min_margin=min(min(m) for m in margins),
                texts=texts,
                stopped_on_eos=[ids[-1] == eos for ids in new_ids],
            )
        )
    return cases


def acceptable(model, cases) -> bool:
    eos = model.config.text_config.eos_token_id
    specials = specials_of(model)
    answers = []
    for c in cases:
        if c["min_margin"] < MIN_MARGIN:
            return False
        for ids in c["new_ids"]:
            body = ids[:-1] if ids[-1] == eos else ids
            if len(body) < MIN_TOKENS or eos in body or specials & set(ids):
                return False
            answers.append(tuple(ids))
        if any(t.strip() != t.strip(UNICODE_WHITE_SPACE) for t in c["texts"]):
            return False
    # Answers depend on the image and the prompt: all six differ.
    if len(set(answers)) < len(answers):
        return False
    stops = [s for c in cases for s in c["stopped_on_eos"]]
    return any(stops) and not all(stops)


# Python's str.strip() also strips \x1c-\x1f, which are not Unicode White_Space
# (Rust's str::trim); a text whose ends differ between the two is rejected.
UNICODE_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + (
    "\u2028\u2029\u202f\u205f\u3000"
)


def stable(model, model64, c, kwargs, expected) -> bool:
    """The same ids under +-NOISE jitter (4 draws) and in float64."""
    eos = model.config.text_config.eos_token_id
    n = c["inputs"]["input_ids"].shape[1]
    for trial in range(4):
        gen = torch.Generator().manual_seed(trial)
        out = generate(model, c["inputs"], logits_processor=LogitsProcessorList([Jitter(gen)]), **kwargs)
        if new_tokens(out, n, eos) != expected:
            return False
    out = generate(model64, c["inputs"], dtype=torch.float64, **kwargs)
    return new_tokens(out, n, eos) == expected


def check_greedy(model, model64, cases) -> bool:
    return all(stable(model, model64, c, GREEDY, c["new_ids"]) for c in cases)


def beam_cases(model, model64, processor, cases) -> int:
    """3 beams, 3 returned sequences, for every case; returns how many are stable."""
    eos = model.config.text_config.eos_token_id
    for c in cases:
        n = c["inputs"]["input_ids"].shape[1]
        out = generate(model, c["inputs"], output_scores=True, return_dict_in_generate=True, **BEAMS)
        new_ids = new_tokens(out.sequences, n, eos)
        exact = generate(
            model64, c["inputs"], dtype=torch.float64, output_scores=True, return_dict_in_generate=True, **BEAMS
        )
        texts = processor.batch_decode(new_ids, skip_special_tokens=True)
        k = BEAMS["num_return_sequences"]

        def rows(xs):
            """[batch * k] -> [batch][k] (transformers orders them by batch row, then beam)."""
            return [xs[i : i + k] for i in range(0, len(xs), k)]

        c["beams"] = dict(
            new_ids=rows(new_ids),
            sequences_scores=rows([f32(x) for x in out.sequences_scores.tolist()]),
            sequences_scores_f64=rows(exact.sequences_scores.tolist()),
            text=rows(texts),
            text_stripped=rows([t.strip() for t in texts]),
            stopped_on_eos=rows([ids[-1] == eos for ids in new_ids]),
            stable=bool(
                stable(model, model64, c, BEAMS, new_ids) and new_tokens(exact.sequences, n, eos) == new_ids
            ),
        )
    return sum(c["beams"]["stable"] for c in cases)


def search(config, processor, variant, seeds):
    """A cheap greedy pass over every seed, then the expensive checks (jitter,
    float64, beams) on the acceptable seeds, widest smallest margin first; of the
    first MAX_CANDIDATES that pass, the one with the most stable beam cases, then
    the widest margin, is kept."""
    ranked = []
    for seed in seeds:
        model = make_model(seed, config, variant)
        cases = run_cases(model, processor)
        if acceptable(model, cases):
            ranked.append((min(c["min_margin"] for c in cases), seed))
    ranked.sort(reverse=True)
    print(f"{variant}: {len(ranked)} of {len(seeds)} seeds acceptable", flush=True)
    best = None
    candidates = 0
    for margin, seed in ranked:
        model = make_model(seed, config, variant)
        cases = run_cases(model, processor)
        model64 = copy.deepcopy(model).double()
        if not check_greedy(model, model64, cases):
            print(f"{variant} seed {seed}: greedy not stable")
            continue
        n_stable = beam_cases(model, model64, processor, cases)
        candidates += 1
        print(f"{variant} seed {seed}: min margin {margin:.4f}, beams stable {n_stable}/{len(cases)}", flush=True)
        rank = (n_stable, margin)
        if best is None or rank > best[0]:
            best = (rank, seed)
        if candidates >= MAX_CANDIDATES:
            break
    if best is None:
        raise SystemExit(f"{variant}: no seed gave clear margins")
    return best[1]


# ---------------------------------------------------------------------------
# Recording


def f32(x):
    """The shortest decimal that reads back as the same float32."""
    return float(str(np.float32(x)))


def dumps(obj, indent=0) -> str:
    """JSON with one item per line, except that lists of numbers (and of ids,
    texts and bools) stay on one line: the reference stays readable and small."""
    pad = " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(x, (dict, list, tuple)) for x in obj):
            return json.dumps(list(obj), ensure_ascii=False)
        return "[\n" + ",\n".join(pad + dumps(x, indent + 1) for x in obj) + "\n" + " " * indent + "]"
    return json.dumps(obj, ensure_ascii=False)


def flat(t):
    return dict(shape=list(t.shape), data=[f32(x) for x in t.detach().float().reshape(-1).tolist()])


def vision_features(model, pixel_values):
    """The vision tower's selected hidden states (before the projector), by hand."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == cfg.vision_config.num_hidden_layers + 1
    # hidden_states[-1] is the last layer's output, before post_layernorm.
    torch.testing.assert_close(hs[-1], out.last_hidden_state, rtol=0, atol=0)
    layers = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer
    picked = [hs[i][:, 1:] if cfg.vision_feature_select_strategy == "default" else hs[i] for i in layers]
    return torch.cat(picked, dim=-1)


def record_case(model, processor, c):
    tok = processor.tokenizer
    inputs = c["inputs"]
    ids = inputs["input_ids"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        image_features = torch.stack(list(features.pooler_output))
        selected = vision_features(model, inputs["pixel_values"])
        projected = model.model.multi_modal_projector(selected)
        torch.testing.assert_close(projected, image_features, rtol=0, atol=0)
        logits = model(**inputs).logits[:, -1]
    # Greedy's first-step logits are the forward's last-position logits.
    torch.testing.assert_close(logits, c["steps"][:, 0], rtol=0, atol=1e-4)
    unexpanded = tok([c["prompt"]] * ids.shape[0]).input_ids
    n_image = (ids[0] == model.config.image_token_index).sum().item()
    steps = []
    for s in range(c["steps"].shape[1]):
        top = torch.topk(c["steps"][:, s], TOP_K, dim=-1)
        steps.append(
            dict(
                top_ids=top.indices.tolist(),
                top_logits=[[f32(x) for x in row] for row in top.values.tolist()],
                margin=[m[s] if s < len(m) else None for m in c["margins"]],
            )
        )
    raw = processor.batch_decode(c["new_ids"], skip_special_tokens=True)
    return dict(
        name=c["name"],
        images=c["images"],
        messages=c["messages"],
        prompt=c["prompt"],
        input_ids=ids.tolist(),
        input_ids_unexpanded=unexpanded,
        num_image_tokens=n_image,
        pixel_values=flat(inputs["pixel_values"]),
        vision_features=flat(selected),
        image_features=flat(image_features),
        greedy=dict(
            new_ids=c["new_ids"],
            text=raw,
            text_stripped=[t.strip() for t in raw],
            text_with_special_tokens=processor.batch_decode(c["new_ids"], skip_special_tokens=False),
            tokens=[tok.convert_ids_to_tokens(x) for x in c["new_ids"]],
            stopped_on_eos=c["stopped_on_eos"],
            min_margin=c["min_margin"],
            margins=c["margins"],
            logits_first_steps=[
                [[f32(x) for x in c["steps"][b, s].tolist()] for b in range(ids.shape[0])]
                for s in range(min(FULL_ROW_STEPS, c["steps"].shape[1]))
            ],
            steps=steps,
        ),
        beams=c["beams"],
    )


def bf16_record(model, c):
    """First-step logits with model.to(torch.bfloat16), and the bf16 greedy ids."""
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    inputs = c["inputs"]
    with torch.no_grad():
        logits = model16(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"].to(torch.bfloat16),
        ).logits[:, -1]
    eos = model.config.text_config.eos_token_id
    out = generate(model16, inputs, dtype=torch.bfloat16, **GREEDY)
    ref = c["steps"][:, 0]
    return dict(
        case=c["name"],
        dtype="bfloat16",
        note="copy.deepcopy(model).to(torch.bfloat16); pixel_values cast to bfloat16; logits stored as float32",
        first_logits=[[f32(x) for x in row] for row in logits.float().tolist()],
        max_abs_diff_to_f32=float((logits.float() - ref).abs().max()),
        argmax_equal_f32=bool((logits.float().argmax(-1) == ref.argmax(-1)).all()),
        greedy_new_ids=new_tokens(out, inputs["input_ids"].shape[1], eos),
    )


def layout_of(folder: Path):
    files = sorted(folder.glob("*.safetensors"))
    keys = []
    for f in files:
        with safe_open(str(f), "pt") as h:
            keys += list(h.keys())
    prefixes = sorted({re.sub(r"\.(layers\.\d+|encoder\.layers\.\d+)\..*", r".\1.*", k) for k in keys})
    prefixes = sorted({re.sub(r"layers\.\d+\.", "layers.N.", p) for p in prefixes})
    return dict(files=[f.name for f in files], num_tensors=len(keys), names=prefixes)


def tokenizer_checks(processor, folder, records):
    """tokenizers.Tokenizer.from_file(tokenizer.json) (as the Rust crate) gives the
    processor's ids for every prompt (with the processor's <image> expansion) and
    the same decode."""
    rust_like = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = processor.tokenizer
    n_checked = 0
    for r in records:
        image_token = processor.image_token
        expanded = r["prompt"].replace(image_token, image_token * r["num_image_tokens"])
        for row in r["input_ids"]:
            assert rust_like.encode(expanded).ids == row, r["name"]
            assert tok(expanded).input_ids == row
            n_checked += 1
        for row in r["input_ids_unexpanded"]:
            assert rust_like.encode(r["prompt"]).ids == row
        for ids in r["greedy"]["new_ids"] + [x for row in r["beams"]["new_ids"] for x in row]:
            assert rust_like.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
            assert rust_like.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
        for row in r["input_ids"]:
            assert rust_like.decode(row, skip_special_tokens=True) == tok.decode(row, skip_special_tokens=True)
    unk = tok.unk_token_id
    assert all(unk not in row for r in records for row in r["input_ids"])
    return n_checked


def tokenizer_facts(processor, folder):
    tok = processor.tokenizer
    data = json.loads((folder / "tokenizer.json").read_text())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    probe = "Describe  this picture \u2014 caf\u00e9"
    probe_ids = tok(probe).input_ids
    llama = LlamaTokenizer.from_pretrained(folder)
    assert llama._tokenizer.to_str() == tok._tokenizer.to_str() and llama(probe).input_ids == probe_ids
    return dict(
        tokenizer_class=type(tok).__name__,
        tokenizer_class_note="tokenizer_config.json says LlamaTokenizer, but AutoTokenizer (and so "
        "LlavaProcessor.from_pretrained) loads TokenizersBackend, which takes tokenizer.json as it is; "
        "LlamaTokenizer.from_pretrained gives the identical backend (asserted)",
        vocab_size=len(tok),
        special_ids={t: tok.convert_tokens_to_ids(t) for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]},
        byte_token_ids="<0x00>..<0xFF> = 3..258",
        num_merges=len(data["model"]["merges"]),
        model={k: v for k, v in data["model"].items() if k not in ("vocab", "merges")},
        normalizer=data["normalizer"],
        pre_tokenizer=data["pre_tokenizer"],
        post_processor=data["post_processor"]["type"],
        decoder=data["decoder"],
        added_tokens=[(t["id"], t["content"], t["special"]) for t in data["added_tokens"]],
        tokenizer_config_keys=sorted(cfg),
        add_bos_token_in_tokenizer_config=cfg.get("add_bos_token", "absent"),
        processor_adds_bos=True,
        probe=dict(text=probe, ids=probe_ids, tokens=tok.convert_ids_to_tokens(probe_ids)),
        image_newline="'<image>\\n': the newline after an added token gets no '▁' (prepend_scheme first) and "
        "falls back to <0x0A> (id 13)",
        checked="tokenizers.Tokenizer.from_file(tokenizer.json).encode(expanded prompt) == the processor's "
        "input_ids for every case and batch row; encode(unexpanded prompt) == tokenizer(prompt); decode with and "
        "without skip_special_tokens equal for every recorded id sequence",
    )


def template_facts(processor, cases):
    by = {c["name"]: c for c in cases}
    c = by["c_multi_turn"]
    plain = [{"role": "user", "content": "What color is the background?"}]
    return dict(
        jinja_environment="ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions="
        "[AssistantTracker (the {% generation %} tag), loopcontrols])",
        generation_tag="{% generation %}...{% endgeneration %} renders its body unchanged; it only records the "
        "span for return_assistant_tokens_mask",
        case_c_add_generation_prompt_false=processor.apply_chat_template(c["messages"], add_generation_prompt=False),
        case_c_add_generation_prompt_true=c["prompt"],
        plain_string_content=dict(
            messages=plain,
            add_generation_prompt_true=processor.apply_chat_template(plain, add_generation_prompt=True),
            add_generation_prompt_false=processor.apply_chat_template(plain, add_generation_prompt=False),
        ),
        system_message=dict(messages=by["d_system"]["messages"], rendered=by["d_system"]["prompt"]),
        tokenize_true_equals_processor=True,
    )


def check_tokenize_true(processor, cases):
    """apply_chat_template(tokenize=True) == processor(text=prompt) for single-image cases."""
    for c in cases:
        if len(c["images"]) != 1:
            continue
        ids = processor.apply_chat_template(
            [dict(m) for m in c["messages"]],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            processor_kwargs=dict(images=load_images(c["images"])),
        )["input_ids"]
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        assert ids == c["inputs"]["input_ids"].tolist(), c["name"]


def batch_vs_single(model, processor, c):
    """Each row of the batch case equals the image on its own."""
    out = []
    for i, name in enumerate(c["images"]):
        _, inputs = prepare(processor, load_images([name]), c["messages"])
        ids, steps, _ = greedy(model, inputs)
        assert ids[0] == c["new_ids"][i], (name, ids, c["new_ids"][i])
        out.append(float((steps[0, 0] - c["steps"][i, 0]).abs().max()))
    return out


# ---------------------------------------------------------------------------
# Legacy folder


def legacy_config(cfg: dict) -> dict:
    """config.json in the 4.x style of llava-hf/llava-1.5-7b-hf."""
    text = cfg["text_config"]
    rope = text["rope_parameters"]
    assert rope == {"rope_theta": 10000.0, "rope_type": "default"}
    vision = cfg["vision_config"]
    assert vision["hidden_act"] == "quick_gelu"
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": cfg["image_token_index"],
        "model_type": "llava",
        "pad_token_id": text["pad_token_id"],
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": text["bos_token_id"],
            "eos_token_id": text["eos_token_id"],
            "hidden_size": text["hidden_size"],
            "intermediate_size": text["intermediate_size"],
            "max_position_embeddings": text["max_position_embeddings"],
            "model_type": "llama",
            "num_attention_heads": text["num_attention_heads"],
            "num_hidden_layers": text["num_hidden_layers"],
            "num_key_value_heads": text["num_key_value_heads"],
            "pad_token_id": text["pad_token_id"],
            "rms_norm_eps": text["rms_norm_eps"],
            "rope_scaling": None,
            "rope_theta": rope["rope_theta"],
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "vocab_size": text["vocab_size"],
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            # hidden_act omitted, as in the hub file: CLIPVisionConfig's default is quick_gelu.
            "hidden_size": vision["hidden_size"],
            "image_size": vision["image_size"],
            "intermediate_size": vision["intermediate_size"],
            "layer_norm_eps": vision["layer_norm_eps"],
            "model_type": "clip_vision_model",
            "num_attention_heads": vision["num_attention_heads"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "patch_size": vision["patch_size"],
            "projection_dim": 768,
        },
        "vision_feature_layer": cfg["vision_feature_layer"],
        "vision_feature_select_strategy": cfg["vision_feature_select_strategy"],
        "vocab_size": text["vocab_size"],
    }


def legacy_name(key: str) -> str:
    """llava-tiny's saved names (save_pretrained default) -> the hub's."""
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key[len("vision_tower.") :]
    assert key.startswith(("language_model.model.", "language_model.lm_head.", "multi_modal_projector.")), key
    return key


def write_legacy(src: Path):
    out = MODELS / LEGACY
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    state = load_file(str(src / "model.safetensors"))
    save_file({legacy_name(k): v.contiguous() for k, v in sorted(state.items())}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(legacy_config(cfg), indent=2, sort_keys=True) + "\n")
    gen = json.loads((src / "generation_config.json").read_text())
    gen = {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen["_from_model_config"] = True
    gen["transformers_version"] = "4.36.0.dev0"
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    pcfg = json.loads((src / "processor_config.json").read_text())
    image_cfg = dict(pcfg.pop("image_processor"))
    image_cfg["processor_class"] = "LlavaProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2, sort_keys=True) + "\n")
    (out / "processor_config.json").write_text(json.dumps(pcfg, indent=2, sort_keys=True) + "\n")
    template = (src / "chat_template.jinja").read_text()
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, out / f)
    return out


def legacy_facts(reference_model, cases, records):
    out = MODELS / LEGACY
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    model.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref_state = reference_model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    processor = LlavaProcessor.from_pretrained(out)
    assert processor.chat_template == TEMPLATE
    assert processor.num_additional_image_tokens == 1 and processor.patch_size == PATCH_SIZE
    text = model.config.text_config
    facts = dict(
        loads_without_missing_or_unexpected_keys=True,
        same_weights_as_llava_tiny=True,
        loaded_text_rope_parameters=dict(text.rope_parameters),
        loaded_vision_hidden_act=model.config.vision_config.hidden_act,
        loaded_image_seq_length=model.config.image_seq_length,
        layout=layout_of(out),
        rename_rules_on_load=[
            "^language_model.lm_head -> lm_head",
            "^language_model -> model.language_model (and LlavaModel: ^language_model.model -> language_model)",
            "^vision_tower -> model.vision_tower",
            "^multi_modal_projector -> model.multi_modal_projector",
            "CLIPVisionModel (scoped to model.vision_tower): PrefixChange(prefix_to_remove='vision_model')",
        ],
    )
    # Case a through the legacy folder: identical everything.
    c = cases[0]
    r = records[0]
    prompt, inputs = prepare(processor, load_images(c["images"]), c["messages"])
    assert prompt == c["prompt"]
    for k in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(inputs[k], c["inputs"][k]), k
    new_ids, steps, _ = greedy(model, inputs)
    assert new_ids == c["new_ids"]
    assert torch.equal(steps[:, : c["steps"].shape[1]], c["steps"]), "identical logits"
    eos = text.eos_token_id
    beams = generate(model, inputs, output_scores=True, return_dict_in_generate=True, **BEAMS)
    assert new_tokens(beams.sequences, inputs["input_ids"].shape[1], eos) == r["beams"]["new_ids"][0]
    assert [f32(x) for x in beams.sequences_scores.tolist()] == r["beams"]["sequences_scores"][0]
    facts["case_a"] = dict(
        identical_input_ids_pixel_values_greedy_ids_and_logits=True,
        identical_beams=True,
        greedy_new_ids=new_ids,
        max_abs_logit_diff=float((steps[:, : c["steps"].shape[1]] - c["steps"]).abs().max()),
    )
    # What 5.23 writes when it re-saves a model loaded from the hub layout.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        facts["resaved_by_5_23"] = layout_of(Path(tmp))
    return facts


# ---------------------------------------------------------------------------


def build(variant, tokenizer, seeds):
    strategy = "full" if variant == FULL else "default"
    processor = make_processor(tokenizer, strategy)
    config = llava_config(processor.tokenizer, variant)
    seed = search(config, processor, variant, seeds)
    model = make_model(seed, config, variant)

    out = MODELS / variant
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, save_original_format=variant != FULL)
    processor.save_pretrained(out)

    # Reload from disk, as a user would, and record everything from the reload.
    reloaded, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    reloaded.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reprocessor = LlavaProcessor.from_pretrained(out)
    assert reprocessor.chat_template == TEMPLATE
    assert type(reprocessor.image_processor).__name__ == "CLIPImageProcessorPil"
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    if variant == FULL:
        assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    cases = run_cases(reloaded, reprocessor)
    assert acceptable(reloaded, cases)
    model64 = copy.deepcopy(reloaded).double()
    assert check_greedy(reloaded, model64, cases)
    n_stable = beam_cases(reloaded, model64, reprocessor, cases)
    check_tokenize_true(reprocessor, cases)
    by = {c["name"]: c for c in cases}
    batch_diffs = batch_vs_single(reloaded, reprocessor, by["e_batch"])
    records = [record_case(reloaded, reprocessor, c) for c in cases]
    n_tok = tokenizer_checks(reprocessor, out, records)

    cfg = reloaded.config
    text = cfg.text_config
    saved_cfg = json.loads((out / "config.json").read_text())
    facts = dict(
        layout=layout_of(out),
        save_original_format=variant != FULL,
        config_json_text_rope=saved_cfg["text_config"].get("rope_parameters"),
        config_json_text_keys=sorted(saved_cfg["text_config"]),
        config_json_top_keys=sorted(saved_cfg),
        generation_config_json=json.loads((out / "generation_config.json").read_text()),
        image_processor_class_loaded=type(reprocessor.image_processor).__name__,
        processor_files=sorted(p.name for p in out.iterdir()),
        processor_input_ids_start_with_bos=all(r["input_ids"][0][0] == 1 for r in records),
        batch_rows_equal_single_image_runs=True,
        batch_vs_single_first_logits_max_abs_diff=batch_diffs,
        tokenizer_checked_rows=n_tok,
        vision_hidden_states="hidden_states[0] = pre_layrnorm(embeddings); hidden_states[i] = output of layer i; "
        "hidden_states[-1] == last_hidden_state (no post_layernorm); post_layernorm is unused by LLaVA",
        image_seq_length_used="no: the processor counts image tokens from patch_size, "
        "num_additional_image_tokens and the strategy; the model only checks the count matches the features",
    )
    facts["tokenizer"] = tokenizer_facts(reprocessor, out)
    facts["template"] = template_facts(reprocessor, cases)
    if variant == NAME:
        write_legacy(out)
        facts["legacy"] = legacy_facts(reloaded, cases, records)
    meta = dict(
        model=variant,
        legacy_model=LEGACY if variant == NAME else None,
        seed=seed,
        transformers=transformers.__version__,
        torch=torch.__version__,
        tokenizers=tokenizers.__version__,
        min_margin=min(c["min_margin"] for c in cases),
        min_margin_case=min(cases, key=lambda c: c["min_margin"])["name"],
        margin_rule=f">= {MIN_MARGIN} at every greedy step; greedy ids survive +-{NOISE} jitter and float64",
        noise=NOISE,
        beams_stable=f"{n_stable}/{len(cases)}",
        config=dict(
            image_token_index=cfg.image_token_index,
            image_seq_length=cfg.image_seq_length,
            vocab_size=text.vocab_size,
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
            pad_token_id=text.pad_token_id,
            unk_token_id=0,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            rope_parameters=dict(text.rope_parameters),
            tie_word_embeddings=cfg.tie_word_embeddings,
            multimodal_projector_bias=cfg.multimodal_projector_bias,
        ),
        generation=dict(greedy=GREEDY, beams=BEAMS, early_stopping="default (False)"),
        layout=dict(
            logits_first_steps="[step][batch row][vocab], the raw logits (output_logits) of the first "
            f"{FULL_ROW_STEPS} greedy steps",
            steps="per greedy step: top-5 ids and logits per batch row (best first), margin = top1 - top2 "
            "(None after that row's eos)",
            first_step="logits_first_steps[0] equals forward(**inputs).logits[:, -1] (to 1e-4, asserted)",
            pixel_values="[batch, 3, 30, 30], flattened row-major",
            vision_features="the selected vision hidden states before the projector, [batch, N, width*layers]",
            image_features="get_image_features(pixel_values).pooler_output stacked, [batch, N, 48]",
            input_ids_unexpanded="tokenizer(prompt) with one <image> token per image",
            beams="[batch row][returned sequence, best first]: new ids (padding after eos removed), "
            "sequences_scores (f32, and the same model in float64), decoded texts; stable = same ids under "
            "jitter and in float64",
            floats="each float is the shortest decimal that reads back as the same float32",
        ),
        facts=facts,
        bf16=bf16_record(reloaded, by["a_single_turn"]),
        cases=records,
    )
    REFERENCE.mkdir(parents=True, exist_ok=True)
    text = dumps(meta) + "\n"
    assert json.loads(text) == json.loads(json.dumps(meta))
    (REFERENCE / f"{variant}.json").write_text(text)
    print(f"{variant}: seed {seed}, min margin {meta['min_margin']:.4f} ({meta['min_margin_case']}), "
          f"beams stable {n_stable}/{len(cases)}")
    for c in cases:
        print(f"  {c['name']:14} margin {c['min_margin']:7.3f} eos={c['stopped_on_eos']} "
              f"n={[len(x) for x in c['new_ids']]} {c['texts']!r}")
        print(f"  {'':14} beams {c['beams']['text_stripped']!r} stable={c['beams']['stable']}")
        print(f"  {'':14} {c['prompt']!r}")


def main():
    # One intra-op thread: every op here is far below torch's parallel grain size,
    # and the machine is shared.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    seeds = [int(sys.argv[sys.argv.index("--seed") + 1])] if "--seed" in sys.argv else SEEDS
    tokenizer = build_tokenizer()
    for variant in (NAME, FULL):
        if only in (None, variant):
            build(variant, tokenizer, seeds)


if __name__ == "__main__":
    main()
