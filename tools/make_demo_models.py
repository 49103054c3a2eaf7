"""Train the three tiny demo models on a synthetic "shapes" world and record what
transformers generates with them.

Run from the repository root with the pinned versions in tools/requirements.txt:

    python tools/make_demo_models.py

It writes
  models/demo/         BlipForConditionalGeneration   (captions)
  models/demo-vqa/     BlipForQuestionAnswering       (questions)
  models/demo-blip2/   Blip2ForConditionalGeneration  (OPT; captions and "Question: ... Answer:")
each a Hugging Face model folder written by save_pretrained (model + processor),
plus
  tests/fixtures/demo/eval/eval_NN.png   fresh images (a seed not used in training)
  examples/shapes_N.png                  fresh example images for the README
  tests/fixtures/reference/demo.json     ground truth and transformers' outputs
                                         (greedy and num_beams=3) for all of them

The world: 1 to 3 shapes (circle, square, triangle) in distinct colours and two
sizes, each in its own column (left, middle, right), on a plain background. The
caption names the shapes left to right; questions have a unique answer.

Training uses transformers' own model classes and their own loss (labels passed
to forward), AdamW, on CPU, one torch thread per process:
  1. demo from scratch (6000 steps of 48 captions);
  2. then, in two processes at once, both starting from models/demo as BLIP's
     VQA and BLIP-2 start from pre-trained parts:
     demo-vqa (7000 steps of 48 questions): vision tower, question encoder
       (from the caption decoder's BERT) and answer decoder from demo;
     demo-blip2 (6000 steps of 48, 40% captions, 60% questions): vision tower
       from demo, Q-Former, projection and OPT from scratch.
Then every folder is reloaded with from_pretrained and its outputs recorded;
they must equal the in-memory model's (ids and texts). Everything is seeded;
on the same machine and thread count a rerun writes the same weights. About
22 minutes on a 2-core AMD EPYC.

Options (for trying changes quickly): --quick (1% of the steps, small pool,
written to a temporary folder), --out DIR (write there instead of the
repository), --step-scale F, --pool N, --eval N, --holdout N, --threads N.

How the labels work (transformers 5.23):
* BlipForConditionalGeneration: input_ids = [DEC] caption [SEP] (the processor
  gives [CLS] ... [SEP]; generate() replaces position 0 by bos = [DEC], so
  training does too), labels = the same ids with -100 on padding. The text
  decoder shifts internally (logits[:, :-1] against labels[:, 1:]).
* BlipForQuestionAnswering: labels = [DEC] answer [SEP]. forward() uses the
  labels as the decoder's input_ids too (already "shifted right"), so labels must
  not contain -100 on padding; every answer here is one token, so no padding.
* Blip2ForConditionalGeneration: input_ids = [<image>]*Q [</s>] prompt target
  [newline], labels = -100 on everything but target + newline; the model's
  loss (ForCausalLMLoss) shifts internally.
* Blip2ForConditionalGeneration zero-initialises query_tokens, which would keep
  all queries identical forever; they are drawn from N(0, 0.02) as LAVIS does.
"""

import concurrent.futures
import copy
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertTokenizerFast,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
    GPT2Tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent
# Everything is written under OUT: the repository, or (--quick, --out DIR) elsewhere.
# Passed to the worker processes through the environment.
OUT = Path(os.environ.get("MAKE_DEMO_MODELS_OUT", ROOT))
MODELS = OUT / "models"
EVAL_DIR = OUT / "tests" / "fixtures" / "demo" / "eval"
EXAMPLES_DIR = OUT / "examples"
REFERENCE = OUT / "tests" / "fixtures" / "reference" / "demo.json"

# ---------------------------------------------------------------- the world

TRAIN_SEED = 1
EVAL_SEED = 2
EXAMPLES_SEED = 3
HOLDOUT_SEED = 4
BPE_SEED = 100
TORCH_SEED = 0
# One intra-op thread: these models are far below torch's parallel grain size
# for most ops, and on a busy 2-core machine OpenMP's barriers made 2 threads
# 2-40x slower per step (measured; tools/make_blip2_fixtures.py saw the same).
THREADS = 1

CANVAS = 96
SHAPE_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 205, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
KINDS = ["circle", "square", "triangle"]
SIZES = {"small": 8, "large": 14}  # radius on the 96 px canvas
JITTER = 1  # columns are 32 px: 2 * (14 + 1) < 32, so shapes never overlap
COLUMNS = ["left", "middle", "right"]
COLUMN_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
NUMBERS = {1: "one", 2: "two", 3: "three"}


def random_scene(rng: random.Random) -> dict:
    n = rng.randint(1, 3)
    columns = sorted(rng.sample(range(3), n))
    shapes = []
    for c in columns:
        size = rng.choice(list(SIZES))
        r = SIZES[size]
        shapes.append(
            dict(
                kind=rng.choice(KINDS),
                color=rng.choice(list(SHAPE_COLORS)),
                size=size,
                column=COLUMNS[c],
                x=16 + 32 * c + rng.randint(-JITTER, JITTER),
                y=rng.randint(r + 3, CANVAS - r - 4),
            )
        )
    return dict(background=rng.choice(list(BACKGROUNDS)), shapes=shapes)


def render(scene: dict, scale: int = 1) -> Image.Image:
    """The scene drawn without antialiasing at CANVAS * scale pixels."""
    side = CANVAS * scale
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for s in scene["shapes"]:
        x, y, r = s["x"] * scale, s["y"] * scale, SIZES[s["size"]] * scale
        fill = SHAPE_COLORS[s["color"]]
        if s["kind"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif s["kind"] == "square":
            h = round(0.9 * r)  # about the circle's area
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + round(0.8 * r)), (x + r, y + round(0.8 * r))], fill=fill)
    return image


def caption(scene: dict) -> str:
    parts = [f"a {s['size']} {s['color']} {s['kind']}" for s in scene["shapes"]]
    if len(parts) == 3:
        shapes = f"{parts[0]}, {parts[1]} and {parts[2]}"
    else:
        shapes = " and ".join(parts)
    return f"{shapes} on a {scene['background']} background"


def questions(scene: dict) -> list:
    """Every (type, question, answer) with a unique answer for this scene."""
    shapes = scene["shapes"]
    out = [
        ("count", "how many shapes are there?", NUMBERS[len(shapes)]),
        ("background", "what color is the background?", scene["background"]),
    ]
    for kind in KINDS:
        same = [s for s in shapes if s["kind"] == kind]
        if len(same) == 1:
            out.append(("color_of_kind", f"what color is the {kind}?", same[0]["color"]))
    for s in shapes:
        where = COLUMN_PHRASE[s["column"]]
        out.append(("kind_at", f"what shape is {where}?", s["kind"]))
        out.append(("color_at", f"what color is the shape {where}?", s["color"]))
        out.append(("size_at", f"what size is the shape {where}?", s["size"]))
        same = [t for t in shapes if t["kind"] == s["kind"] and t["color"] == s["color"]]
        if len(same) == 1:
            out.append(("where", f"where is the {s['color']} {s['kind']}?", s["column"]))
    present = {(s["color"], s["kind"]) for s in shapes}
    combos = [(c, k) for c in SHAPE_COLORS for k in KINDS]
    return out, present, combos


def all_questions(scene: dict, rng: random.Random) -> list:
    """questions() plus one yes and one no "is there a ...?" question."""
    out, present, combos = questions(scene)
    yes = rng.choice(sorted(present))
    no = rng.choice([c for c in combos if c not in present])
    out.append(("exists", f"is there a {yes[0]} {yes[1]}?", "yes"))
    out.append(("exists", f"is there a {no[0]} {no[1]}?", "no"))
    return out


def pick_questions(scene: dict, rng: random.Random, n: int) -> list:
    """n questions of different types (deterministic given rng)."""
    qs = all_questions(scene, rng)
    by_type = {}
    for t, q, a in qs:
        by_type.setdefault(t, []).append((q, a))
    types = rng.sample(sorted(by_type), min(n, len(by_type)))
    return [dict(type=t, question=q, answer=a) for t in types for q, a in [rng.choice(by_type[t])]]


GRAMMAR_WORDS = sorted(
    set(
        """a and on the in background how many shapes shape are there what color is size where
        left middle right one two three yes no""".split()
        + list(SHAPE_COLORS)
        + list(BACKGROUNDS)
        + KINDS
        + list(SIZES)
    )
)

# ---------------------------------------------------------------- tokenizers


def build_bert_tokenizer() -> BertTokenizerFast:
    """As tools/make_fixtures.py: WordPiece with BLIP's specials, a vocabulary of
    the grammar's words plus single characters (so any word still tokenizes)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = specials + chars + ["##" + c for c in chars] + [w for w in GRAMMAR_WORDS if w not in chars]
    vocab_map = {tok: i for i, tok in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(vocab_map, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab_map["[CLS]"]), ("[SEP]", vocab_map["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
        do_lower_case=True,
    )


PROMPT = "Question: {} Answer:"


def bpe_corpus() -> list:
    rng = random.Random(BPE_SEED)
    lines = []
    for _ in range(3000):
        scene = random_scene(rng)
        lines.append(caption(scene) + "\n")
        for _, q, a in all_questions(scene, rng):
            lines.append(PROMPT.format(q) + " " + a + "\n")
    return lines


def build_bpe_tokenizer(vocab_size: int) -> GPT2Tokenizer:
    """As tools/make_blip2_fixtures.py: byte-level BPE, OPT's special ids
    (<s>=0 <pad>=1 </s>=2 <unk>=3), `</s>` prepended as bos."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bpe_corpus(), trainer)
    tokenizer = GPT2Tokenizer(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    for i, s in enumerate(specials):
        assert tokenizer.convert_tokens_to_ids(s) == i, s
    assert tokenizer("hi").input_ids[0] == 2
    return tokenizer


# ---------------------------------------------------------------- models

IMAGE_SIZE = 64
WIDTH = 64
BPE_VOCAB = 400
NUM_QUERY_TOKENS = 8

VISION = dict(
    hidden_size=WIDTH,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=8,
    layer_norm_eps=1e-5,
    initializer_range=0.02,
)


def blip_config(tokenizer) -> BlipConfig:
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        encoder_hidden_size=WIDTH,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        initializer_range=0.02,
        bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        eos_token_id=tokenizer.convert_tokens_to_ids("[CLS]"),
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )
    return BlipConfig(text_config=text, vision_config=dict(VISION), initializer_range=0.02)


def blip2_config(tokenizer) -> Blip2Config:
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    vision = dict(VISION, qkv_bias=True, hidden_act="gelu")
    qformer = dict(
        hidden_size=WIDTH,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=128,
        cross_attention_frequency=1,
        encoder_hidden_size=WIDTH,
        initializer_range=0.02,
    )
    text = dict(
        model_type="opt",
        hidden_size=WIDTH,
        ffn_dim=160,
        num_hidden_layers=3,  # 2 left "is there a ...?" near chance
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=WIDTH,
        do_layer_norm_before=True,
        activation_function="relu",
        vocab_size=len(tokenizer),
        bos_token_id=2,
        pad_token_id=1,
        # As Salesforce/blip2-opt-2.7b: generation stops at a newline.
        eos_token_id=tokenizer.convert_tokens_to_ids("Ċ"),
        tie_word_embeddings=True,
        init_std=0.02,
        initializer_range=0.02,
    )
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_index,
        initializer_range=0.02,
    )


# ---------------------------------------------------------------- data


class Pool:
    """Training scenes rendered once (at 96 or 192 px) and preprocessed by the
    processor's image processor, shared by the three models."""

    def __init__(self, n: int, image_processor):
        rng = random.Random(TRAIN_SEED)
        self.scenes = [random_scene(rng) for _ in range(n)]
        self.captions = [caption(s) for s in self.scenes]
        self.questions = [all_questions(s, rng) for s in self.scenes]
        scales = [rng.choice([1, 1, 2]) for _ in range(n)]
        chunks = []
        for i in range(0, n, 500):
            images = [render(s, k) for s, k in zip(self.scenes[i : i + 500], scales[i : i + 500])]
            chunks.append(image_processor(images=images, return_tensors="pt")["pixel_values"])
        self.pixels = torch.cat(chunks)

    def sample_qa(self, i: int, rng: random.Random):
        """A question of a uniformly chosen type, then a uniform question of it."""
        qs = self.questions[i]
        t = rng.choice(sorted({q[0] for q in qs}))
        _, q, a = rng.choice([q for q in qs if q[0] == t])
        return q, a


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(name, model, make_batch, steps, lr, batch_size, log_every=250):
    """AdamW on the model's own loss; returns the training record."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in n or "query_tokens" in n else decay).append(p)
    optimizer = torch.optim.AdamW(
        [dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0)], lr=lr, betas=(0.9, 0.98)
    )
    warmup = max(1, steps // 20)
    rng = random.Random(f"{name}-batches")
    model.train()
    start = time.time()
    running = None
    losses = []
    for step in range(steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        batch = make_batch(rng, batch_size)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decay + no_decay, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step == steps - 1:
            losses.append([step + 1, round(running, 5)])
            print(f"  {name} step {step + 1}/{steps} loss {running:.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    return dict(steps=steps, batch_size=batch_size, lr=lr,
                trained_params=sum(p.numel() for p in decay + no_decay), warmup=warmup, schedule="linear warmup, cosine to 0",
                optimizer="AdamW(betas=(0.9, 0.98), weight_decay=0.01 on matrices)", grad_clip=1.0,
                loss_curve=losses, wall_s=round(time.time() - start, 1))


def caption_batch_fn(pool, tokenizer, bos):
    def make(rng, b):
        idx = [rng.randrange(len(pool.scenes)) for _ in range(b)]
        enc = tokenizer([pool.captions[i] for i in idx], padding=True, return_tensors="pt")
        input_ids = enc["input_ids"].clone()
        input_ids[:, 0] = bos
        labels = input_ids.masked_fill(enc["attention_mask"] == 0, -100)
        return dict(pixel_values=pool.pixels[idx], input_ids=input_ids, attention_mask=enc["attention_mask"],
                    labels=labels)

    return make


def vqa_batch_fn(pool, tokenizer, bos, answer_ids):
    sep = tokenizer.sep_token_id

    def make(rng, b):
        idx = [rng.randrange(len(pool.scenes)) for _ in range(b)]
        qa = [pool.sample_qa(i, rng) for i in idx]
        enc = tokenizer([q for q, _ in qa], padding=True, return_tensors="pt")
        labels = torch.tensor([[bos, answer_ids[a], sep] for _, a in qa])
        return dict(pixel_values=pool.pixels[idx], input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    labels=labels)

    return make


def blip2_sequence(tokenizer, image_token, newline, prompt, target):
    """([<image>]*Q + [</s>] + prompt + target + newline, labels on target + newline)."""
    prefix = [image_token] * NUM_QUERY_TOKENS + tokenizer(prompt or "").input_ids
    target_ids = tokenizer(target, add_special_tokens=False).input_ids + [newline]
    return prefix + target_ids, [-100] * len(prefix) + target_ids


def blip2_batch_fn(pool, tokenizer, image_token, newline, caption_share):
    cache = {}

    def seq(prompt, target):
        key = (prompt, target)
        if key not in cache:
            cache[key] = blip2_sequence(tokenizer, image_token, newline, prompt, target)
        return cache[key]

    def make(rng, b):
        idx = [rng.randrange(len(pool.scenes)) for _ in range(b)]
        seqs = []
        for i in idx:
            if rng.random() < caption_share:
                seqs.append(seq(None, pool.captions[i]))
            else:
                q, a = pool.sample_qa(i, rng)
                seqs.append(seq(PROMPT.format(q), " " + a))
        n = max(len(s) for s, _ in seqs)
        ids = torch.full((b, n), tokenizer.pad_token_id)
        labels = torch.full((b, n), -100)
        mask = torch.zeros((b, n), dtype=torch.long)
        for j, (s, lab) in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            labels[j, : len(s)] = torch.tensor(lab)
            mask[j, : len(s)] = 1
        return dict(pixel_values=pool.pixels[idx], input_ids=ids, attention_mask=mask, labels=labels)

    return make


# ---------------------------------------------------------------- generation


def margins_of(scores) -> list:
    out = []
    for step in scores:
        top2 = torch.topk(step[0].float(), 2).values
        out.append(float(top2[0] - top2[1]))
    return out


def strip_after(seq, eos, start):
    """A sequence ends at its first eos at or after start (beam search pads)."""
    for i in range(start, len(seq)):
        if seq[i] == eos:
            return seq[: i + 1]
    return seq


def blip_generate(model, processor, image, question=None):
    """BlipForConditionalGeneration (no question) or BlipForQuestionAnswering."""
    if question is None:
        inputs = processor(images=image, return_tensors="pt")
    else:
        inputs = processor(images=image, text=question, return_tensors="pt")
    sep = model.config.text_config.sep_token_id
    greedy = model.generate(**inputs, output_scores=True, return_dict_in_generate=True)
    beams = model.generate(**inputs, num_beams=3)
    ids = greedy.sequences[0].tolist()
    bids = strip_after(beams[0].tolist(), sep, 1)
    return dict(
        greedy=dict(text=processor.decode(ids, skip_special_tokens=True), ids=ids,
                    stopped_on_eos=ids[-1] == sep, min_margin=round(min(margins_of(greedy.scores)), 4)),
        beams3=dict(text=processor.decode(bids, skip_special_tokens=True), ids=bids),
    )


def blip2_generate(model, processor, image, prompt=None):
    if prompt is None:
        inputs = processor(images=image, return_tensors="pt")
        n_input = NUM_QUERY_TOKENS + 1  # generate() builds [<image>]*Q + [</s>]
    else:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        n_input = inputs["input_ids"].shape[1]
    eos = model.config.text_config.eos_token_id
    greedy = model.generate(**inputs, output_scores=True, return_dict_in_generate=True)
    beams = model.generate(**inputs, num_beams=3)
    ids = strip_after(greedy.sequences[0].tolist(), eos, n_input)[n_input:]
    bids = strip_after(beams[0].tolist(), eos, n_input)[n_input:]
    tok = processor.tokenizer
    return dict(
        greedy=dict(text=tok.decode(ids, skip_special_tokens=True).strip(), new_ids=ids,
                    stopped_on_eos=ids[-1] == eos, min_margin=round(min(margins_of(greedy.scores)), 4)),
        beams3=dict(text=tok.decode(bids, skip_special_tokens=True).strip(), new_ids=bids),
    )


def model_outputs(name, model, processor, image, qs):
    """One model's recorded outputs for one image and its questions."""
    if name == "demo":
        return blip_generate(model, processor, image)
    if name == "demo-vqa":
        return [dict(question=q["question"], **blip_generate(model, processor, image, q["question"])) for q in qs]
    out = dict(caption=blip2_generate(model, processor, image), questions=[])
    for q in qs:
        prompt = PROMPT.format(q["question"])
        out["questions"].append(dict(question=q["question"], prompt=prompt,
                                     **blip2_generate(model, processor, image, prompt)))
    return out


def holdout_figures(name, model, processor, n):
    """Greedy figures on n more fresh images (HOLDOUT_SEED), 3 questions each."""
    rng = random.Random(HOLDOUT_SEED)
    scenes = [random_scene(rng) for _ in range(n)]
    qsets = [pick_questions(s, rng, 3) for s in scenes]
    hits = total = 0
    qhits = qtotal = 0
    for scene, qs in zip(scenes, qsets):
        image = render(scene)
        if name in ("demo", "demo-blip2"):
            if name == "demo":
                ids = model.generate(**processor(images=image, return_tensors="pt"))[0]
                text = processor.decode(ids, skip_special_tokens=True)
            else:
                new = model.generate(**processor(images=image, return_tensors="pt"))[0, NUM_QUERY_TOKENS + 1 :]
                text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
            hits += text == caption(scene)
            total += 1
        if name in ("demo-vqa", "demo-blip2"):
            for q in qs:
                if name == "demo-vqa":
                    ids = model.generate(**processor(images=image, text=q["question"], return_tensors="pt"))[0]
                    text = processor.decode(ids, skip_special_tokens=True)
                else:
                    inputs = processor(images=image, text=PROMPT.format(q["question"]), return_tensors="pt")
                    new = model.generate(**inputs)[0, inputs["input_ids"].shape[1] :]
                    text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
                qhits += text == q["answer"]
                qtotal += 1
    out = dict(images=n)
    if total:
        out["caption_exact_greedy"] = round(hits / total, 4)
    if qtotal:
        out["questions"] = qtotal
        out["vqa_accuracy_greedy"] = round(qhits / qtotal, 4)
    return out


# ---------------------------------------------------------------- the fresh images


def fresh_sets(n_eval: int):
    """The recorded eval images and the README examples (seeds unused in training)."""
    rng = random.Random(EVAL_SEED)
    eval_scenes = [random_scene(rng) for _ in range(n_eval)]
    eval_q = [pick_questions(s, rng, 3) for s in eval_scenes]
    rng = random.Random(EXAMPLES_SEED)
    example_scenes = []
    wanted = [1, 2, 3, 2, 3, 1, 3, 2]  # a mix of 1, 2 and 3 shapes
    while len(example_scenes) < len(wanted):
        s = random_scene(rng)
        if len(s["shapes"]) == wanted[len(example_scenes)]:
            example_scenes.append(s)
    example_q = [pick_questions(s, rng, 3) for s in example_scenes]
    items = []
    for i, (s, q) in enumerate(zip(eval_scenes, eval_q)):
        items.append(dict(set="eval", path=EVAL_DIR / f"eval_{i:02d}.png", scale=1, scene=s, questions=q))
    for i, (s, q) in enumerate(zip(example_scenes, example_q)):
        items.append(dict(set="examples", path=EXAMPLES_DIR / f"shapes_{i + 1}.png", scale=2, scene=s, questions=q))
    return items


def write_images(items):
    shutil.rmtree(EVAL_DIR, ignore_errors=True)
    EVAL_DIR.mkdir(parents=True)
    EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    for old in EXAMPLES_DIR.glob("shapes_*.png"):
        old.unlink()
    for it in items:
        render(it["scene"], it["scale"]).save(it["path"], optimize=True)


def outputs_for(name, model, processor, items):
    # Read back from the PNG files, as a user's images would be.
    return [model_outputs(name, model, processor, Image.open(it["path"]), it["questions"]) for it in items]


# ---------------------------------------------------------------- the three stages


NAMES = ["demo", "demo-vqa", "demo-blip2"]
CLASSES = {"demo": BlipForConditionalGeneration, "demo-vqa": BlipForQuestionAnswering,
           "demo-blip2": Blip2ForConditionalGeneration}
PROCESSORS = {"demo": BlipProcessor, "demo-vqa": BlipProcessor, "demo-blip2": Blip2Processor}
# Steps, learning rate and batch size per model (--step-scale multiplies steps).
SCHEDULE = {
    "demo": dict(steps=6000, lr=2e-3, batch_size=48),
    "demo-vqa": dict(steps=7000, lr=1e-3, batch_size=48),
    "demo-blip2": dict(steps=6000, lr=1e-3, batch_size=48),
}
BLIP2_CAPTION_SHARE = 0.4


def build_processors():
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    assert image_processor.resample == 3  # bicubic, as BlipImageProcessor
    bert = build_bert_tokenizer()
    blip = BlipProcessor(image_processor=image_processor, tokenizer=bert)
    bpe = build_bpe_tokenizer(BPE_VOCAB)
    blip2 = Blip2Processor(copy.deepcopy(image_processor), bpe, num_query_tokens=NUM_QUERY_TOKENS)
    # Every grammar word is one token (whole word; with a leading space for the BPE).
    for w in GRAMMAR_WORDS:
        assert len(bert(w, add_special_tokens=False).input_ids) == 1, w
        assert len(bpe(" " + w, add_special_tokens=False).input_ids) == 1, w
    assert len(bpe("a", add_special_tokens=False).input_ids) == 1
    assert blip2.tokenizer.convert_tokens_to_ids("<image>") == len(blip2.tokenizer) - 1  # added last
    return blip, blip2


def stage(name, opts):
    """Build, initialise and train one model, save its folder, record its outputs.

    Runs in its own process for demo-vqa and demo-blip2 (both start from
    models/demo, written by the demo stage)."""
    torch.set_num_threads(opts["threads"])
    warnings.filterwarnings("ignore", message=".*model-agnostic default.*")
    blip_p, blip2_p = build_processors()
    processor = blip2_p if name == "demo-blip2" else blip_p
    start = time.time()
    pool = Pool(opts["pool"], processor.image_processor)
    print(f"{name}: pool of {opts['pool']} training images in {time.time() - start:.0f}s", flush=True)
    sched = dict(SCHEDULE[name])
    sched["steps"] = max(1, int(sched["steps"] * opts["step_scale"]))
    torch.manual_seed(TORCH_SEED)
    init = None
    if name == "demo":
        model = BlipForConditionalGeneration(blip_config(blip_p.tokenizer))
        make_batch = caption_batch_fn(pool, blip_p.tokenizer, model.config.text_config.bos_token_id)
    elif name == "demo-vqa":
        model = BlipForQuestionAnswering(blip_config(blip_p.tokenizer))
        demo = BlipForConditionalGeneration.from_pretrained(MODELS / "demo")
        # As BLIP's VQA fine-tuning starts from the pre-trained model: the vision
        # tower, and both text towers from the caption decoder (same layout).
        model.vision_model.load_state_dict(demo.vision_model.state_dict())
        model.text_encoder.load_state_dict(demo.text_decoder.bert.state_dict())
        model.text_decoder.load_state_dict(demo.text_decoder.state_dict())
        init = ("vision_model, text_encoder (from text_decoder.bert) and text_decoder from models/demo; "
                "all parameters trained")
        bert = blip_p.tokenizer
        answers = sorted({a for s in pool.questions for _, _, a in s})
        answer_ids = {a: bert.convert_tokens_to_ids(a) for a in answers}
        assert all(bert.convert_ids_to_tokens(i) == a for a, i in answer_ids.items())
        make_batch = vqa_batch_fn(pool, bert, model.config.text_config.bos_token_id, answer_ids)
    else:
        tok = blip2_p.tokenizer
        model = Blip2ForConditionalGeneration(blip2_config(tok))
        with torch.no_grad():
            model.query_tokens.normal_(0.0, 0.02)  # transformers zero-initialises them
        demo = BlipForConditionalGeneration.from_pretrained(MODELS / "demo")
        # As BLIP-2 starts from a trained image encoder (here fine-tuned too: frozen,
        # the question answers came out a few points worse for the same time).
        model.vision_model.load_state_dict(demo.vision_model.state_dict())
        init = ("vision_model from models/demo; query_tokens ~ N(0, 0.02); Q-Former, projection and OPT "
                "from transformers' initialisation; all parameters trained")
        image_token, newline = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("Ċ")
        assert newline == model.config.text_config.eos_token_id
        # The training sequences are what the processor builds (checked on one prompt).
        q = PROMPT.format("how many shapes are there?")
        ids = blip2_p(images=render(pool.scenes[0]), text=q, return_tensors="pt")["input_ids"][0].tolist()
        assert blip2_sequence(tok, image_token, newline, q, " one")[0][: len(ids)] == ids
        make_batch = blip2_batch_fn(pool, tok, image_token, newline, BLIP2_CAPTION_SHARE)
    record = train(name, model, make_batch, **sched)
    record["init"] = init or "from scratch (transformers' initialisation)"
    if name == "demo-blip2":
        record["caption_share"] = BLIP2_CAPTION_SHARE
    del pool
    out = MODELS / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    start = time.time()
    outputs = outputs_for(name, model, processor, fresh_sets(opts["eval"]))
    holdout = holdout_figures(name, model, processor, opts["holdout"]) if opts["holdout"] else None
    print(f"{name}: outputs and holdout in {time.time() - start:.0f}s: {holdout}", flush=True)
    return dict(record=record, outputs=outputs, holdout=holdout)


# ---------------------------------------------------------------- main


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def n_params(model) -> int:
    # Tied weights counted once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def arg(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def main():
    wall_start = time.time()
    quick = "--quick" in sys.argv
    if quick or "--out" in sys.argv:
        # Never overwrite the committed outputs with a smoke test's.
        out = Path(arg("--out", tempfile.mkdtemp(prefix="make_demo_models_"))).resolve()
        os.environ["MAKE_DEMO_MODELS_OUT"] = str(out)
        global OUT, MODELS, EVAL_DIR, EXAMPLES_DIR, REFERENCE
        OUT = out
        MODELS = OUT / "models"
        EVAL_DIR = OUT / "tests" / "fixtures" / "demo" / "eval"
        EXAMPLES_DIR = OUT / "examples"
        REFERENCE = OUT / "tests" / "fixtures" / "reference" / "demo.json"
        print(f"writing under {OUT}", flush=True)
    opts = dict(
        threads=arg("--threads", THREADS),
        step_scale=arg("--step-scale", 0.01 if quick else 1.0),
        pool=arg("--pool", 1000 if quick else 16000),
        eval=arg("--eval", 36),
        holdout=arg("--holdout", 10 if quick else 200),
    )
    torch.set_num_threads(opts["threads"])
    items = fresh_sets(opts["eval"])
    write_images(items)

    # The caption model first: the other two start from it, in parallel.
    results = {"demo": stage("demo", opts)}
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
        futures = {name: ex.submit(stage, name, opts) for name in NAMES[1:]}
        results.update({name: f.result() for name, f in futures.items()})
    train_wall = time.time() - wall_start

    # Reload every folder as a user would; the reload must reproduce every output.
    entries = []
    for it in items:
        entries.append(dict(set=it["set"], image=str(it["path"].relative_to(OUT)),
                            size=list(Image.open(it["path"]).size), scene=it["scene"],
                            caption=caption(it["scene"]), questions=it["questions"], outputs={}))
    (Path(tempfile.gettempdir()) / "make_demo_models_results.json").write_text(json.dumps(results))
    models_info = {}
    margin_diffs = {}
    for name in NAMES:
        folder = MODELS / name
        model = CLASSES[name].from_pretrained(folder).eval()
        processor = PROCESSORS[name].from_pretrained(folder)
        again = outputs_for(name, model, processor, items)
        # Same ids and texts; the margins agree to float noise (the reloaded
        # model's decoder takes a slightly different float path, ~1e-4).
        diff = compare_outputs(again, results[name]["outputs"], name)
        margin_diffs[name] = diff
        for e, o in zip(entries, again):
            e["outputs"][name] = o
        gen = folder / "generation_config.json"
        models_info[name] = dict(
            path=f"models/{name}",
            class_name=type(model).__name__,
            params=n_params(model),
            folder_bytes=folder_bytes(folder),
            files={f.name: f.stat().st_size for f in sorted(folder.iterdir())},
            generation_config=json.loads(gen.read_text()) if gen.exists() else None,
            train=results[name]["record"],
        )
    print(f"the reloaded folders generate the same ids and texts (margins within {margin_diffs})", flush=True)

    metrics, margins, low = figures(entries)
    metrics["holdout_greedy"] = {name: results[name]["holdout"] for name in NAMES}
    text2 = Blip2Config.from_pretrained(MODELS / "demo-blip2")
    meta = dict(
        description="Tiny BLIP / BLIP VQA / BLIP-2 OPT models trained by tools/make_demo_models.py on a "
        "synthetic shapes world; transformers' outputs on fresh images (seeds not used in training).",
        transformers=transformers.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        threads_per_process=opts["threads"],
        seeds=dict(train=TRAIN_SEED, eval=EVAL_SEED, examples=EXAMPLES_SEED, holdout=HOLDOUT_SEED,
                   torch=TORCH_SEED, bpe_corpus=BPE_SEED),
        world=dict(canvas=CANVAS, shape_colors=SHAPE_COLORS, backgrounds=BACKGROUNDS, kinds=KINDS,
                   radius=SIZES, columns=COLUMNS, column_phrases=COLUMN_PHRASE,
                   caption_examples=[caption(e["scene"]) for e in entries[:3]]),
        generation=dict(
            greedy="model.generate(**processor(images=image[, text=...], return_tensors='pt'), "
            "output_scores=True, return_dict_in_generate=True): transformers' defaults",
            beams3="model.generate(**inputs, num_beams=3)",
            blip_ids="the full sequence generate returns ([DEC] first); beams3 cut after the first [SEP]",
            blip_text="processor.decode(ids, skip_special_tokens=True)",
            blip2_new_ids="the tokens after the input ([<image>]*Q + [</s>] + prompt), up to and including "
            "the first eos (newline)",
            blip2_text="processor.tokenizer.decode(new_ids, skip_special_tokens=True).strip()",
            blip2_prompt=PROMPT,
            blip2_eos_token_id=text2.text_config.eos_token_id,
            blip2_image_token_index=text2.image_token_index,
            blip2_num_query_tokens=text2.num_query_tokens,
            min_margin="smallest top-1 minus top-2 score over the greedy steps (output_scores=True)",
        ),
        models=models_info,
        total_folder_bytes=sum(m["folder_bytes"] for m in models_info.values()),
        wall_s=dict(training_and_recording=round(train_wall, 1), total=round(time.time() - wall_start, 1)),
        metrics=metrics,
        min_margin=margins,
        low_margin_cases=low,
        reload_check=dict(
            recorded="outputs of the folders reloaded with from_pretrained (model and processor), as a user loads them",
            compared_with="the in-memory models right after training: identical ids and texts everywhere",
            max_abs_min_margin_difference=margin_diffs,
        ),
        images=entries,
    )
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(dict(metrics=metrics, min_margin=margins, low_margin_cases=len(low),
                          sizes={k: (v["params"], v["folder_bytes"]) for k, v in models_info.items()},
                          total_bytes=meta["total_folder_bytes"], wall_s=meta["wall_s"]), indent=1))


LOW_MARGIN = 0.05
MARGIN_TOLERANCE = 1e-3


def compare_outputs(a, b, where):
    """a == b except min_margin, which may differ by float noise; returns the
    largest margin difference."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        worst = 0.0
        for k in a:
            if k == "min_margin":
                d = abs(a[k] - b[k])
                assert d <= MARGIN_TOLERANCE, (where, a[k], b[k])
                worst = max(worst, d)
            else:
                worst = max(worst, compare_outputs(a[k], b[k], f"{where}.{k}"))
        return worst
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        return max([compare_outputs(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))], default=0.0)
    assert a == b, (where, a, b)
    return 0.0


def figures(entries):
    metrics = {}
    margins = {"demo": [], "demo-vqa": [], "demo-blip2": []}
    low = []
    for kind in ("eval", "examples"):
        es = [e for e in entries if e["set"] == kind]
        n = len(es)
        nq = sum(len(e["questions"]) for e in es)
        m = dict(images=n, questions=nq)
        for mode in ("greedy", "beams3"):
            m[f"demo_caption_exact_{mode}"] = round(
                sum(e["outputs"]["demo"][mode]["text"] == e["caption"] for e in es) / n, 4)
            m[f"demo_blip2_caption_exact_{mode}"] = round(
                sum(e["outputs"]["demo-blip2"]["caption"][mode]["text"] == e["caption"] for e in es) / n, 4)
            m[f"demo_vqa_accuracy_{mode}"] = round(
                sum(o[mode]["text"] == q["answer"] for e in es
                    for q, o in zip(e["questions"], e["outputs"]["demo-vqa"])) / nq, 4)
            m[f"demo_blip2_vqa_accuracy_{mode}"] = round(
                sum(o[mode]["text"] == q["answer"] for e in es
                    for q, o in zip(e["questions"], e["outputs"]["demo-blip2"]["questions"])) / nq, 4)
        by_type = {}
        for e in es:
            for q, o1, o2 in zip(e["questions"], e["outputs"]["demo-vqa"], e["outputs"]["demo-blip2"]["questions"]):
                t = by_type.setdefault(q["type"], dict(questions=0, demo_vqa_greedy=0, demo_blip2_greedy=0))
                t["questions"] += 1
                t["demo_vqa_greedy"] += o1["greedy"]["text"] == q["answer"]
                t["demo_blip2_greedy"] += o2["greedy"]["text"] == q["answer"]
        m["correct_by_question_type"] = dict(sorted(by_type.items()))
        metrics[kind] = m
        for e in es:
            cases = [("demo", None, e["outputs"]["demo"]["greedy"])]
            cases += [("demo-vqa", o["question"], o["greedy"]) for o in e["outputs"]["demo-vqa"]]
            cases += [("demo-blip2", None, e["outputs"]["demo-blip2"]["caption"]["greedy"])]
            cases += [("demo-blip2", o["prompt"], o["greedy"]) for o in e["outputs"]["demo-blip2"]["questions"]]
            for model, prompt, g in cases:
                margins[model].append(g["min_margin"])
                if g["min_margin"] < LOW_MARGIN:
                    low.append(dict(set=kind, image=e["image"], model=model, prompt=prompt, text=g["text"],
                                    min_margin=g["min_margin"]))
    summary = {k: min(v) for k, v in margins.items()}
    summary["global"] = min(summary.values())
    summary["low_margin_threshold"] = LOW_MARGIN
    return metrics, summary, low


if __name__ == "__main__":
    main()
