"""Train the tiny demo LLaVA (`demo-llava`) on the shapes world of
tools/make_demo_models.py and record what transformers generates with it.

Run from the repository root with the pinned versions in tools/requirements.txt:

    python tools/make_demo_llava.py

It writes
  models/demo-llava/                        LlavaForConditionalGeneration + LlavaProcessor
                                            (save_pretrained, float32 safetensors)
  tests/fixtures/reference/demo-llava.json  ground truth, transformers' greedy outputs, figures
It reads (never rewrites) the images make_demo_models.py wrote,
tests/fixtures/demo/eval/eval_00..35.png and examples/shapes_1..8.png, checks
each against a fresh render of its scene (make_demo_models' seeds, through
make_demo_clip.committed_images), and also records the two photos in
examples/photos (no ground truth).

The world (random_scene, render, caption, questions, the training Pool,
fresh_sets, the train() loop) is imported from make_demo_models.py, not
copied; the template, the tokenizer layout and the processor are those of
make_llava_fixtures.py. Importing either runs nothing.

The model is LLaVA-1.5's layout at toy size: a CLIP vision tower (96 px, the
world's canvas, in 16 px patches: 36 patch features from layer -2, CLS
dropped, "default"), a 2-layer GELU projector and a Llama with grouped-query
attention (4 query heads sharing 2 key/value heads), prompted with llava-1.5's
chat template verbatim:

    USER: <image>\n{question} ASSISTANT: {answer} USER: {question} ASSISTANT:

The tokenizer is a Llama-style byte-fallback BPE built exactly as in
make_llava_fixtures.py (LlamaTokenizer(vocab, merges), <unk>=0 <s>=1 </s>=2,
the 256 byte tokens 3..258, the characters, the merges, then <image> and <pad>
as added special tokens), but its merges are learnt from the texts of this
world, split the way the tokenizer sees them (a leading "▁" only at the start of
the text, none after <image>: "\nwhat" is <0x0A> "what"), so that every word is
one token.

Training (LLaVA-1.5's instruction tuning, on the world): everything from
scratch (transformers' initialisation), transformers' own loss (labels passed
to forward) with -100 everywhere but the assistant's tokens,
make_demo_models.train() (AdamW, linear warmup, cosine to 0), one torch
thread. A conversation about one pool picture has 1 to 6 turns (TURNS), each
  * "Describe this image in one sentence." -> the world's caption (what
    `caption -m demo-llava photo.png` asks), or
  * one of the world's questions about it (make_demo_models.questions and
    the pool's "is there a ...?": count, background, colour of a kind, kind /
    colour / size at a column, where a shape is, is there a ...) -> its
    one-word answer (TYPE_WEIGHTS);
the first letter of a question is sometimes capitalised. Every answer is
followed by </s> as the target. An earlier answer is rendered as the template
renders it ("ASSISTANT: {a1} USER: ..."): the input holds no </s> there (as in
a transformers or `caption chat` conversation), and the label at the token
after the answer is </s>. The input ends with the last answer's </s>.

Why not demo-clip's vision tower (64 px, 8 px patches), frozen as LLaVA-1.5
freezes CLIP: tried first, it gave the right background and count, but chance
level on every question about a position ("what shape is on the left?",
"where is the red circle?") and few right captions of 2 or 3 shapes, even
fine-tuned. demo-clip was never asked about left and right (its captions
always name the shapes left to right, and its hard negatives swap colours
and kinds, not places), and a linear probe finds the column of only 69% of its
layer -2 patch features.

Then the folder is reloaded with from_pretrained and everything recorded is
computed from the reloaded model, with
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    new    = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, n:]
    text   = processor.batch_decode([new], skip_special_tokens=True)[0].strip()
An answer is right when text equals the world's answer (caption) exactly.

Options (for trying changes quickly): --quick (60 steps, a small pool,
written to a temporary folder), --out DIR (write there instead of the
repository), --steps N, --batch N, --lr X, --pool N, --holdout N, --threads N.
"""

import copy
import json
import platform
import random
import shutil
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import PIL
import tokenizers
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer
from transformers import (
    CLIPImageProcessorPil,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_models as world  # noqa: E402  (only definitions run on import)
from make_demo_clip import committed_images, run_setup  # noqa: E402
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
    all_questions,
    caption,
    pick_questions,
    questions,
    random_scene,
    render,
    train,
)
from make_llava_fixtures import (  # noqa: E402
    PIECE,
    TEMPLATE,
    UNICODE_WHITE_SPACE,
    dumps,
    llama_tokenizer,
    merges_of,
)

ROOT = world.ROOT
NAME = "demo-llava"
THREADS = 1

INSTRUCTION = "Describe this image in one sentence."  # src/captioner/llava.rs DEFAULT_INSTRUCTION
TOKENIZER_SEED = 102  # the tokenizer corpus' scenes (make_demo_models: 100, make_demo_clip: 101)
EXISTS_SEED = 5  # the recorded "is there a ...?" questions: random.Random(f"5-{file name}")
MAX_MERGES = 600  # never reached: merging stops when no pair occurs twice

# ---------------------------------------------------------------- conversations


def user(text, image):
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def messages_of(turns):
    """[(question, answer or None)] -> the chat messages, the image in the first user turn."""
    out = []
    for i, (q, a) in enumerate(turns):
        out.append(user(q, i == 0))
        if a is not None:
            out.append(assistant(a))
    return out


def prompt_of(turns):
    """What the template renders for turns (the last one's answer None) with
    add_generation_prompt=True; checked against apply_chat_template at start."""
    text = ""
    for i, (q, a) in enumerate(turns):
        text += "USER: " + ("<image>\n" if i == 0 else "") + q + " ASSISTANT:"
        if a is not None:
            text += " " + a + " "
    return text


def capitalised(q):
    return q[0].upper() + q[1:]


# ---------------------------------------------------------------- tokenizer


def tokenizer_texts():
    """The world's prompts and answers, as the tokenizer sees them: the text
    before <image> ("USER: ", with the leading "▁") and the text after it."""
    rng = random.Random(TOKENIZER_SEED)
    firsts, rests = Counter(), Counter()
    for _ in range(3000):
        scene = random_scene(rng)
        qa = [(INSTRUCTION, caption(scene))] + [(q, a) for _, q, a in all_questions(scene, rng)]
        for q, a in qa:
            for qq in (q, capitalised(q)):
                # Every text as a first and as a second question.
                q2, a2 = rng.choice(qa)
                for turns in ([(qq, a), (q2, None)], [(q2, a2), (qq, None)]):
                    before, after = prompt_of(turns).split("<image>")
                    firsts[before] += 1
                    rests[after] += 1
    return firsts, rests


def pieces(text, first):
    """SentencePiece-like pieces (make_llava_fixtures.PIECE) of text as the
    Metaspace pre-tokenizer gives it: spaces become "▁", and "▁" is prepended
    only to the first segment of the text (prepend_scheme "first")."""
    text = text.replace(" ", "▁")
    if first:
        text = "▁" + text
    return PIECE.findall(text)


def build_tokenizer() -> LlamaTokenizer:
    firsts, rests = tokenizer_texts()
    counts = Counter()
    for texts, first in ((firsts, True), (rests, False)):
        for t, c in texts.items():
            for p in pieces(t, first):
                if "\n" not in p:  # the newline after <image> falls back to <0x0A>, as Llama's
                    counts[p] += c
    # Every printable ASCII character is in the alphabet (only other text falls back to bytes).
    ascii_line = Counter(pieces(" ".join(chr(c) for c in range(33, 127)), True))
    alphabet = sorted({ch for w in list(counts) + list(ascii_line) for ch in w})
    # make_llava_fixtures' trainer: merges never cross a piece; stops when no pair occurs twice.
    merges = merges_of(counts, MAX_MERGES)
    return llama_tokenizer(alphabet, merges)


# ---------------------------------------------------------------- processor and model

# The world's own canvas (no resize for 96 px pictures), in 16 px patches: each
# of the three 32 px columns is two patch columns, and there are 6x6 = 36 image
# tokens. (A vision tower on 64 px with 8 px patches, demo-clip's, is 64.)
IMAGE_SIZE = CANVAS
PATCH_SIZE = 16
VISION = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,  # the features are layer 3's output (vision_feature_layer -2)
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    num_channels=3,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=64,
    initializer_range=0.02,
)
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # "default" drops the CLS feature
MAX_NEW_TOKENS = 24
TEXT = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=176,
    num_hidden_layers=3,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    initializer_range=0.02,
)


def make_processor(tokenizer) -> LlavaProcessor:
    # As make_llava_fixtures (openai's CLIP mean and std, bicubic), at the canvas size.
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
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )


def llava_config(tokenizer) -> LlavaConfig:
    text = dict(
        TEXT,
        model_type="llama",
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=dict(VISION, model_type="clip_vision_model"),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def make_model(tokenizer):
    torch.manual_seed(TORCH_SEED)
    model = LlavaForConditionalGeneration(llava_config(tokenizer))
    model.generation_config.max_new_tokens = MAX_NEW_TOKENS
    model.generation_config.do_sample = False
    assert model.generation_config.eos_token_id == 2
    return model


# ---------------------------------------------------------------- training data


class Encoder:
    """Token ids and labels of conversations, cached (the tokenizer runs once per distinct text)."""

    def __init__(self, processor):
        self.tok = processor.tokenizer
        self.eos = self.tok.eos_token_id
        self.image = processor.image_token
        self.cache = {}

    def ids(self, text):
        return self.tok(text.replace(self.image, self.image * IMAGE_TOKENS)).input_ids

    def sequence(self, turns):
        """ids and labels of a conversation [(question, answer)]: every
        answer's tokens and a </s> after it are targets; the input has a </s>
        only at the end (an earlier answer is followed by the next "USER:", as
        the template renders it)."""
        key = tuple(turns)
        if key in self.cache:
            return self.cache[key]
        labels_at = {}
        prefixes = []
        for i, (q, a) in enumerate(turns):
            asked = self.ids(prompt_of(list(turns[:i]) + [(q, None)]))
            answered = self.ids(prompt_of(list(turns[: i + 1])).rstrip(" "))
            assert answered[: len(asked)] == asked, turns
            for j in range(len(asked), len(answered)):
                labels_at[j] = answered[j]
            labels_at[len(answered)] = self.eos
            prefixes += [asked, answered]
        ids = answered + [self.eos]
        # Each prefix's tokens are the whole conversation's (merges never cross a piece).
        for p in prefixes:
            assert ids[: len(p)] == p, turns
        labels = [labels_at.get(j, -100) for j in range(len(ids))]
        self.cache[key] = (ids, labels)
        return ids, labels


CAPTION_SHARE = 0.3  # of the turns: the caption instruction; the others a question
# Conversations of k turns (share of each k): several questions about one
# image cost little more than one, since its 64 image tokens dominate.
TURNS = {1: 0.25, 2: 0.15, 3: 0.15, 4: 0.15, 5: 0.15, 6: 0.15}
CAPITALISED_SHARE = 0.25  # of the questions: first letter upper case
# The lookups by content ("where is the red circle?", "is there a red circle?")
# are the hardest; their types are drawn twice as often as the others.
TYPE_WEIGHTS = {"where": 2, "exists": 2}


class Batches:
    """Random conversations about random pool scenes (see the docstring), as
    the model's inputs: padded on the right with <pad>, labels -100 but on
    the answers and their </s>."""

    def __init__(self, pool, encoder):
        self.pool = pool
        self.encoder = encoder
        self.mix = Counter()

    def turn(self, i, rng):
        """(question, answer, type)."""
        if rng.random() < CAPTION_SHARE:
            return INSTRUCTION, self.pool.captions[i], "caption"
        # A question type (weighted, of those this scene has), then a uniform question of it.
        qs = self.pool.questions[i]
        types = sorted({t for t, _, _ in qs})
        kind = rng.choices(types, [TYPE_WEIGHTS.get(t, 1) for t in types])[0]
        _, q, a = rng.choice([x for x in qs if x[0] == kind])
        if rng.random() < CAPITALISED_SHARE:
            q = capitalised(q)
        return q, a, kind

    def conversation(self, i, rng):
        r = rng.random()
        for k, share in TURNS.items():
            r -= share
            if r < 0:
                break
        turns = []
        while len(turns) < k:  # k distinct questions (every scene has at least 9, and the caption)
            t = self.turn(i, rng)
            if t[0].lower() not in {q.lower() for q, _, _ in turns}:
                turns.append(t)
        self.mix[f"turns {k}"] += 1
        for _, _, kind in turns:
            self.mix[kind] += 1
        return [(q, a) for q, a, _ in turns]

    def __call__(self, rng, b):
        idx = [rng.randrange(len(self.pool.scenes)) for _ in range(b)]
        seqs = [self.encoder.sequence(self.conversation(i, rng)) for i in idx]
        n = max(len(s) for s, _ in seqs)
        input_ids = torch.full((b, n), self.encoder.tok.pad_token_id)
        labels = torch.full((b, n), -100)
        mask = torch.zeros((b, n), dtype=torch.long)
        for k, (s, lab) in enumerate(seqs):
            input_ids[k, : len(s)] = torch.tensor(s)
            labels[k, : len(s)] = torch.tensor(lab)
            mask[k, : len(s)] = 1
        return dict(pixel_values=self.pool.pixels[idx], input_ids=input_ids, attention_mask=mask, labels=labels)


# ---------------------------------------------------------------- generation and recording

BACKGROUND_QUESTION = "what color is the background?"
LOW_MARGIN = 0.05


def greedy(model, processor, image, turns):
    """transformers' greedy answer to the conversation turns (the last one's answer None)."""
    messages = messages_of(turns)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == prompt_of(turns), (prompt, prompt_of(turns))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences[0, :n].tolist() == inputs["input_ids"][0].tolist()
    new_ids = out.sequences[0, n:].tolist()
    steps = torch.stack([s[0].float() for s in out.logits])
    top2 = torch.topk(steps, 2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    assert len(margins) == len(new_ids)
    text = processor.batch_decode([new_ids], skip_special_tokens=True)[0]
    return dict(
        messages=messages,
        prompt=prompt,
        input_ids=inputs["input_ids"][0].tolist(),
        new_ids=new_ids,
        text=text.strip(),
        stopped_on_eos=new_ids[-1] == model.config.text_config.eos_token_id,
        min_margin=min(margins),
    )


def recorded_images():
    """The eval images and README examples of make_demo_models.py with their
    scenes and picked questions (checked pixel for pixel against their PNG
    files by make_demo_clip.committed_images), then the two photos."""
    out = []
    fresh = world.fresh_sets(36)
    committed = committed_images()
    for k, c in enumerate(committed):
        it = fresh[k] if k < len(fresh) else None
        if it is not None:
            assert c["path"] == ROOT / it["path"].relative_to(world.OUT) and c["scene"] == it["scene"]
        out.append(dict(set=c["set"], path=c["path"], scene=c["scene"], picked=it["questions"] if it else None))
    return out


def image_questions(item, rng):
    """Every question of the world about this image (make_demo_models.questions),
    the picked ones of reference/demo.json first, and one yes and one no
    "is there a ...?" (those picked, else drawn from rng); a photo gets the
    background question only."""
    if item["scene"] is None:
        return [dict(type="background", question=BACKGROUND_QUESTION, answer=None, picked=False)]
    qs, present, combos = questions(item["scene"])
    out = [dict(q, picked=True) for q in item["picked"]]
    exists = {q["answer"] for q in item["picked"] if q["type"] == "exists"}
    for t, q, a in qs:
        out.append(dict(type=t, question=q, answer=a, picked=False))
    if "yes" not in exists:
        c = rng.choice(sorted(present))
        out.append(dict(type="exists", question=f"is there a {c[0]} {c[1]}?", answer="yes", picked=False))
    if "no" not in exists:
        c = rng.choice([c for c in combos if c not in present])
        out.append(dict(type="exists", question=f"is there a {c[0]} {c[1]}?", answer="no", picked=False))
    seen, unique = set(), []
    for q in out:
        if q["question"] not in seen:
            seen.add(q["question"])
            unique.append(q)
    return unique


def record_image(model, processor, item):
    rng = random.Random(f"{EXISTS_SEED}-{item['path'].name}")
    image = Image.open(item["path"])
    scene = item["scene"]
    truth = caption(scene) if scene else None
    cases = [dict(type="caption", question=INSTRUCTION, answer=truth, picked=False)] + image_questions(item, rng)
    for c in cases:
        g = greedy(model, processor, image, [(c["question"], None)])
        del g["messages"]
        c.update(g)
        c["correct"] = None if c["answer"] is None else c["text"] == c["answer"]
    conversations = []
    if scene is not None:
        by_q = {c["question"]: c for c in cases}
        p = item["picked"]
        # (first question, second question): a question after a question, a
        # question after the caption, the caption after a question.
        for first, second in ((p[0], p[1]), (dict(question=INSTRUCTION, answer=truth), p[2]),
                              (p[2], dict(question=INSTRUCTION, answer=truth))):
            own = by_q[first["question"]]["text"]  # the model's own first answer, as in `caption chat`
            turns = [(first["question"], own), (second["question"], None)]
            g = greedy(model, processor, image, turns)
            conversations.append(dict(
                kind=("caption" if first["question"] == INSTRUCTION else "question") + " then "
                + ("caption" if second["question"] == INSTRUCTION else "question"),
                second_type="caption" if second["question"] == INSTRUCTION else second["type"],
                first_correct=own == first["answer"],
                answer=second["answer"],
                **g,
                correct=g["text"] == second["answer"],
            ))
    return dict(set=item["set"], image=str(item["path"].relative_to(ROOT)), size=list(image.size), scene=scene,
                caption=truth, cases=cases, conversations=conversations)


def figures(entries):
    """Accuracy per set: caption exact match, the picked questions (as
    reference/demo.json's 108), all recorded questions by type, two-turn."""
    out = {}
    for kind in ("eval", "examples"):
        es = [e for e in entries if e["set"] == kind]
        caps = [c for e in es for c in e["cases"] if c["type"] == "caption"]
        qs = [c for e in es for c in e["cases"] if c["type"] != "caption"]
        picked = [c for c in qs if c["picked"]]
        convs = [c for e in es for c in e["conversations"]]
        by_type = {}
        for c in qs:
            t = by_type.setdefault(c["type"], dict(questions=0, right=0))
            t["questions"] += 1
            t["right"] += c["correct"]
        for t in by_type.values():
            t["accuracy"] = round(t["right"] / t["questions"], 4)
        two = {}
        for c in convs:
            t = two.setdefault(c["kind"], dict(conversations=0, right=0, first_right=0))
            t["conversations"] += 1
            t["right"] += c["correct"]
            t["first_right"] += c["first_correct"]
        for t in two.values():
            t["accuracy"] = round(t["right"] / t["conversations"], 4)
        out[kind] = dict(
            images=len(es),
            caption_exact=round(sum(c["correct"] for c in caps) / len(caps), 4),
            picked_questions=len(picked),
            picked_accuracy=round(sum(c["correct"] for c in picked) / len(picked), 4),
            questions=len(qs),
            question_accuracy=round(sum(c["correct"] for c in qs) / len(qs), 4),
            by_question_type=dict(sorted(by_type.items())),
            two_turn=len(convs),
            two_turn_accuracy=round(sum(c["correct"] for c in convs) / len(convs), 4),
            two_turn_by_kind=dict(sorted(two.items())),
        )
    return out


def holdout_figures(model, processor, n):
    """Greedy figures on n fresh scenes (make_demo_models' HOLDOUT_SEED and
    draws: random_scene, then pick_questions(scene, rng, 3) each), rendered in
    memory at 96 px: the caption, the background question and the 3 picked."""
    rng = random.Random(HOLDOUT_SEED)
    scenes = [random_scene(rng) for _ in range(n)]
    qsets = [pick_questions(s, rng, 3) for s in scenes]
    caps = bg = 0
    by_type = {}
    for scene, qs in zip(scenes, qsets):
        image = render(scene)
        caps += greedy(model, processor, image, [(INSTRUCTION, None)])["text"] == caption(scene)
        bg += greedy(model, processor, image, [(BACKGROUND_QUESTION, None)])["text"] == scene["background"]
        for q in qs:
            t = by_type.setdefault(q["type"], dict(questions=0, right=0))
            t["questions"] += 1
            t["right"] += greedy(model, processor, image, [(q["question"], None)])["text"] == q["answer"]
    nq = sum(t["questions"] for t in by_type.values())
    for t in by_type.values():
        t["accuracy"] = round(t["right"] / t["questions"], 4)
    return dict(images=n, caption_exact=round(caps / n, 4), background_accuracy=round(bg / n, 4), questions=nq,
                question_accuracy=round(sum(t["right"] for t in by_type.values()) / nq, 4),
                by_question_type=dict(sorted(by_type.items())))


# ---------------------------------------------------------------- checks


def check_template(processor):
    """prompt_of is what apply_chat_template renders, for one and two turns."""
    for turns in ([(BACKGROUND_QUESTION, None)], [(INSTRUCTION, None)],
                  [("What shape is on the left?", "circle"), (INSTRUCTION, None)],
                  [(INSTRUCTION, "a small red circle on a white background"), ("how many shapes are there?", None)]):
        assert processor.apply_chat_template(messages_of(turns), add_generation_prompt=True) == prompt_of(turns)
    full = [("how many shapes are there?", "one"), (BACKGROUND_QUESTION, "gray")]
    assert processor.apply_chat_template(messages_of(full), add_generation_prompt=False) == prompt_of(full)


def tokenizer_check(processor, folder, entries):
    """tokenizers.Tokenizer.from_file(tokenizer.json) (as the Rust crate reads
    it) gives the processor's ids for every recorded prompt and the same
    decode for every answer."""
    rust_like = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = processor.tokenizer
    image = processor.image_token
    n = 0
    for e in entries:
        for c in e["cases"] + e["conversations"]:
            assert rust_like.encode(c["prompt"].replace(image, image * IMAGE_TOKENS)).ids == c["input_ids"]
            for skip in (True, False):
                assert rust_like.decode(c["new_ids"], skip_special_tokens=skip) == tok.decode(
                    c["new_ids"], skip_special_tokens=skip)
            assert c["text"] == c["text"].strip(UNICODE_WHITE_SPACE)
            n += 1
    return n


# ---------------------------------------------------------------- main

STEPS = 7000
BATCH = 32
LR = 1e-3
POOL = 16000
HOLDOUT = 200


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def strip_trial(entries):
    return [(c["prompt"], c["new_ids"], c["text"]) for e in entries for c in e["cases"] + e["conversations"]]


def main():
    wall_start = time.time()
    out_root, folder, reference, opts = run_setup(
        NAME,
        dict(threads=THREADS, steps=STEPS, batch=BATCH, lr=LR, pool=POOL, holdout=HOLDOUT),
        dict(steps=60, pool=1000, holdout=10),
    )
    torch.set_num_threads(opts["threads"])
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()

    tokenizer = build_tokenizer()
    processor = make_processor(tokenizer)
    check_template(processor)
    start = time.time()
    pool = Pool(opts["pool"], processor.image_processor)
    model = make_model(tokenizer)
    encoder = Encoder(processor)
    batches = Batches(pool, encoder)
    pool_s = time.time() - start
    print(f"{NAME}: pool of {opts['pool']} scenes in {pool_s:.0f}s", flush=True)
    torch.manual_seed(TORCH_SEED)
    rec = train(NAME, model, batches, steps=opts["steps"], lr=opts["lr"], batch_size=opts["batch"],
                log_every=250)
    rec.update(mix={k: v for k, v in sorted(batches.mix.items())},
               # The vision tower's last layer and post_layernorm get no gradient: the
               # features are layer -2's. They keep transformers' initialisation.
               params_updated=sum(p.numel() for p in model.parameters() if p.grad is not None),
               params_never_updated=sorted(n for n, p in model.named_parameters() if p.grad is None))
    print(f"{NAME}: trained in {rec['wall_s']:.0f}s; mix {rec['mix']}", flush=True)
    train_s = time.time() - wall_start
    del pool, batches

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for f in folder.iterdir():
        f.chmod(0o644)  # safetensors writes 0600

    # Everything recorded comes from the folder reloaded as a user loads it.
    loaded, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    loaded.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reprocessor = LlavaProcessor.from_pretrained(folder)
    assert reprocessor.chat_template == TEMPLATE
    assert type(reprocessor.image_processor).__name__ == "CLIPImageProcessorPil"
    state = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    items = recorded_images()
    start = time.time()
    entries = [record_image(loaded, reprocessor, it) for it in items]
    # The in-memory model and processor give the same ids and texts (examples and photos).
    again = [record_image(model.eval(), processor, it) for it in items if it["set"] != "eval"]
    assert strip_trial(again) == strip_trial([e for e in entries if e["set"] != "eval"])
    n_tok = tokenizer_check(reprocessor, folder, entries)
    metrics = figures(entries)
    record_s = time.time() - start
    start = time.time()
    if opts["holdout"]:
        metrics["holdout"] = holdout_figures(loaded, reprocessor, opts["holdout"])
    holdout_s = time.time() - start
    print(json.dumps(metrics, indent=1), flush=True)

    margins, low = margin_summary(entries)
    cfg = loaded.config
    text = cfg.text_config
    vision = cfg.vision_config
    tok = reprocessor.tokenizer
    meta = dict(
        description="Tiny LLaVA-1.5-style model (CLIP vision tower, projector, Llama with grouped-query "
        "attention) trained by tools/make_demo_llava.py on the synthetic shapes world of "
        "tools/make_demo_models.py; transformers' greedy answers on the committed images (seeds not used in "
        "training), from the folder reloaded with from_pretrained.",
        transformers=transformers.__version__,
        torch=torch.__version__,
        tokenizers=tokenizers.__version__,
        pillow=PIL.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        threads=opts["threads"],
        seeds=dict(train=TRAIN_SEED, torch=TORCH_SEED, batches=f"{NAME}-batches", tokenizer_corpus=TOKENIZER_SEED,
                   eval=world.EVAL_SEED, examples=world.EXAMPLES_SEED, holdout=HOLDOUT_SEED,
                   recorded_exists_questions=f"random.Random(f'{EXISTS_SEED}-{{file name}}')"),
        world=dict(canvas=CANVAS, shape_colors=SHAPE_COLORS, backgrounds=BACKGROUNDS, kinds=KINDS, radius=SIZES,
                   scenes="make_demo_models.random_scene / render / caption / questions; as in reference/demo.json"),
        model=dict(
            path=f"models/{NAME}",
            class_name=type(loaded).__name__,
            params=sum(p.numel() for p in loaded.parameters()),
            params_vision=sum(p.numel() for p in loaded.model.vision_tower.parameters()),
            params_projector=sum(p.numel() for p in loaded.model.multi_modal_projector.parameters()),
            params_language=sum(p.numel() for p in loaded.model.language_model.parameters())
            + loaded.lm_head.weight.numel(),
            folder_bytes=folder_bytes(folder),
            files={f.name: f.stat().st_size for f in sorted(folder.iterdir())},
            dtype="float32",
            image_token_index=cfg.image_token_index,
            image_seq_length=cfg.image_seq_length,
            image_tokens=IMAGE_TOKENS,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            projector_hidden_act=cfg.projector_hidden_act,
            multimodal_projector_bias=cfg.multimodal_projector_bias,
            tie_word_embeddings=cfg.tie_word_embeddings,
            vision_config={k: getattr(vision, k) for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps")},
            text_config={k: getattr(text, k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")},
            generation_config=json.loads((folder / "generation_config.json").read_text()),
            image_processor=json.loads((folder / "processor_config.json").read_text())["image_processor"],
            tokenizer=dict(
                class_name=type(tok).__name__,
                vocab_size=len(tok),
                special_ids={t: tok.convert_tokens_to_ids(t) for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]},
                byte_token_ids="<0x00>..<0xFF> = 3..258",
                num_merges=len(json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]),
                layout="as make_llava_fixtures.py: <unk>, <s>, </s>, the 256 byte tokens, the alphabet (every "
                "printable ASCII character), one token per merge, then the added <image> and <pad>",
            ),
            init="from scratch: transformers' initialisation (torch seed 0), all parameters trained except the "
            "vision tower's last layer and post_layernorm, which the features (layer -2) never reach",
        ),
        train=dict(rec, pool=opts["pool"], caption_share=CAPTION_SHARE, type_weights=TYPE_WEIGHTS,
                   turns={str(k): v for k, v in TURNS.items()}, capitalised_share=CAPITALISED_SHARE, instruction=INSTRUCTION,
                   questions="make_demo_models.Pool.questions of the scene: a question type (type_weights, others 1), "
                   "then a uniform question of it",
                   labels="-100 except each answer's tokens and the </s> after it (in a two-turn conversation "
                   "the input there is the next turn's '▁USER'; the input ends with </s>)",
                   pool_s=round(pool_s, 1)),
        generation=dict(
            prompt="processor.apply_chat_template(messages, add_generation_prompt=True) (llava-1.5's template)",
            call=f"model.generate(**processor(images=image, text=prompt, return_tensors='pt'), "
            f"max_new_tokens={MAX_NEW_TOKENS}, do_sample=False)",
            input_ids="processor(...)['input_ids'][0]: <s> first, <image> expanded to "
            f"{IMAGE_TOKENS} tokens",
            new_ids="the generated tokens after the input, up to and including </s>",
            text="processor.batch_decode([new_ids], skip_special_tokens=True)[0].strip()",
            correct="text == the world's answer (the caption for the instruction); null without ground truth",
            min_margin="smallest top-1 minus top-2 logit over the greedy steps (output_logits)",
            conversations="two turns: the first question with the model's own answer to it (its case's text, "
            "as `caption chat` keeps it), then the second question; correct is about the second answer, "
            "first_correct about the first",
        ),
        metrics=metrics,
        metric_definitions=dict(
            caption_exact="share of images whose caption (the instruction's answer) is the world's exactly",
            picked_accuracy="the 3 questions per image of reference/demo.json (the other demos' figure)",
            question_accuracy="every recorded question: make_demo_models.questions + a yes and a no 'is there'",
            two_turn_accuracy="second answers right in the recorded two-turn conversations",
            holdout=f"{opts['holdout']} fresh scenes (make_demo_models' HOLDOUT_SEED draws), 96 px, in memory: "
            "caption, background question and the 3 picked questions",
        ),
        min_margin=margins,
        low_margin_cases=low,
        reload_check=dict(
            recorded="outputs of the folder reloaded with from_pretrained (model and processor)",
            compared_with="the in-memory model and processor right after training: identical weights, and "
            "identical ids and texts on the examples and photos",
        ),
        tokenizer_check=dict(
            rows=n_tok,
            checked="tokenizers.Tokenizer.from_file(tokenizer.json).encode(prompt with <image> expanded) == "
            "input_ids for every recorded prompt; decode (with and without skip_special_tokens) equal",
        ),
        wall_s=dict(train=round(rec["wall_s"], 1), until_trained=round(train_s, 1), record=round(record_s, 1),
                    holdout=round(holdout_s, 1), total=round(time.time() - wall_start, 1)),
        images=entries,
    )
    reference.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(meta) + "\n"
    assert json.loads(text) == json.loads(json.dumps(meta))
    reference.write_text(text)
    print(json.dumps(dict(min_margin=margins, low_margin_cases=len(low), params=meta["model"]["params"],
                          folder_bytes=meta["model"]["folder_bytes"], json_bytes=len(text.encode()),
                          wall_s=meta["wall_s"]), indent=1))


def margin_summary(entries):
    kinds = {"caption": [], "question": [], "two_turn": []}
    low = []
    for e in entries:
        for c in e["cases"]:
            kinds["caption" if c["type"] == "caption" else "question"].append(c["min_margin"])
        for c in e["conversations"]:
            kinds["two_turn"].append(c["min_margin"])
        for c in e["cases"] + e["conversations"]:
            if c["min_margin"] < LOW_MARGIN:
                low.append(dict(image=e["image"], prompt=c["prompt"], text=c["text"], correct=c["correct"],
                                min_margin=c["min_margin"]))
    out = {k: min(v) for k, v in kinds.items()}
    out["global"] = min(out.values())
    out["median"] = float(np.median([m for v in kinds.values() for m in v]))
    out["below_1"] = sum(m < 1 for v in kinds.values() for m in v)
    out["cases"] = sum(len(v) for v in kinds.values())
    out["low_margin_threshold"] = LOW_MARGIN
    return out, low


if __name__ == "__main__":
    main()
