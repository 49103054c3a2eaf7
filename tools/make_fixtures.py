"""Build the tiny BLIP fixture models and record transformers' reference outputs.

Run from the repository root with the pinned versions in tools/requirements.txt:

    python tools/make_fixtures.py

It writes tests/fixtures/models/<name>/ (each a model folder in the Hugging Face
layout, written by save_pretrained exactly as a user's download would be) and
tests/fixtures/reference/<name>.json + <name>.safetensors with what transformers
computes on the committed test images. The Rust parity tests load the models
through the same code path as `caption --model DIR` and compare.

Random models have flat logits, so greedy decoding would be decided by float
noise. We raise `initializer_range` and try seeds until the top-1/top-2 margin of
the processed logits stays above MIN_MARGIN at every decoding step of every
recorded case; the smallest margin is written next to the outputs.
"""

import copy
import json
import sys
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    BertTokenizerFast,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
IMAGES = FIXTURES / "images"
MODELS = FIXTURES / "models"
REFERENCE = FIXTURES / "reference"

# Margins far above f32 noise (the Rust logits match to ~1e-5), so a
# different argmax can only come from a real bug.
MIN_MARGIN = 0.01
# Large weights spread the logits (std about 10), so top-1/top-2 ties are rare.
TEXT_INIT = 1.5
SEP_BIAS = 6.0
PROMPTS = [None, "a picture of"]
CAPTION_IMAGES = [
    "astronaut.jpg",
    "chelsea.png",
    "coffee.jpg",
    "rocket.jpg",
    "camera_gray.png",
    "rgba.png",
    "palette.png",
    "one_pixel.png",
    "wide.png",
]

WORDS = """a an the of on in at with and to is are two three one man woman dog cat
picture photo image close up view small large big red blue green white black yellow
orange brown gray pink purple sitting standing lying sleeping couch table bed floor
grass street road car bus train plane sky cloud water sea beach mountain tree flower
cup coffee plate food rocket space astronaut suit flag person people child group
holding wearing looking playing next front top side background old young tall short
building house room window door wall light dark night day sun moon snow rain field
""".split()


def build_tokenizer(path: Path) -> BertTokenizerFast:
    """A BERT-style WordPiece tokenizer with a small vocabulary.

    Special ids are deliberately not BERT's (101/102/30522) so the Rust side
    cannot get away with hard-coding them: they must come from the config.
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = specials + chars + ["##" + c for c in chars] + sorted(set(WORDS))
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
    fast = BertTokenizerFast(
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
    return fast


def tiny_config(tokenizer, image_size: int) -> BlipConfig:
    # Odd sizes (nothing is a power of two or a BLIP size) so no dimension can be hard-coded.
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=36,
        encoder_hidden_size=40,
        intermediate_size=76,
        num_hidden_layers=2,
        num_attention_heads=3,
        max_position_embeddings=48,
        initializer_range=TEXT_INIT,
        bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        eos_token_id=tokenizer.convert_tokens_to_ids("[CLS]"),
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )
    vision = dict(
        hidden_size=40,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        initializer_range=0.5,
    )
    return BlipConfig(text_config=text, vision_config=vision, initializer_range=TEXT_INIT)


def greedy_case(model, processor, image: Image.Image, prompt):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    pixel_values = inputs["pixel_values"]
    kwargs = {}
    if prompt is not None:
        kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    out = model.generate(
        pixel_values=pixel_values,
        output_scores=True,
        return_dict_in_generate=True,
        do_sample=False,
        num_beams=1,
        **kwargs,
    )
    ids = out.sequences[0].tolist()
    margins = []
    for step_scores in out.scores:
        top2 = torch.topk(step_scores[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        if prompt is None:
            prefix = torch.tensor([[model.config.text_config.bos_token_id]])
        else:
            prefix = inputs["input_ids"].clone()
            prefix[:, 0] = model.config.text_config.bos_token_id
            prefix = prefix[:, :-1]
        logits = model.text_decoder(input_ids=prefix, encoder_hidden_states=image_embeds).logits[0, -1]
    return dict(
        prefix=prefix[0].tolist(),
        pixel_values=pixel_values[0].numpy(),
        image_embeds=image_embeds[0].numpy(),
        first_logits=logits.numpy(),
        ids=ids,
        text=processor.decode(ids, skip_special_tokens=True),
        min_margin=min(margins),
        stopped_on_sep=ids[-1] == model.config.text_config.sep_token_id,
    )


def add_float64_reference(model, cases):
    """The same image_embeds and first-step logits computed in float64.

    torch's own f32 results carry rounding error (on these random models, up to
    ~1e-2 on the prompt path's logits); the float64 values let the Rust tests
    check the arithmetic itself to ~1e-9 and compare f32 errors fairly.
    """
    exact = copy.deepcopy(model).double()
    bos = model.config.text_config.bos_token_id
    for case in cases:
        with torch.no_grad():
            pixel_values = torch.tensor(case["pixel_values"]).double()[None]
            image_embeds = exact.vision_model(pixel_values=pixel_values).last_hidden_state
            prefix = torch.tensor([case["prefix"]])
            logits = exact.text_decoder(input_ids=prefix, encoder_hidden_states=image_embeds).logits[0, -1]
        case["image_embeds_f64"] = image_embeds[0].numpy()
        case["first_logits_f64"] = logits.numpy()
    assert bos is not None


def run_cases(model, processor):
    cases = []
    for name in CAPTION_IMAGES:
        image = Image.open(IMAGES / name)
        for prompt in PROMPTS:
            case = greedy_case(model, processor, image, prompt)
            case["image"] = name
            case["prompt"] = prompt
            cases.append(case)
    return cases


def acceptable(cases) -> bool:
    """A seed is usable when every decision is clear, and the cases are varied."""
    if min(c["min_margin"] for c in cases) < MIN_MARGIN:
        return False
    texts = {c["text"] for c in cases}
    stops = [c["stopped_on_sep"] for c in cases]
    # Outputs must depend on the image, and both ways of ending (SEP, max length) must occur.
    return len(texts) >= len(cases) // 2 and any(stops) and not all(stops)


def make_model(seed: int, tokenizer, processor):
    torch.manual_seed(seed)
    config = tiny_config(tokenizer, image_size=processor.image_processor.size["height"])
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random models almost never choose [SEP]; lift its output bias so some
        # captions end early and the stop condition is exercised.
        model.text_decoder.cls.predictions.bias[config.text_config.sep_token_id] += SEP_BIAS
    return model


def save_reference(name: str, model, cases, seed: int):
    REFERENCE.mkdir(parents=True, exist_ok=True)
    tensors = {}
    records = []
    for i, case in enumerate(cases):
        key = f"case{i}"
        tensors[f"{key}.pixel_values"] = case["pixel_values"].astype(np.float32)
        tensors[f"{key}.image_embeds"] = case["image_embeds"].astype(np.float32)
        tensors[f"{key}.first_logits"] = case["first_logits"].astype(np.float32)
        tensors[f"{key}.image_embeds_f64"] = case["image_embeds_f64"]
        tensors[f"{key}.first_logits_f64"] = case["first_logits_f64"]
        records.append(
            dict(
                key=key,
                image=case["image"],
                prompt=case["prompt"],
                ids=case["ids"],
                text=case["text"],
                min_margin=case["min_margin"],
                stopped_on_sep=case["stopped_on_sep"],
                legacy_text=case["legacy_text"],
            )
        )
    save_file(tensors, str(REFERENCE / f"{name}.safetensors"))
    meta = dict(
        model=name,
        seed=seed,
        transformers=transformers.__version__,
        torch=torch.__version__,
        min_margin=min(c["min_margin"] for c in cases),
        cases=records,
    )
    (REFERENCE / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")


def write_variants(model, processor, name: str):
    """The same weights in the other on-disk layouts users meet."""
    base = MODELS / name
    # Sharded safetensors with an index, as large checkpoints are published.
    sharded = MODELS / f"{name}-sharded"
    shutil.rmtree(sharded, ignore_errors=True)
    model.save_pretrained(sharded, max_shard_size="100KB")
    processor.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    # An old-style pytorch_model.bin with the tied LM head stored explicitly
    # (as Salesforce/blip-image-captioning-base has on main), and the old
    # `"size": N` form of preprocessor_config.json.
    legacy = MODELS / f"{name}-bin"
    shutil.rmtree(legacy, ignore_errors=True)
    legacy.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["text_decoder.cls.predictions.decoder.weight"] = state[
        "text_decoder.bert.embeddings.word_embeddings.weight"
    ].clone()
    torch.save(state, legacy / "pytorch_model.bin")
    for f in ["config.json", "tokenizer.json"]:
        shutil.copy(base / f, legacy / f)
    # Old checkpoints keep the image processor in preprocessor_config.json (not
    # transformers 5's processor_config.json) with the scalar `"size": N` form.
    pre = json.loads((base / "processor_config.json").read_text())["image_processor"]
    pre["size"] = pre["size"]["height"]
    (legacy / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    # ...and ask for transformers' WordPiece space clean-up on decode.
    tok = json.loads((base / "tokenizer_config.json").read_text())
    tok["clean_up_tokenization_spaces"] = True
    (legacy / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")


def legacy_texts(name: str, cases):
    """What transformers prints for the reference ids with the legacy folder's tokenizer."""
    processor = BlipProcessor.from_pretrained(MODELS / f"{name}-bin")
    return [processor.decode(c["ids"], skip_special_tokens=True) for c in cases]


# Decoding settings whose transformers output the Rust engine must reproduce
# (issue: beam search, sampling controls). Name -> generate() kwargs.
GENERATION_SETTINGS = {
    "beams3": dict(num_beams=3),
    "beams5": dict(num_beams=5),
    "beams3_lp0.5": dict(num_beams=3, length_penalty=0.5),
    "beams3_lp2.0": dict(num_beams=3, length_penalty=2.0),
    "beams3_early_true": dict(num_beams=3, early_stopping=True),
    "beams3_early_never": dict(num_beams=3, early_stopping="never"),
    "beams3_return2": dict(num_beams=3, num_return_sequences=2),
    "beams4_lp0.5_never_return3": dict(num_beams=4, length_penalty=0.5, early_stopping="never", num_return_sequences=3),
    "greedy_repetition1.5": dict(repetition_penalty=1.5),
    "greedy_ngram2": dict(no_repeat_ngram_size=2),
    "beams3_ngram2": dict(num_beams=3, no_repeat_ngram_size=2),
    "beams3_repetition1.5": dict(num_beams=3, repetition_penalty=1.5),
    "greedy_min_new12": dict(min_new_tokens=12),
    "beams3_min_new12_max16": dict(num_beams=3, min_new_tokens=12, max_new_tokens=16),
    "greedy_max5": dict(max_new_tokens=5),
    # Length penalties below 1 favour short hypotheses, so EOS-finished beams
    # exist early and the stopping rules (heuristic, True, "never") decide.
    "beams3_lp0.5_early_true": dict(num_beams=3, length_penalty=0.5, early_stopping=True),
    "beams3_lp0.5_early_never": dict(num_beams=3, length_penalty=0.5, early_stopping="never"),
    "beams5_lp0.5": dict(num_beams=5, length_penalty=0.5),
    "beams3_lp0.5_return2": dict(num_beams=3, length_penalty=0.5, num_return_sequences=2),
    "beams4_lp0.0": dict(num_beams=4, length_penalty=0.0),
    "beams4_lp0.0_early_true": dict(num_beams=4, length_penalty=0.0, early_stopping=True),
    "beams2_lp0.5_max8": dict(num_beams=2, length_penalty=0.5, max_new_tokens=8),
}
GENERATION_IMAGES = ["astronaut.jpg", "chelsea.png", "rocket.jpg", "rgba.png", "one_pixel.png", "wide.png"]
NOISE = 1e-3


class Jitter:
    """A logits processor that adds uniform noise of +-NOISE: a decision that
    survives it is not a near-tie that float error could flip."""

    def __init__(self, generator):
        self.generator = generator

    def __call__(self, input_ids, scores):
        noise = (torch.rand(scores.shape, generator=self.generator) * 2 - 1) * NOISE
        return scores + noise


def record_generation(name: str, model, processor, cases):
    """transformers' outputs for each decoding setting, from the image_embeds
    recorded in cases (so JPEG decoding plays no part)."""
    from transformers import LogitsProcessorList

    # The key each prompt-less case's tensors are saved under (see save_reference).
    embeds_of = {c["image"]: (f"case{i}", c) for i, c in enumerate(cases) if c["prompt"] is None}
    # The same model in float64: its beam scores are what float32 approximates,
    # so a test can hold ours to the accuracy of transformers' own.
    model64 = copy.deepcopy(model).double()
    records = []
    for setting, kwargs in GENERATION_SETTINGS.items():
        for image in GENERATION_IMAGES:
            key, case = embeds_of[image]
            pixel_values = torch.tensor(case["pixel_values"])[None]
            out = model.generate(
                pixel_values=pixel_values,
                output_scores=True,
                return_dict_in_generate=True,
                **kwargs,
            )
            sequences = [seq.tolist() for seq in out.sequences]
            eos = model.config.text_config.sep_token_id
            sequences = [strip_padding(seq, eos) for seq in sequences]
            stable = True
            for trial in range(4):
                generator = torch.Generator().manual_seed(trial)
                noisy = model.generate(
                    pixel_values=pixel_values,
                    logits_processor=LogitsProcessorList([Jitter(generator)]),
                    **kwargs,
                )
                if [strip_padding(seq.tolist(), eos) for seq in noisy] != sequences:
                    stable = False
            exact = model64.generate(
                pixel_values=pixel_values.double(), output_scores=True, return_dict_in_generate=True, **kwargs
            )
            if [strip_padding(seq.tolist(), eos) for seq in exact.sequences] != sequences:
                stable = False
            beam = getattr(out, "sequences_scores", None) is not None
            scores = out.sequences_scores.tolist() if beam else None
            scores_f64 = exact.sequences_scores.tolist() if beam else None
            records.append(
                dict(
                    setting=setting,
                    kwargs=kwargs,
                    image=image,
                    embeds_key=key,
                    sequences=sequences,
                    texts=[processor.decode(seq, skip_special_tokens=True) for seq in sequences],
                    scores=scores,
                    scores_f64=scores_f64,
                    stable_under_noise=stable,
                )
            )
    kept = [r for r in records if r["stable_under_noise"]]
    print(f"generation cases: {len(kept)} of {len(records)} stable under +-{NOISE} noise and in float64")
    meta = dict(noise=NOISE, transformers=transformers.__version__, cases=kept)
    (REFERENCE / f"{name}-generate.json").write_text(json.dumps(meta, indent=1) + "\n")


def strip_padding(seq, eos, prompt_len=1):
    """transformers pads the shorter sequences it returns together (with the
    pad id, or EOS where the decoder has none); a sequence ends at its first
    EOS after the prompt."""
    for i in range(prompt_len, len(seq)):
        if seq[i] == eos:
            return seq[: i + 1]
    return seq


def main():
    torch.set_num_threads(2)
    work = MODELS / "_tokenizer"
    tokenizer = build_tokenizer(work)
    image_processor = BlipImageProcessorPil(size={"height": 48, "width": 48})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    name = "blip-tiny"
    if "--generation-only" in sys.argv:
        # Decoding references for the committed model, without rebuilding it.
        model = BlipForConditionalGeneration.from_pretrained(MODELS / name).eval()
        processor = BlipProcessor.from_pretrained(MODELS / name)
        record_generation(name, model, processor, run_cases(model, processor))
        return
    for seed in range(200):
        model = make_model(seed, tokenizer, processor)
        cases = run_cases(model, processor)
        if acceptable(cases):
            break
    else:
        raise SystemExit("no seed gave clear margins")
    print(f"{name}: seed {seed}, min margin {min(c['min_margin'] for c in cases):.3f}")

    out = MODELS / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)

    # Reload from disk, as a user would, and check the reload reproduces the outputs.
    reloaded = BlipForConditionalGeneration.from_pretrained(out).eval()
    reprocessor = BlipProcessor.from_pretrained(out)
    recheck = run_cases(reloaded, reprocessor)
    for a, b in zip(cases, recheck):
        assert a["ids"] == b["ids"], (a["image"], a["prompt"])
    write_variants(reloaded, reprocessor, name)
    for case, text in zip(recheck, legacy_texts(name, recheck)):
        case["legacy_text"] = text
    add_float64_reference(reloaded, recheck)
    save_reference(name, reloaded, recheck, seed)
    record_generation(name, reloaded, reprocessor, recheck)
    for case in recheck:
        print(f"  {case['image']:16} {str(case['prompt']):14} margin {case['min_margin']:.3f}  {case['text']!r}")


if __name__ == "__main__":
    main()
