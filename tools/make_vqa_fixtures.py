"""Build the tiny BLIP visual-question-answering fixture model and record
transformers' reference outputs for it.

Run from the repository root with the pinned versions in tools/requirements.txt
(after, or independently of, tools/make_fixtures.py, whose helpers it reuses):

    python tools/make_vqa_fixtures.py

It writes tests/fixtures/models/blip-vqa-tiny/ (a BlipForQuestionAnswering
folder in the Hugging Face layout, written by save_pretrained) and
tests/fixtures/reference/blip-vqa-tiny.json + .safetensors with what
transformers computes for each (image, question) pair.

How transformers answers (BlipForQuestionAnswering.generate):
  image_embeds    = vision_model(pixel_values)
  question_embeds = text_encoder(question ids, attention_mask,
                                 encoder_hidden_states=image_embeds)   # bidirectional
  answer          = text_decoder.generate([[bos]], eos=sep, pad=pad,
                                 encoder_hidden_states=question_embeds,
                                 encoder_attention_mask=all ones)
The answer decoder's cross-attention reads question_embeds (text width) through
layers sized by text_config.encoder_hidden_size, which BlipConfig sets to the
vision width, so this model has vision hidden_size == text hidden_size.

Every question is asked alone (one image, one question, no padding). One padded
batch is recorded only as a documented fact: the answer decoder's mask over the
question is all ones, so it also attends to the padded positions' embeddings.
"""

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file
from transformers import (
    BlipConfig,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
    LogitsProcessorList,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402
    IMAGES,
    MIN_MARGIN,
    MODELS,
    NOISE,
    REFERENCE,
    SEP_BIAS,
    TEXT_INIT,
    Jitter,
    build_tokenizer,
    strip_padding,
    tiny_config,
)

NAME = "blip-vqa-tiny"
# Width shared by the vision tower and the text towers (36 = 3 text heads of 12
# = 4 vision heads of 9): odd, so no dimension can be hard-coded.
WIDTH = 36
VQA_IMAGES = ["chelsea.png", "astronaut.jpg", "rocket.jpg", "rgba.png", "wide.png"]
QUESTIONS = [
    "what is in the picture?",
    "what color is the cat?",
    "how many people are there?",
    "is it a dog?",
]
# The padded-batch record: two questions of different lengths, one image.
PADDED_IMAGE = "chelsea.png"
PADDED_QUESTIONS = ["is it a dog?", "what color is the cat?"]
BEAMS = dict(num_beams=3)
SEEDS = range(300)
# Stop the seed search at the first seed whose beams3 cases are all stable;
# otherwise keep the best of the first few acceptable seeds.
MAX_CANDIDATES = 12


def vqa_config(tokenizer, image_size: int) -> BlipConfig:
    """make_fixtures.tiny_config with the vision width set to the text width."""
    base = tiny_config(tokenizer, image_size)
    text = base.text_config.to_dict()
    vision = base.vision_config.to_dict()
    for d in (text, vision):
        for k in ("transformers_version", "model_type", "architectures"):
            d.pop(k, None)
    vision["hidden_size"] = WIDTH
    text["hidden_size"] = WIDTH
    text["encoder_hidden_size"] = WIDTH
    config = BlipConfig(text_config=text, vision_config=vision, initializer_range=TEXT_INIT)
    assert config.text_config.encoder_hidden_size == config.vision_config.hidden_size == WIDTH
    assert config.text_config.hidden_size == WIDTH
    assert config.vision_config.hidden_size % config.vision_config.num_attention_heads == 0
    assert config.text_config.hidden_size % config.text_config.num_attention_heads == 0
    return config


def make_model(seed: int, tokenizer, processor):
    torch.manual_seed(seed)
    config = vqa_config(tokenizer, image_size=processor.image_processor.size["height"])
    model = BlipForQuestionAnswering(config).eval()
    with torch.no_grad():
        # As in make_fixtures: lift [SEP]'s output bias so some answers end early.
        model.text_decoder.cls.predictions.bias[config.text_config.sep_token_id] += SEP_BIAS
    return model


def check_tokens(processor):
    unk = processor.tokenizer.unk_token_id
    for q in QUESTIONS + PADDED_QUESTIONS:
        ids = processor.tokenizer(q).input_ids
        assert unk not in ids, f"[UNK] in {q!r}: {processor.tokenizer.convert_ids_to_tokens(ids)}"


def question_inputs(processor, image_name: str, question: str):
    image = Image.open(IMAGES / image_name)
    inputs = processor(images=image, text=question, return_tensors="pt")
    assert inputs["attention_mask"].all()
    return inputs


def generate(model, inputs, dtype=torch.float32, **kwargs):
    return model.generate(
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"].to(dtype),
        attention_mask=inputs["attention_mask"],
        **kwargs,
    )


def stable_under_noise(model, inputs, sequences, sep, kwargs) -> bool:
    """The same decision with +-NOISE added to every step's logits (4 draws)."""
    for trial in range(4):
        generator = torch.Generator().manual_seed(trial)
        noisy = generate(model, inputs, logits_processor=LogitsProcessorList([Jitter(generator)]), **kwargs)
        if [strip_padding(s.tolist(), sep) for s in noisy] != sequences:
            return False
    return True


def greedy_case(model, processor, image_name: str, question: str):
    """The greedy answer and its smallest top-1/top-2 margin (cheap: seed search)."""
    sep = model.config.text_config.sep_token_id
    inputs = question_inputs(processor, image_name, question)
    out = generate(model, inputs, output_scores=True, return_dict_in_generate=True, do_sample=False, num_beams=1)
    assert out.sequences.shape[0] == 1
    ids = strip_padding(out.sequences[0].tolist(), sep)
    margins = []
    for step_scores in out.scores:
        top2 = torch.topk(step_scores[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    return dict(
        image=image_name,
        question=question,
        inputs=inputs,
        input_ids=inputs["input_ids"][0].tolist(),
        ids=ids,
        text=processor.decode(ids, skip_special_tokens=True),
        min_margin=min(margins),
        stopped_on_sep=ids[-1] == sep,
        first_scores=out.scores[0][0].clone(),
    )


def run_cases(model, processor):
    return [greedy_case(model, processor, im, q) for im in VQA_IMAGES for q in QUESTIONS]


def acceptable(cases) -> bool:
    """Clear decisions everywhere; answers depend on both the image and the
    question; both ways of ending (SEP, max length) occur."""
    if min(c["min_margin"] for c in cases) < MIN_MARGIN:
        return False
    texts = {c["text"] for c in cases}
    if len(texts) < len(cases) // 2:
        return False
    for q in QUESTIONS:
        if len({c["text"] for c in cases if c["question"] == q}) < 2:
            return False
    for im in VQA_IMAGES:
        if len({c["text"] for c in cases if c["image"] == im}) < 2:
            return False
    stops = [c["stopped_on_sep"] for c in cases]
    return any(stops) and not all(stops)


def check_greedy(model, model64, cases):
    """Greedy must survive the noise and reproduce in float64; returns False otherwise."""
    sep = model.config.text_config.sep_token_id
    ok = True
    for c in cases:
        kwargs = dict(do_sample=False, num_beams=1)
        if not stable_under_noise(model, c["inputs"], [c["ids"]], sep, kwargs):
            ok = False
        exact = generate(model64, c["inputs"], dtype=torch.float64, **kwargs)
        c["greedy_f64_ids"] = strip_padding(exact[0].tolist(), sep)
        if c["greedy_f64_ids"] != c["ids"]:
            ok = False
    return ok


def beam_cases(model, model64, processor, cases):
    sep = model.config.text_config.sep_token_id
    for c in cases:
        out = generate(model, c["inputs"], output_scores=True, return_dict_in_generate=True, **BEAMS)
        sequences = [strip_padding(s.tolist(), sep) for s in out.sequences]
        exact = generate(
            model64, c["inputs"], dtype=torch.float64, output_scores=True, return_dict_in_generate=True, **BEAMS
        )
        sequences64 = [strip_padding(s.tolist(), sep) for s in exact.sequences]
        noise_ok = stable_under_noise(model, c["inputs"], sequences, sep, BEAMS)
        c["beams3"] = dict(
            sequences=sequences,
            texts=[processor.decode(s, skip_special_tokens=True) for s in sequences],
            scores=out.sequences_scores.tolist(),
            scores_f64=exact.sequences_scores.tolist(),
            stable=bool(noise_ok and sequences64 == sequences),
        )
    return sum(c["beams3"]["stable"] for c in cases)


def add_tensors(model, model64, cases):
    """pixel_values, image_embeds, question_embeds and the answer decoder's
    first-step logits, in float32 and (from the float64 model) float64."""
    bos = model.config.text_config.bos_token_id
    for c in cases:
        inputs = c["inputs"]
        for m, dtype, suffix in ((model, torch.float32, ""), (model64, torch.float64, "_f64")):
            with torch.no_grad():
                pixel_values = inputs["pixel_values"].to(dtype)
                image_embeds = m.vision_model(pixel_values=pixel_values).last_hidden_state
                question_embeds = m.text_encoder(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    encoder_hidden_states=image_embeds,
                ).last_hidden_state
                logits = m.text_decoder(
                    input_ids=torch.tensor([[bos]]), encoder_hidden_states=question_embeds
                ).logits[0, -1]
            c["image_embeds" + suffix] = image_embeds[0].numpy()
            c["question_embeds" + suffix] = question_embeds[0].numpy()
            c["first_logits" + suffix] = logits.numpy()
        c["pixel_values"] = inputs["pixel_values"][0].numpy()
        # Greedy's first-step scores are the raw first-step logits (no processors).
        torch.testing.assert_close(torch.tensor(c["first_logits"]), c["first_scores"], rtol=0, atol=1e-5)


def padded_row(model, processor, image_name, singles):
    """Answers to PADDED_QUESTIONS about one image, asked as one padded batch."""
    sep = model.config.text_config.sep_token_id
    bos = model.config.text_config.bos_token_id
    image = Image.open(IMAGES / image_name)
    inputs = processor(images=[image, image], text=PADDED_QUESTIONS, padding=True, return_tensors="pt")
    out = model.generate(
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        attention_mask=inputs["attention_mask"],
        do_sample=False,
        num_beams=1,
    )
    batched = [strip_padding(s.tolist(), sep) for s in out]
    by_question = {c["question"]: c for c in singles if c["image"] == image_name}
    single = [by_question[q]["ids"] for q in PADDED_QUESTIONS]
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        q = model.text_encoder(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], encoder_hidden_states=image_embeds
        ).last_hidden_state
        start = torch.full((2, 1), bos)
        # First-step logits as transformers computes them (all-ones question mask)...
        unmasked = model.text_decoder(input_ids=start, encoder_hidden_states=q).logits[:, -1]
        # ...and with the question's real attention_mask given to the decoder.
        masked_logits = model.text_decoder(
            input_ids=start, encoder_hidden_states=q, encoder_attention_mask=inputs["attention_mask"]
        ).logits[:, -1]
        masked = model.text_decoder.generate(
            input_ids=start,
            eos_token_id=sep,
            pad_token_id=model.config.text_config.pad_token_id,
            encoder_hidden_states=q,
            encoder_attention_mask=inputs["attention_mask"],
            do_sample=False,
            num_beams=1,
        )
    masked = [strip_padding(s.tolist(), sep) for s in masked]
    single_logits = torch.stack([torch.tensor(by_question[q]["first_logits"]) for q in PADDED_QUESTIONS])
    return dict(
        image=image_name,
        questions=PADDED_QUESTIONS,
        input_ids=inputs["input_ids"].tolist(),
        attention_mask=inputs["attention_mask"].tolist(),
        batched_ids=batched,
        batched_texts=[processor.decode(s, skip_special_tokens=True) for s in batched],
        single_ids=single,
        single_texts=[processor.decode(s, skip_special_tokens=True) for s in single],
        equal_per_question=[a == b for a, b in zip(batched, single)],
        batched_equals_single=batched == single,
        first_logits_max_abs_diff=(unmasked - single_logits).abs().amax(dim=1).tolist(),
        masked_decoder_ids=masked,
        masked_decoder_equals_single=masked == single,
        masked_first_logits_max_abs_diff=(masked_logits - single_logits).abs().amax(dim=1).tolist(),
        decoder_ignores_question_mask=bool(torch.equal(unmasked, masked_logits)),
    )


def padded_batch(model, processor, singles):
    """One image, two questions of different lengths, padded into one batch:
    the documented record is for PADDED_IMAGE unless another image shows the
    answers changing, in which case that one; all images are summarised."""
    rows = [padded_row(model, processor, im, singles) for im in VQA_IMAGES]
    changed = [r for r in rows if not r["batched_equals_single"]]
    chosen = changed[0] if changed else next(r for r in rows if r["image"] == PADDED_IMAGE)
    return dict(
        chosen,
        all_images=[
            dict(
                image=r["image"],
                batched_equals_single=r["batched_equals_single"],
                equal_per_question=r["equal_per_question"],
                first_logits_max_abs_diff=r["first_logits_max_abs_diff"],
                masked_decoder_equals_single=r["masked_decoder_equals_single"],
                masked_first_logits_max_abs_diff=r["masked_first_logits_max_abs_diff"],
                decoder_ignores_question_mask=r["decoder_ignores_question_mask"],
            )
            for r in rows
        ],
        note=(
            "transformers' BlipForQuestionAnswering.generate passes an all-ones "
            "encoder_attention_mask to the answer decoder, so a padded question's answer "
            "also attends to the [PAD] positions' question_embeds (the text encoder itself "
            "masks them as keys). first_logits_max_abs_diff compares each padded row's "
            "first-step logits with the unpadded single question's; masked_* is the same "
            "batch with the real attention_mask given to the decoder, which changes nothing "
            "(decoder_ignores_question_mask, bit-identical logits): in transformers 5.23 "
            "BlipTextLayer hands encoder_attention_mask to the cross-attention as "
            "attention_mask, and BlipTextSelfAttention then replaces it with its own "
            "encoder_attention_mask argument, which is None, so BLIP's text cross-attention "
            "is never masked. Each single question is unpadded, so it is unaffected."
        ),
    )


def save_reference(cases, seed, max_length, padded):
    REFERENCE.mkdir(parents=True, exist_ok=True)
    tensors = {}
    records = []
    for i, c in enumerate(cases):
        key = f"case{i}"
        c["key"] = key
        tensors[f"{key}.pixel_values"] = c["pixel_values"].astype(np.float32)
        for t in ("image_embeds", "question_embeds", "first_logits"):
            tensors[f"{key}.{t}"] = c[t].astype(np.float32)
            tensors[f"{key}.{t}_f64"] = c[t + "_f64"].astype(np.float64)
        records.append(
            dict(
                key=key,
                image=c["image"],
                question=c["question"],
                input_ids=c["input_ids"],
                min_margin=c["min_margin"],
                greedy=dict(ids=c["ids"], text=c["text"], stopped_on_sep=c["stopped_on_sep"]),
                beams3=c["beams3"],
            )
        )
    save_file(tensors, str(REFERENCE / f"{NAME}.safetensors"))
    meta = dict(
        model=NAME,
        seed=seed,
        transformers=transformers.__version__,
        torch=torch.__version__,
        min_margin=min(c["min_margin"] for c in cases),
        noise=NOISE,
        max_new_tokens=max_length - 1,
        max_length=max_length,
        beams3_kwargs=BEAMS,
        tensors=dict(
            keys=[c["key"] for c in cases],
            names=[
                "pixel_values",
                "image_embeds",
                "image_embeds_f64",
                "question_embeds",
                "question_embeds_f64",
                "first_logits",
                "first_logits_f64",
            ],
        ),
        cases=records,
        padded_batch=padded,
    )
    (REFERENCE / f"{NAME}.json").write_text(json.dumps(meta, indent=1) + "\n")


def main():
    torch.set_num_threads(2)
    tokenizer = build_tokenizer(MODELS / "_tokenizer")
    image_processor = BlipImageProcessorPil(size={"height": 48, "width": 48})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    check_tokens(processor)

    best = None
    candidates = 0
    # --seed N skips the search (the committed fixtures record their seed).
    seeds = [int(sys.argv[sys.argv.index("--seed") + 1])] if "--seed" in sys.argv else SEEDS
    for seed in seeds:
        model = make_model(seed, tokenizer, processor)
        cases = run_cases(model, processor)
        if not acceptable(cases):
            continue
        model64 = copy.deepcopy(model).double()
        if not check_greedy(model, model64, cases):
            continue
        stable = beam_cases(model, model64, processor, cases)
        candidates += 1
        print(f"seed {seed}: min margin {min(c['min_margin'] for c in cases):.3f}, beams3 stable {stable}/{len(cases)}")
        if best is None or stable > best[0]:
            best = (stable, seed)
        if stable == len(cases) or candidates >= MAX_CANDIDATES:
            break
    if best is None:
        raise SystemExit("no seed gave clear margins")
    seed = best[1]
    model = make_model(seed, tokenizer, processor)
    cases = run_cases(model, processor)

    out = MODELS / NAME
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)

    # Reload from disk, as a user would, and recompute everything from the reload.
    reloaded = BlipForQuestionAnswering.from_pretrained(out).eval()
    reprocessor = BlipProcessor.from_pretrained(out)
    recheck = run_cases(reloaded, reprocessor)
    for a, b in zip(cases, recheck):
        assert a["ids"] == b["ids"] and a["input_ids"] == b["input_ids"], (a["image"], a["question"])
    model64 = copy.deepcopy(reloaded).double()
    assert check_greedy(reloaded, model64, recheck)
    stable = beam_cases(reloaded, model64, reprocessor, recheck)
    add_tensors(reloaded, model64, recheck)
    padded = padded_batch(reloaded, reprocessor, recheck)
    # No max_length/max_new_tokens is configured, so transformers generates at
    # most 20 new tokens after [DEC] (its model-agnostic default).
    assert reloaded.text_decoder.generation_config.max_new_tokens is None
    max_length = 1 + 20
    for c in recheck:
        assert len(c["ids"]) <= max_length and (c["stopped_on_sep"] or len(c["ids"]) == max_length)
    save_reference(recheck, seed, max_length, padded)

    print(f"{NAME}: seed {seed}, min margin {min(c['min_margin'] for c in recheck):.3f}, "
          f"beams3 stable {stable}/{len(recheck)}, max_length {max_length}")
    for c in recheck:
        b = c["beams3"]
        print(
            f"  {c['key']:6} {c['image']:14} {c['question']:27} margin {c['min_margin']:.3f} "
            f"sep={c['stopped_on_sep']!s:5} {c['text']!r}  beams3[{'stable' if b['stable'] else 'UNSTABLE'}] {b['texts'][0]!r}"
        )
    print("padded batch:", json.dumps({k: v for k, v in padded.items() if k != "note"}))


if __name__ == "__main__":
    main()
