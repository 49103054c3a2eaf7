"""Train the tiny demo CLIP (`demo-clip`) on the shapes world of
tools/make_demo_models.py and record what transformers does with it.

Run from the repository root with the pinned versions in tools/requirements.txt:

    python tools/make_demo_clip.py

It writes
  models/demo-clip/                        CLIPModel + CLIPProcessor (save_pretrained)
  tests/fixtures/reference/demo-clip.json  ground truth, transformers' results, figures
It reads (never rewrites) the images make_demo_models.py wrote,
tests/fixtures/demo/eval/eval_00..35.png and examples/shapes_1..8.png, checks
each against a fresh render of its scene (make_demo_models' seeds), and also
records the two photos in examples/photos.

The world (random_scene, render, caption, the training Pool, fresh_sets, the
train() loop) is imported from make_demo_models.py, not copied; importing it
runs nothing.

Tokenizer: built the way transformers' CLIPTokenizer(vocab=..., merges=...)
is: byte-level BPE with "</w>" word ends, CLIP's normalizer and
pre-tokenizer. The merges are learnt by tokenizers' BpeTrainer on the
grammar's texts (merging stops when every word is one token); the vocabulary
is laid out like openai's: the 256 byte symbols, the same with "</w>" (so any
text encodes without unk), one token per merge, then <|startoftext|> and
<|endoftext|> as the two highest ids. pad = unk = eos = <|endoftext|>, as
openai's. The text config carries eos_token_id = 2 (and bos 0, pad 1) like
openai's checkpoints, so CLIPTextModel uses the legacy pooling at
argmax(input_ids), which is the first <|endoftext|>.

Training: CLIPModel from scratch, AdamW (linear warmup, cosine to 0), one
torch thread, make_demo_models.train(). Each batch is 32 pool scenes plus an
edited copy of each (one shape's kind or colour changed, or two shapes'
colours swapped: hard negatives), 64 images, with three texts per image, all
true of it: its caption, one of its shapes ("a red circle", "This is a photo
of red circle.", ...), and one more (kind, colour, background, shape on a
background, sized shape, caption). Many texts are true of several images in a
batch ("a red circle", "a black background"), so the loss is CLIP's
symmetric cross-entropy on CLIPModel's logits_per_text with every true pair
a positive (MultiPositiveCLIP); with one text per image and an identity truth
matrix it is transformers' return_loss=True loss exactly (checked at start).
Drawing batches whose truth matrix is the identity, so as to use
return_loss=True as it is, was tried first: it leaves room for only about 6
short texts in 64 pairs and biases the caption images towards one-shape
scenes, so it was dropped.

Then the folder is reloaded with from_pretrained and everything recorded is
computed from the reloaded model: transformers' zero-shot-image-classification
pipeline (default template "This is a photo of {}."), search rankings (cosine
of the L2-normalised get_text_features and get_image_features), and the
figures (also on 400 fresh holdout scenes). The smallest gap between
consecutive scores is recorded for every result; pairs closer than
CLOSE_LOGIT_GAP / CLOSE_COSINE_GAP are listed under close_calls.

Options (for trying changes quickly): --quick (60 steps, small pool, written to
a temporary folder), --out DIR (write there instead of the repository),
--steps N, --batch N, --lr X, --pool N, --holdout N, --threads N.
"""

import copy
import json
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import PIL
import tokenizers
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    pipeline,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_models as world  # noqa: E402  (only definitions run on import)
from make_clip_fixtures import bytes_to_unicode_order as bytes_to_unicode  # noqa: E402
from make_demo_models import (  # noqa: E402
    BACKGROUNDS,
    CANVAS,
    HOLDOUT_SEED,
    KINDS,
    SHAPE_COLORS,
    SIZES,
    TORCH_SEED,
    TRAIN_SEED,
    Pool,
    caption,
    fresh_sets,
    random_scene,
    render,
    train,
)

ROOT = world.ROOT
NAME = "demo-clip"
COLORS = list(SHAPE_COLORS)
BGS = list(BACKGROUNDS)
TOKENIZER_SEED = 101  # the BPE corpus' scenes (make_demo_models uses 100 for its own)
THREADS = 1

# ---------------------------------------------------------------- texts and their meaning
#
# A meaning is a tuple; truth(meaning, scene) says whether a text with that
# meaning is true of a scene:
#   ("caption", text)                  the scene's full caption is text
#   ("shape", color, kind, size)       a shape with these (None: any)
#   ("bg", background)
#   ("shape_bg", color, kind, background)

PIPELINE_TEMPLATE = "This is a photo of {}."  # the zero-shot pipeline's default
PHRASE_TEMPLATES = ("{}", "a {}", "a photo of a {}", "This is a photo of {}.", "This is a photo of a {}.")
CAPTION_TEMPLATES = ("{}", "{}", "a photo of {}", "This is a photo of {}.")


def truth(meaning, scene) -> bool:
    t = meaning[0]
    if t == "caption":
        return caption(scene) == meaning[1]
    if t == "bg":
        return scene["background"] == meaning[1]
    if t == "shape":
        _, color, kind, size = meaning
        return any((color is None or s["color"] == color) and (kind is None or s["kind"] == kind)
                   and (size is None or s["size"] == size) for s in scene["shapes"])
    if t == "shape_bg":
        _, color, kind, bg = meaning
        return scene["background"] == bg and any(s["color"] == color and s["kind"] == kind for s in scene["shapes"])
    raise ValueError(meaning)


def phrase(meaning) -> str:
    t = meaning[0]
    if t == "bg":
        return f"{meaning[1]} background"
    if t == "shape":
        _, color, kind, size = meaning
        return " ".join(w for w in (size, color, kind or "shape") if w)
    if t == "shape_bg":
        return f"{meaning[1]} {meaning[2]} on a {meaning[3]} background"
    raise ValueError(meaning)


def text_of(meaning, rng) -> str:
    if meaning[0] == "caption":
        return rng.choice(CAPTION_TEMPLATES).format(meaning[1])
    return rng.choice(PHRASE_TEMPLATES).format(phrase(meaning))


# The texts of each training image (see PairBatches): its caption, one of its
# shapes ("a red circle"), and one drawn from MEANING_MIX.
TEXTS_PER_IMAGE = ("caption", "color_kind", None)
# Meaning types of the third text.
MEANING_MIX = (
    ("caption", 0.10),
    ("color_kind", 0.25),
    ("size_color_kind", 0.10),
    ("kind", 0.20),
    ("color", 0.10),
    ("bg", 0.10),
    ("shape_bg", 0.15),
)


def sample_meaning(scene, rng, kind=None):
    """A meaning true of scene, of the given type (or one drawn from MEANING_MIX)."""
    if kind is None:
        r = rng.random()
        for kind, p in MEANING_MIX:
            r -= p
            if r < 0:
                break
    s = rng.choice(scene["shapes"])
    if kind == "caption":
        return ("caption", caption(scene))
    if kind == "color_kind":
        return ("shape", s["color"], s["kind"], None)
    if kind == "size_color_kind":
        return ("shape", s["color"], s["kind"], s["size"])
    if kind == "kind":
        return ("shape", None, s["kind"], None)
    if kind == "color":
        return ("shape", s["color"], None, None)
    if kind == "bg":
        return ("bg", scene["background"])
    if kind == "shape_bg":
        return ("shape_bg", s["color"], s["kind"], scene["background"])
    raise ValueError(kind)


def tokenizer_corpus() -> list:
    """Every kind of text the model is trained or evaluated on, from fresh scenes."""
    rng = random.Random(TOKENIZER_SEED)
    lines = []
    for _ in range(3000):
        scene = random_scene(rng)
        for kind, _ in MEANING_MIX:
            lines.append(text_of(sample_meaning(scene, rng, kind), rng))
    for c in COLORS:
        for k in KINDS:
            for t in PHRASE_TEMPLATES:
                lines.append(t.format(f"{c} {k}"))
    return lines


# ---------------------------------------------------------------- tokenizer


def build_clip_tokenizer() -> CLIPTokenizer:
    template = CLIPTokenizer()  # empty vocabulary: only to borrow its normalizer and pre-tokenizer
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = template.backend_tokenizer.normalizer
    bpe.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # never reached: merging stops when every word is one token
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    symbols = bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab_list)) == len(vocab_list)
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    n = len(vocab_list)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (n - 2, n - 1, n - 1, n - 1)
    assert len(tok) == n
    # Every word of the grammar is one token; any text encodes without unk.
    for line in tokenizer_corpus()[:500]:
        for w in line.lower().replace(".", " ").replace(",", " ").split():
            assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok("Zebra 42 café, 🙂!").input_ids
    assert ids[0] == n - 2 and ids[-1] == n - 1 and n - 1 not in ids[1:-1], ids
    return tok


# ---------------------------------------------------------------- model

IMAGE_SIZE = 64
STEPS = 3600
BATCH = 64  # images (32 scenes + their edited copies), 3 texts each
LR = 1e-3
POOL = 16000
HOLDOUT = 400
CONFIG = dict(
    text=dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        initializer_range=0.02,
    ),
    vision=dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        initializer_range=0.02,
    ),
    projection_dim=64,
)


def clip_config(tokenizer) -> CLIPConfig:
    # Special ids in the text config as openai's checkpoints carry them:
    # eos_token_id 2 selects the legacy pooling at argmax(input_ids), which is
    # the first <|endoftext|> since that is the highest id (bos/pad 0/1 are
    # unused by the model, as in openai's configs).
    proj = CONFIG["projection_dim"]  # also in the sub-configs, as in openai's (where they agree)
    text = dict(CONFIG["text"], vocab_size=len(tokenizer), bos_token_id=0, pad_token_id=1, eos_token_id=2,
                projection_dim=proj)
    return CLIPConfig(text_config=text, vision_config=dict(CONFIG["vision"], projection_dim=proj),
                      projection_dim=proj)


def build_processor() -> CLIPProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    assert image_processor.resample == 3  # bicubic
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer())


# ---------------------------------------------------------------- batches


def facts(scene) -> frozenset:
    """Every meaning sample_meaning can give that is true of scene:
    truth(m, scene) == (m in facts(scene)) for those meanings."""
    out = {("caption", caption(scene)), ("bg", scene["background"])}
    for s in scene["shapes"]:
        c, k, z = s["color"], s["kind"], s["size"]
        out |= {("shape", c, k, None), ("shape", c, k, z), ("shape", None, k, None), ("shape", c, None, None),
                ("shape_bg", c, k, scene["background"])}
    return frozenset(out)


def edit(scene, rng):
    """The scene with one thing changed: a shape's kind or colour, or two
    shapes' colours swapped (a hard negative for the original)."""
    new = copy.deepcopy(scene)
    shapes = new["shapes"]
    swappable = [(a, b) for a in shapes for b in shapes if a["color"] != b["color"] and a["kind"] != b["kind"]]
    r = rng.random()
    if swappable and r < 0.34:
        a, b = rng.choice(swappable)
        a["color"], b["color"] = b["color"], a["color"]
    else:
        s = rng.choice(shapes)
        if r < 0.67:
            s["kind"] = rng.choice([k for k in KINDS if k != s["kind"]])
        else:
            s["color"] = rng.choice([c for c in COLORS if c != s["color"]])
    return new


class PairPool:
    """The training pool plus one edited copy of each scene, rendered and
    preprocessed the same way."""

    def __init__(self, n, image_processor, seed=TRAIN_SEED + 1000):
        base = Pool(n, image_processor)
        rng = random.Random(seed)
        variants = [edit(s, rng) for s in base.scenes]
        scales = [rng.choice([1, 1, 2]) for _ in variants]
        chunks = []
        for i in range(0, n, 500):
            images = [render(s, k) for s, k in zip(variants[i : i + 500], scales[i : i + 500])]
            chunks.append(image_processor(images=images, return_tensors="pt")["pixel_values"])
        self.n = n
        self.scenes = base.scenes + variants
        self.captions = [caption(s) for s in self.scenes]
        self.pixels = torch.cat([base.pixels] + chunks)


class PairBatches:
    """b/2 random pool scenes and their edited copies (b images), and for
    each image one text per entry of TEXTS_PER_IMAGE, each true of it
    ("caption": its caption; "color_kind": a shape of it, e.g. "a red
    circle"; None: a meaning drawn from MEANING_MIX). Returns the model's
    inputs and truth[t, i] = text t is true of image i."""

    def __init__(self, pool, tokenizer):
        self.pool = pool
        self.tokenizer = tokenizer
        self.facts = [facts(s) for s in pool.scenes]
        self.cache = {}
        self.mix = {}

    def ids(self, text):
        if text not in self.cache:
            self.cache[text] = self.tokenizer(text).input_ids
        return self.cache[text]

    def __call__(self, rng, b):
        base = rng.sample(range(self.pool.n), b // 2)
        idx = [j for i in base for j in (i, i + self.pool.n)]
        ms = [sample_meaning(self.pool.scenes[i], rng, kind) for i in idx for kind in TEXTS_PER_IMAGE]
        for m in ms:
            key = m[0] if m[0] != "shape" else "shape " + " ".join(k for k, v in zip(("color", "kind", "size"), m[1:]) if v)
            self.mix[key] = self.mix.get(key, 0) + 1
        seqs = [self.ids(text_of(m, rng)) for m in ms]
        n = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), n), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for k, s in enumerate(seqs):
            input_ids[k, : len(s)] = torch.tensor(s)
            mask[k, : len(s)] = 1
        truth = torch.tensor([[m in self.facts[i] for i in idx] for m in ms], dtype=torch.float32)
        return dict(pixel_values=self.pool.pixels[idx], input_ids=input_ids, attention_mask=mask, truth=truth)


class MultiPositiveCLIP(torch.nn.Module):
    """CLIP's symmetric cross-entropy with every true pair as a positive (the
    target spread evenly over them); equal to transformers' loss when truth is
    the identity."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, truth, **inputs):
        lt = self.clip(**inputs).logits_per_text
        loss_t = -((truth / truth.sum(1, keepdim=True)) * lt.log_softmax(1)).sum(1).mean()
        ti = truth.T
        loss_i = -((ti / ti.sum(1, keepdim=True)) * lt.T.log_softmax(1)).sum(1).mean()
        return transformers.utils.ModelOutput(loss=(loss_t + loss_i) / 2)


# ---------------------------------------------------------------- evaluation

LABEL_SETS = {
    # name: (labels, what counts as right for an image)
    "readme": ["red circle", "blue square", "green triangle"],
    "color_kind_12": [f"{c} {k}" for c in COLORS for k in KINDS],
    "kind": list(KINDS),
    "background": [f"{b} background" for b in BGS],
}
SEARCH_QUERIES = ["a blue triangle", "a red circle", "a yellow square", "a green circle", "a black background"]


def label_meaning(label):
    words = label.split()
    if words[-1] == "background":
        return ("bg", words[0])
    if len(words) == 1:
        return ("shape", None, words[0], None)
    return ("shape", words[0], words[1], None)


def query_meaning(query):
    return label_meaning(query[2:] if query.startswith("a ") else query)


def label_right(label_set, label, scene):
    """None when the question is not posed for this image (no label true of it)."""
    labels = LABEL_SETS[label_set] if isinstance(label_set, str) else label_set
    if not any(truth(label_meaning(lab), scene) for lab in labels):
        return None
    return truth(label_meaning(label), scene)


def min_gap(scores):
    return min((scores[i] - scores[i + 1] for i in range(len(scores) - 1)), default=None)


@torch.no_grad()
def image_embeds(model, processor, images, batch=64):
    out = []
    for i in range(0, len(images), batch):
        px = processor.image_processor(images=images[i : i + batch], return_tensors="pt")["pixel_values"]
        out.append(model.get_image_features(pixel_values=px).pooler_output)
    e = torch.cat(out)
    return e / e.norm(dim=-1, keepdim=True)


@torch.no_grad()
def text_embeds(model, processor, texts):
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
    e = model.get_text_features(**enc).pooler_output
    return e / e.norm(dim=-1, keepdim=True)


def zero_shot_logits(model, processor, img_emb, labels):
    """logits_per_image for "This is a photo of {label}." (as CLIPModel.forward)."""
    t = text_embeds(model, processor, [PIPELINE_TEMPLATE.format(x) for x in labels])
    return model.logit_scale.exp().detach() * img_emb @ t.T


def zero_shot_probs(model, processor, img_emb, labels):
    return zero_shot_logits(model, processor, img_emb, labels).softmax(dim=-1)


def search_figures(scores, relevant):
    """precision@k (k = number of relevant images) and whether top-1 is relevant."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    k = sum(relevant)
    if k == 0:
        return None
    return dict(relevant=k, precision_at_k=sum(relevant[i] for i in order[:k]) / k, top1_relevant=relevant[order[0]])


def holdout_scenes(n):
    rng = random.Random(HOLDOUT_SEED)
    scenes = [random_scene(rng) for _ in range(n)]
    return scenes, [render(s, 1 + i % 2) for i, s in enumerate(scenes)]


RANDOM3_SEED = 7


def accuracy(model, processor, scenes, images):
    """Zero-shot accuracy per label set and search precision, on in-memory images."""
    img = image_embeds(model, processor, images)
    out = {}
    for name, labels in LABEL_SETS.items():
        probs = zero_shot_probs(model, processor, img, labels)
        rights = [label_right(name, labels[int(p.argmax())], s) for p, s in zip(probs, scenes)]
        posed = [r for r in rights if r is not None]
        out[f"zero_shot_{name}"] = dict(images=len(posed), accuracy=round(sum(posed) / len(posed), 4))
    # Three random colour+kind labels, at least one of them in the image.
    rng = random.Random(RANDOM3_SEED)
    combos = LABEL_SETS["color_kind_12"]
    hits = 0
    for k, s in enumerate(scenes):
        present = [c for c in combos if truth(label_meaning(c), s)]
        pick = rng.choice(present)
        labels = [pick] + rng.sample([c for c in combos if c != pick], 2)
        rng.shuffle(labels)
        probs = zero_shot_probs(model, processor, img[k : k + 1], labels)[0]
        hits += truth(label_meaning(labels[int(probs.argmax())]), s)
    out["zero_shot_random3"] = dict(images=len(scenes), accuracy=round(hits / len(scenes), 4))
    # Search: every colour+kind query and the backgrounds.
    queries = [f"a {c}" for c in combos] + [f"a {b} background" for b in BGS]
    t = text_embeds(model, processor, queries)
    cos = (t @ img.T).tolist()
    per = {}
    for q, row in zip(queries, cos):
        per[q] = search_figures(row, [truth(query_meaning(q), s) for s in scenes])
    shape_q = [per[f"a {c}"] for c in combos if per[f"a {c}"]]
    bg_q = [per[f"a {b} background"] for b in BGS if per[f"a {b} background"]]
    for name, qs in (("search_color_kind", shape_q), ("search_background", bg_q)):
        out[name] = dict(queries=len(qs), mean_precision_at_k=round(sum(q["precision_at_k"] for q in qs) / len(qs), 4),
                         top1_relevant=round(sum(q["top1_relevant"] for q in qs) / len(qs), 4),
                         all_relevant_first=round(sum(q["precision_at_k"] == 1 for q in qs) / len(qs), 4))
    return out


# ---------------------------------------------------------------- recording


# Results whose order hangs on a small difference are listed under close_calls.
CLOSE_LOGIT_GAP = 1e-3  # zero-shot: consecutive logits_per_image (logit scale * cosine)
CLOSE_COSINE_GAP = 1e-4  # search: consecutive cosines
TOKENIZER_CHECKS = [
    "This is a photo of red circle.",
    "a blue triangle",
    "a small red circle, a large blue square and a small green triangle on a white background",
    "A Photo of a RED Circle!!",
    "  two   spaces\tand a tab ",
    "it's the cat's toy, isn't it?",
    "zebra café 42 ½",
    "🙂 naïve façade",
    "<|startoftext|>already<|endoftext|>",
    "",
]


def close_pairs(names, values, below):
    """Consecutive entries (best first) whose values differ by less than below:
    [{rank (0-based, of the first), first, second, gap}]."""
    return [dict(rank=i, first=names[i], second=names[i + 1], gap=values[i] - values[i + 1])
            for i in range(len(values) - 1) if values[i] - values[i + 1] < below]


def committed_images():
    """The eval images and README examples of make_demo_models.py (its seeds and
    scenes), checked pixel for pixel against the committed PNGs, plus the two
    photos in examples/photos (no scene)."""
    out = []
    for it in fresh_sets(36):
        path = ROOT / it["path"].relative_to(world.OUT)
        image = Image.open(path)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(render(it["scene"], it["scale"]))), path
        out.append(dict(set=it["set"], path=path, scene=it["scene"]))
    for path in sorted((ROOT / "examples" / "photos").glob("*.jpg")):
        out.append(dict(set="photos", path=path, scene=None))
    return out


def ranking(paths, scores):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [dict(path=paths[i], score=scores[i]) for i in order]


def record(folder, processor_mem, model_mem, opts):
    """Everything recorded, from the folder reloaded with from_pretrained."""
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil", type(processor.image_processor)
    assert type(processor.tokenizer).__name__ == "CLIPTokenizer", type(processor.tokenizer)
    tok = processor.tokenizer
    clf = pipeline("zero-shot-image-classification", model=str(folder), device="cpu")
    assert type(clf.image_processor).__name__ == "CLIPImageProcessorPil", type(clf.image_processor)

    items = committed_images()
    images = [Image.open(it["path"]) for it in items]
    rel = [str(it["path"].relative_to(ROOT)) for it in items]

    # The reloaded model and processor equal the in-memory ones.
    texts = [PIPELINE_TEMPLATE.format(x) for x in LABEL_SETS["color_kind_12"]] + SEARCH_QUERIES
    reload_diff = dict(
        image_embeds=float((image_embeds(model, processor, images) - image_embeds(model_mem, processor_mem, images))
                           .abs().max()),
        text_embeds=float((text_embeds(model, processor, texts) - text_embeds(model_mem, processor_mem, texts))
                          .abs().max()),
    )
    for t in TOKENIZER_CHECKS + texts:
        assert tok(t).input_ids == processor_mem.tokenizer(t).input_ids, t
    assert reload_diff["image_embeds"] < 1e-5 and reload_diff["text_embeds"] < 1e-5, reload_diff

    # Zero-shot: the pipeline, checked against the embeddings computed here.
    img = image_embeds(model, processor, images)
    entries = []
    worst_pipeline_diff = 0.0
    close = []
    for k, (it, path) in enumerate(zip(items, rel)):
        e = dict(set=it["set"], image=path, size=list(images[k].size), scene=it["scene"])
        if it["scene"] is not None:
            e["caption"] = caption(it["scene"])
            e["present"] = sorted({f"{s['color']} {s['kind']}" for s in it["scene"]["shapes"]})
        e["zero_shot"] = {}
        for name, labels in LABEL_SETS.items():
            res = clf(str(it["path"]), candidate_labels=labels)
            res = [dict(label=r["label"], score=r["score"]) for r in res]
            logits = zero_shot_logits(model, processor, img[k : k + 1], labels)[0]
            mine = logits.softmax(-1).tolist()
            for r in res:
                worst_pipeline_diff = max(worst_pipeline_diff, abs(r["score"] - mine[labels.index(r["label"])]))
            ordered = [logits[labels.index(r["label"])].item() for r in res]
            z = dict(results=res, logits=ordered, min_gap=min_gap([r["score"] for r in res]),
                     min_logit_gap=min_gap(ordered))
            if it["scene"] is not None:
                z["correct"] = label_right(name, res[0]["label"], it["scene"])
            e["zero_shot"][name] = z
            pairs = close_pairs([r["label"] for r in res], ordered, CLOSE_LOGIT_GAP)
            if pairs:
                close.append(dict(kind="zero_shot", image=path, label_set=name, pairs=pairs))
        entries.append(e)
    assert worst_pipeline_diff < 1e-5, worst_pipeline_diff

    # Search over the README examples (with and without examples/photos) and the eval set.
    sets = {
        "examples": [k for k, it in enumerate(items) if it["set"] == "examples"],
        "examples_and_photos": [k for k, it in enumerate(items) if it["set"] in ("examples", "photos")],
        "eval": [k for k, it in enumerate(items) if it["set"] == "eval"],
    }
    q_emb = text_embeds(model, processor, SEARCH_QUERIES)
    search = {}
    for set_name, ks in sets.items():
        search[set_name] = {}
        for q, t in zip(SEARCH_QUERIES, q_emb):
            # One query at a time as a user runs it (same as the batch to float noise).
            t1 = text_embeds(model, processor, [q])[0]
            assert float((t1 - t).abs().max()) < 1e-5
            scores = (img[ks] @ t1).tolist()
            paths = [rel[k] for k in ks]
            relevant = [it["scene"] is not None and truth(query_meaning(q), it["scene"]) for it in (items[k] for k in ks)]
            r = ranking(paths, scores)
            gap = min_gap([x["score"] for x in r])
            fig = search_figures(scores, relevant)
            search[set_name][q] = dict(ranking=r, relevant=[p for p, y in zip(paths, relevant) if y], min_gap=gap,
                                       precision_at_k=fig and fig["precision_at_k"],
                                       top1_relevant=fig and fig["top1_relevant"])
            pairs = close_pairs([x["path"] for x in r], [x["score"] for x in r], CLOSE_COSINE_GAP)
            if pairs:
                close.append(dict(kind="search", set=set_name, query=q, pairs=pairs))

    # Figures: the committed images, then fresh holdout scenes.
    metrics = {}
    for set_name in ("eval", "examples"):
        ks = sets[set_name]
        metrics[set_name] = accuracy(model, processor, [items[k]["scene"] for k in ks], [images[k] for k in ks])
        for name in LABEL_SETS:  # the pipeline's answers give the same figures
            posed = [entries[k]["zero_shot"][name]["correct"] for k in ks]
            posed = [c for c in posed if c is not None]
            assert round(sum(posed) / len(posed), 4) == metrics[set_name][f"zero_shot_{name}"]["accuracy"], name
    hs, hi = holdout_scenes(opts["holdout"])
    metrics["holdout"] = accuracy(model, processor, hs, hi)

    checks = []
    for t in TOKENIZER_CHECKS:
        ids = tok(t).input_ids
        checks.append(dict(text=t, input_ids=ids, tokens=tok.convert_ids_to_tokens(ids)))
        # eos_token_id 2 pools at argmax(ids): the first <|endoftext|>.
        assert ids.index(max(ids)) == ids.index(tok.eos_token_id), t
    return dict(model=model, processor=processor, entries=entries, search=search, metrics=metrics, close=close,
                checks=checks, reload_diff=reload_diff, pipeline_diff=worst_pipeline_diff)


# ---------------------------------------------------------------- main


def run_setup(name, defaults, quick_defaults):
    """Where a demo trainer writes and its options: the repository, or with
    --quick or --out a temporary (or the given) folder, never the committed
    outputs; each option --NAME VALUE over its default (quick_defaults' with
    --quick). Returns (out_root, model folder, reference json, options)."""
    quick = "--quick" in sys.argv
    out_root = ROOT
    if quick or "--out" in sys.argv:
        prefix = f"make_{name.replace('-', '_')}_"
        out_root = Path(arg("--out", tempfile.mkdtemp(prefix=prefix))).resolve()
        print(f"writing under {out_root}", flush=True)
    folder = out_root / "models" / name
    reference = out_root / "tests" / "fixtures" / "reference" / f"{name}.json"
    opts = {k: arg(f"--{k}", quick_defaults.get(k, v) if quick else v) for k, v in defaults.items()}
    return out_root, folder, reference, opts


def arg(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def check_loss(model, batches):
    """MultiPositiveCLIP's loss is transformers' (return_loss=True) when the
    truth matrix is the identity, on one training batch."""
    batch = batches(random.Random(0), 8)
    one = dict(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"][::len(TEXTS_PER_IMAGE)],
               attention_mask=batch["attention_mask"][::len(TEXTS_PER_IMAGE)])
    with torch.no_grad():
        theirs = model(**one, return_loss=True).loss
        ours = MultiPositiveCLIP(model)(truth=torch.eye(8), **one).loss
    assert abs(float(theirs - ours)) < 1e-6, (float(theirs), float(ours))
    return float(theirs)


def main():
    wall_start = time.time()
    out_root, folder, reference, opts = run_setup(
        NAME,
        dict(threads=THREADS, steps=STEPS, batch=BATCH, lr=LR, pool=POOL, holdout=HOLDOUT),
        dict(steps=60, pool=1000, holdout=50),
    )
    torch.set_num_threads(opts["threads"])
    warnings.filterwarnings("ignore", message=".*model-agnostic default.*")

    processor = build_processor()
    tok = processor.tokenizer
    start = time.time()
    pool = PairPool(opts["pool"], processor.image_processor)
    pool_s = time.time() - start
    print(f"{NAME}: pool of {opts['pool']} training scenes + {opts['pool']} edited copies in {pool_s:.0f}s", flush=True)
    for scene in pool.scenes[:500]:  # facts() agrees with truth()
        assert all(truth(m, scene) for m in facts(scene))
    torch.manual_seed(TORCH_SEED)
    model = CLIPModel(clip_config(tok))
    batches = PairBatches(pool, tok)
    check_loss(model, batches)
    rec = train(NAME, MultiPositiveCLIP(model), batches, steps=opts["steps"], lr=opts["lr"], batch_size=opts["batch"],
                log_every=100)
    rec.update(
        images_per_batch=opts["batch"],
        texts_per_batch=opts["batch"] * len(TEXTS_PER_IMAGE),
        batch="batch_size/2 random pool scenes + their edited copies (one shape's kind or colour changed, or two "
              "shapes' colours swapped); per image its caption, one of its shapes (a phrase template) and one text "
              "drawn from meaning_mix, all true of it",
        loss="CLIP's symmetric cross-entropy on CLIPModel's logits_per_text with every true (text, image) pair a "
             "positive (target spread evenly over them); equal to transformers' return_loss=True loss when the "
             "truth matrix is the identity (checked at start)",
        pool=dict(scenes=opts["pool"], edited_copies=opts["pool"], seed=TRAIN_SEED, edit_seed=TRAIN_SEED + 1000,
                  scales="96 or 192 px (1/3 at 192), as make_demo_models.Pool", render_and_preprocess_s=round(pool_s, 1)),
        text_mix={k: round(v / sum(batches.mix.values()), 4) for k, v in sorted(batches.mix.items())},
        meaning_mix=dict(MEANING_MIX),
        texts_per_image=[k or "meaning_mix" for k in TEXTS_PER_IMAGE],
        phrase_templates=list(PHRASE_TEMPLATES),
        caption_templates=list(CAPTION_TEMPLATES),
        logit_scale_exp=round(model.logit_scale.exp().item(), 4),
        init="from scratch (transformers' initialisation, torch seed 0)",
    )
    train_s = time.time() - wall_start
    print(f"{NAME}: logit scale {model.logit_scale.exp().item():.2f}; text mix {rec['text_mix']}", flush=True)
    del pool, batches

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for f in folder.iterdir():
        f.chmod(0o644)  # safetensors writes 0600
    r = record(folder, processor, model, opts)
    loaded, tok2 = r["model"], r["processor"].tokenizer
    cfg = loaded.config
    meta = dict(
        description="Tiny CLIP trained by tools/make_demo_clip.py on the synthetic shapes world of "
        "tools/make_demo_models.py; transformers' zero-shot pipeline results and search rankings on the committed "
        "images (seeds not used in training), from the folder reloaded with from_pretrained.",
        transformers=transformers.__version__,
        torch=torch.__version__,
        tokenizers=tokenizers.__version__,
        pillow=PIL.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        threads=opts["threads"],
        seeds=dict(train=TRAIN_SEED, edits=TRAIN_SEED + 1000, torch=TORCH_SEED, batches=f"{NAME}-batches",
                   tokenizer_corpus=TOKENIZER_SEED, eval=world.EVAL_SEED, examples=world.EXAMPLES_SEED,
                   holdout=HOLDOUT_SEED, random3_labels=RANDOM3_SEED),
        world=dict(canvas=CANVAS, shape_colors=SHAPE_COLORS, backgrounds=BACKGROUNDS, kinds=KINDS, radius=SIZES,
                   scenes="make_demo_models.random_scene / render / caption; as in reference/demo.json"),
        model=dict(
            path=f"models/{NAME}",
            class_name=type(loaded).__name__,
            params=sum(p.numel() for p in loaded.parameters()),
            params_text=sum(p.numel() for p in loaded.text_model.parameters()),
            params_vision=sum(p.numel() for p in loaded.vision_model.parameters()),
            folder_bytes=folder_bytes(folder),
            files={f.name: f.stat().st_size for f in sorted(folder.iterdir())},
            dtype="float32",
            text_config={k: getattr(cfg.text_config, k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                "pad_token_id")},
            vision_config={k: getattr(cfg.vision_config, k) for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "num_channels", "hidden_act", "layer_norm_eps")},
            projection_dim=cfg.projection_dim,
            logit_scale=loaded.logit_scale.item(),
            logit_scale_exp=loaded.logit_scale.exp().item(),
            text_pooling="text_config.eos_token_id == 2 (as openai's checkpoints): the legacy pooling at "
            "argmax(input_ids), i.e. the first <|endoftext|>, the highest id",
            tokenizer=dict(
                class_name=type(tok2).__name__,
                vocab_size=len(tok2),
                merges=len(tok2) - 2 * 256 - 2,
                layout="ids 0-255 the byte symbols (openai's order), 256-511 the same + '</w>', then one token per "
                "merge in merge order, then <|startoftext|>, <|endoftext|>",
                bos_token="<|startoftext|>", bos_token_id=tok2.bos_token_id,
                eos_token="<|endoftext|>", eos_token_id=tok2.eos_token_id,
                pad_token="<|endoftext|>", pad_token_id=tok2.pad_token_id,
                unk_token="<|endoftext|>", unk_token_id=tok2.unk_token_id,
                model_max_length=tok2.model_max_length,
            ),
            image_processor=json.loads((folder / "processor_config.json").read_text())["image_processor"],
        ),
        train=rec,
        zero_shot=dict(
            call="pipeline('zero-shot-image-classification', model='models/demo-clip')(path, candidate_labels=labels)",
            hypothesis_template=PIPELINE_TEMPLATE,
            label_sets=LABEL_SETS,
            results="[{label, score}] best first, as the pipeline returns them (softmax over the labels of "
            "logit_scale.exp() * cosine)",
            logits="logits_per_image for the same labels in the same order (computed here from the reloaded model)",
            min_gap="smallest difference between consecutive scores",
            min_logit_gap="smallest difference between consecutive logits (what decides the order)",
            correct="the top label is true of the image (colour+kind / kind present, background right); null when "
            "no label of the set is true of it (or no scene: the photos)",
        ),
        search=dict(
            score="cosine of the L2-normalised get_text_features(query) and get_image_features(image); "
            "the query tokenized alone (no template), each image preprocessed by the processor",
            queries=SEARCH_QUERIES,
            sets={k: v for k, v in r["search"].items()},
        ),
        metrics=r["metrics"],
        metric_definitions=dict(
            zero_shot_NAME="label set NAME: share of images whose top label is right, over the images where "
            "at least one label is right (images)",
            zero_shot_random3="per image three random colour+kind labels, at least one present "
            f"(random.Random({RANDOM3_SEED}))",
            search_color_kind="each 'a {colour} {kind}' query with at least one relevant image: precision@k (k = "
            "relevant images), top-1 relevant, and all relevant ranked first (precision@k = 1); averaged over queries",
            search_background="the same for 'a {background} background'",
            holdout=f"{opts['holdout']} fresh scenes (random.Random({HOLDOUT_SEED}), random_scene only), every "
            "second one at 192 px, rendered in memory",
        ),
        min_gap=dict(
            zero_shot_score=min(z["min_gap"] for e in r["entries"] for z in e["zero_shot"].values()),
            zero_shot_logit=min(z["min_logit_gap"] for e in r["entries"] for z in e["zero_shot"].values()),
            search_cosine=min(q["min_gap"] for qs in r["search"].values() for q in qs.values()),
        ),
        close_calls=dict(zero_shot_logit_gap_below=CLOSE_LOGIT_GAP, search_cosine_gap_below=CLOSE_COSINE_GAP,
                         cases=r["close"]),
        reload_check=dict(
            recorded="outputs of the folder reloaded with from_pretrained (CLIPModel, CLIPProcessor, the pipeline)",
            max_abs_diff_vs_in_memory=r["reload_diff"],
            max_abs_diff_pipeline_vs_embeddings=r["pipeline_diff"],
        ),
        tokenizer_checks=r["checks"],
        wall_s=dict(train=round(rec["wall_s"], 1), until_trained=round(train_s, 1),
                    total=round(time.time() - wall_start, 1)),
        images=r["entries"],
    )
    reference.parent.mkdir(parents=True, exist_ok=True)
    reference.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(dict(metrics=r["metrics"], min_gap=meta["min_gap"], close_calls=len(r["close"]),
                          params=meta["model"]["params"], folder_bytes=meta["model"]["folder_bytes"],
                          wall_s=meta["wall_s"]), indent=1))


if __name__ == "__main__":
    main()
