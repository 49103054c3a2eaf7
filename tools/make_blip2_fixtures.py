"""Build the tiny BLIP-2 (OPT) fixture models and record transformers' reference
outputs for them.

Run from the repository root with the pinned versions in tools/requirements.txt
(independently of tools/make_fixtures.py, whose helpers it reuses):

    python tools/make_blip2_fixtures.py [--seed N]

It writes
  tests/fixtures/models/blip2-opt-tiny/          the current checkpoint convention
  tests/fixtures/models/blip2-opt-tiny-legacy/   the older one (same weights)
  tests/fixtures/reference/blip2-opt-tiny.json + .safetensors
with what transformers computes for each (image, prompt) pair. Both folders are
written by save_pretrained, as a user's download would be.

How transformers captions with BLIP-2 (Blip2ForConditionalGeneration.generate):
  image_embeds = vision_model(pixel_values).last_hidden_state      # pre-LN ViT,
                 # then post_layernorm (vision_config.layer_norm_eps, here 1e-5)
  query_output = qformer(query_embeds=query_tokens,                # [1, Q, qformer width]
                         encoder_hidden_states=image_embeds)        # all-ones mask
      # qformer: LayerNorm(query_tokens) (no position embeddings), then per layer:
      # self-attention + LN; cross-attention to image_embeds + LN on layers with
      # layer_idx % cross_attention_frequency == 0 (here 0 and 2); feed-forward
      # `intermediate_query`/`output_query` + LN (post-LN BERT, erf GELU).
  language_model_inputs = language_projection(query_output)        # [1, Q, OPT width]
  input_ids = [<image>] * Q + [</s>] + prompt       (the processor builds it; with
              no prompt generate builds [image_token_index] * Q + [text bos] itself)
  inputs_embeds = embed_tokens(input_ids), with the Q `<image>` rows replaced by
                  language_model_inputs (masked_scatter)
  language_model.generate(inputs_embeds, attention_mask=all ones, input_ids, **kwargs)
It returns input_ids followed by the new tokens; the reference records the new
tokens only, and text = decode(new_ids, skip_special_tokens=True).strip() (what
the model card prints, and what `caption` prints).

Findings (transformers 5.23, also recorded in the JSON's "facts"):
* The generation config used is the language model's, built from text_config
  (bos 2, pad 1, eos = the id of "Ċ", the newline byte: as in the real
  Salesforce/blip2-opt-2.7b, whose text_config eos_token_id is 50118, so
  captions stop at a newline and the newline is the last new token). The
  checkpoint's top-level generation_config.json is loaded into
  model.generation_config but NOT applied: generate() hands everything to
  language_model.generate, whose config comes from text_config (tested below).
* No max length is configured, so transformers allows its model-agnostic default
  of 20 new tokens (max_length = 20 + input length, capped at OPT's
  max_position_embeddings, which no case reaches here).
* OPT positions are cumsum(attention_mask) - 1 + 2 (the learned table has
  max_position_embeddings + 2 rows), over the whole sequence, image slots
  included; q is scaled by head_dim**-0.5 before q.k; the LM head is tied to
  embed_tokens (no bias); word_embed_proj_dim == hidden_size here, so there is
  no project_in/project_out.
* The OPT tokenizer is GPT2Tokenizer (byte-level BPE) in 5.23. `tokenizer(prompt)`
  prepends `</s>` (id 2) through the TemplateProcessing post-processor saved in
  tokenizer.json; the Rust side builds [text bos] + encode(prompt, false), the same
  ids. clean_up_tokenization_spaces is absent from tokenizer_config.json (False),
  and 5.23 ignores it for BPE tokenizers anyway (checked below).
* Blip2Processor.__init__ adds `<image>` as a special token to any tokenizer that
  lacks it (id = len(tokenizer)), also when loading the legacy folder.
* The legacy folder (like Salesforce/blip2-opt-2.7b before image_token_index
  existed: no image_token_index in config.json, no `<image>` in the tokenizer, no
  num_query_tokens in processor_config.json, sharded, untied lm_head) loads in
  5.23, but Blip2ForConditionalGeneration.generate fails on it: with no prompt it
  builds torch.tensor([None] * Q + [bos]) (TypeError), and with input_ids it
  computes `input_ids == None` -> False, then False.unsqueeze (AttributeError).
  The legacy semantics (LAVIS, transformers 4.x) prepend the projected queries to
  embed(`</s>` + prompt) with an all-ones mask, which gives the OPT exactly the
  same embeddings and positions; we prove the generated tokens are identical (the
  legacy folder's own weights, language_model.generate on the concatenation), so
  the current convention's outputs are the reference for both folders.

Random models have flat logits, so as in the other scripts we raise the
initializer range, give biases and LayerNorm affines random values (transformers
zero-initialises them, which would let a forgotten bias go unnoticed; the vision
qkv.bias is a single [3*width] q|k|v tensor, whose k third transformers sets to
zero and we randomise too), set query_tokens (zero-initialised by transformers)
to N(0, 1), and scale the newline token's embedding row (tied to the LM head) so
that some captions stop on it. Seeds are searched until every greedy decision has
a top-1/top-2 margin >= MIN_MARGIN, survives +-NOISE jitter and float64, the
texts vary with image and prompt, and both stop reasons occur; among the first
few such seeds the one with the most stable beams3 cases, then the widest
greedy margin, is kept.
"""

import copy
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    GPT2Tokenizer,
    LogitsProcessorList,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402
    IMAGES,
    MIN_MARGIN,
    MODELS,
    NOISE,
    REFERENCE,
    TEXT_INIT,
    WORDS,
    Jitter,
    strip_padding,
)

NAME = "blip2-opt-tiny"
LEGACY = f"{NAME}-legacy"
BLIP2_IMAGES = ["chelsea.png", "astronaut.jpg", "rocket.jpg", "rgba.png", "wide.png"]
PROMPTS = [
    None,
    "Question: what is in the picture? Answer:",
    "Question: how many shapes are there? Answer:",
    "Question: what is in the picture? Answer: a cat. Question: what color is it? Answer:",
]
NUM_QUERY_TOKENS = 5
IMAGE_SIZE = 28
# transformers' default when nothing is configured (asserted below).
MAX_NEW_TOKENS = 20
BEAMS = dict(num_beams=3)
# Biases and LayerNorm affines: transformers zero-initialises them.
BIAS_STD = 0.3
NORM_STD = 0.2
# The newline (eos) token's embedding row, tied to the LM head, is scaled by this
# so that its logit spreads more and some captions stop on it (cf. SEP_BIAS).
NEWLINE_SCALE = 1.6
SEEDS = range(300)
MAX_CANDIDATES = 6
TOKENIZER_VOCAB = 400

EXTRA_WORDS = """question answer Question: Answer: what color is the how many are there
it this that picture shapes ? . , :""".split()


def corpus():
    """A deterministic caption/question corpus for the BPE trainer."""
    import random

    rng = random.Random(0)
    words = WORDS + EXTRA_WORDS
    lines = []
    for _ in range(400):
        n = rng.randint(3, 10)
        lines.append(" ".join(rng.choice(words) for _ in range(n)) + rng.choice([".", "?", "", ","]) + "\n")
    for p in PROMPTS[1:]:
        lines += [p + " " + rng.choice(WORDS) + "\n" for _ in range(20)]
    return lines


def build_tokenizer() -> GPT2Tokenizer:
    """A GPT-2/OPT-style byte-level BPE tokenizer with a few hundred tokens.

    Special tokens sit at OPT's ids: <s>=0, <pad>=1, </s>=2, <unk>=3. Like OPT's,
    it prepends `</s>` when add_special_tokens=True.
    """
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
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


def blip2_config(tokenizer, image_token_index: int) -> Blip2Config:
    vision = dict(
        hidden_size=24,
        intermediate_size=52,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=IMAGE_SIZE,
        patch_size=7,
        qkv_bias=True,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        initializer_range=TEXT_INIT,
    )
    qformer = dict(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=3,
        intermediate_size=44,
        cross_attention_frequency=2,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        initializer_range=TEXT_INIT,
    )
    text = dict(
        model_type="opt",
        hidden_size=40,
        ffn_dim=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=40,
        do_layer_norm_before=True,
        activation_function="relu",
        vocab_size=len(tokenizer),
        bos_token_id=2,
        pad_token_id=1,
        # As Salesforce/blip2-opt-2.7b: generation stops at a newline.
        eos_token_id=tokenizer.convert_tokens_to_ids("Ċ"),
        tie_word_embeddings=True,
        init_std=TEXT_INIT,
        initializer_range=TEXT_INIT,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_index,
        initializer_range=TEXT_INIT,
    )
    assert config.qformer_config.encoder_hidden_size == 24
    assert config.text_config.vocab_size > image_token_index
    return config


def make_model(seed: int, config: Blip2Config):
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, NORM_STD)
                module.bias.normal_(0.0, NORM_STD)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.bias is not None:
                module.bias.normal_(0.0, BIAS_STD)
        embed = model.language_model.get_input_embeddings().weight
        embed[config.text_config.eos_token_id] *= NEWLINE_SCALE
    assert model.language_model.lm_head.weight is embed
    return model


def case_inputs(processor, image_name: str, prompt, image_token_index: int, bos: int):
    """What the processor gives, and the full input_ids generate works on."""
    image = Image.open(IMAGES / image_name)
    if prompt is None:
        inputs = processor(images=image, return_tensors="pt")
        full = [image_token_index] * NUM_QUERY_TOKENS + [bos]
    else:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        assert inputs["attention_mask"].all()
        full = inputs["input_ids"][0].tolist()
    assert full[:NUM_QUERY_TOKENS] == [image_token_index] * NUM_QUERY_TOKENS
    assert full[NUM_QUERY_TOKENS] == bos and image_token_index not in full[NUM_QUERY_TOKENS:]
    return inputs, full


def generate(model, inputs, dtype=torch.float32, **kwargs):
    extra = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
    return model.generate(pixel_values=inputs["pixel_values"].to(dtype), **extra, **kwargs)


def new_tokens(sequences, n_input, eos):
    out = []
    for seq in sequences:
        seq = strip_padding(seq.tolist(), eos, prompt_len=n_input)
        out.append(seq[n_input:])
    return out


def stable_under_noise(model, c, expected, eos, kwargs) -> bool:
    """The same decision with +-NOISE added to every step's logits (4 draws)."""
    for trial in range(4):
        generator = torch.Generator().manual_seed(trial)
        noisy = generate(model, c["inputs"], logits_processor=LogitsProcessorList([Jitter(generator)]), **kwargs)
        if new_tokens(noisy, len(c["input_ids"]), eos) != expected:
            return False
    return True


# Python's str.strip() also strips \x1c-\x1f, which are not Unicode White_Space
# (Rust's str::trim); a text whose ends differ between the two is rejected.
UNICODE_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + (
    "\u2028\u2029\u202f\u205f\u3000"
)


def decode(tokenizer, ids):
    raw = tokenizer.decode(ids, skip_special_tokens=True)
    return raw, raw.strip()


def greedy_case(model, processor, image_name: str, prompt):
    config = model.config
    eos = config.text_config.eos_token_id
    inputs, full = case_inputs(processor, image_name, prompt, config.image_token_index, config.text_config.bos_token_id)
    out = generate(model, inputs, output_scores=True, return_dict_in_generate=True, do_sample=False, num_beams=1)
    assert out.sequences.shape[0] == 1
    assert out.sequences[0, : len(full)].tolist() == full
    new_ids = new_tokens(out.sequences, len(full), eos)[0]
    margins = []
    for step_scores in out.scores:
        top2 = torch.topk(step_scores[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    stopped = new_ids[-1] == eos
    # Generation stops on the newline id and nowhere else; otherwise at 20 new tokens.
    assert eos not in new_ids[:-1]
    assert stopped or len(new_ids) == MAX_NEW_TOKENS, (len(new_ids), new_ids)
    raw, text = decode(processor.tokenizer, new_ids)
    return dict(
        image=image_name,
        prompt=prompt,
        inputs=inputs,
        input_ids=full,
        prompt_ids=full[NUM_QUERY_TOKENS:],
        new_ids=new_ids,
        raw_text=raw,
        text=text,
        stopped_on_eos=bool(stopped),
        min_margin=min(margins),
        first_scores=out.scores[0][0].clone(),
    )


def run_cases(model, processor):
    return [greedy_case(model, processor, im, p) for im in BLIP2_IMAGES for p in PROMPTS]


def acceptable(cases, image_token_index) -> bool:
    """Clear decisions everywhere; captions depend on both the image and the
    prompt; both ways of ending (newline, 20 tokens) occur."""
    if min(c["min_margin"] for c in cases) < MIN_MARGIN:
        return False
    if any(image_token_index in c["new_ids"] for c in cases):
        return False
    if any(c["raw_text"].strip(UNICODE_WHITE_SPACE) != c["text"] for c in cases):
        return False
    texts = {c["text"] for c in cases}
    if len(texts) < len(cases) // 2:
        return False
    for p in PROMPTS:
        if len({c["text"] for c in cases if c["prompt"] == p}) < 2:
            return False
    for im in BLIP2_IMAGES:
        if len({c["text"] for c in cases if c["image"] == im}) < 2:
            return False
    stops = [c["stopped_on_eos"] for c in cases]
    return any(stops) and not all(stops)


def check_greedy(model, model64, cases) -> bool:
    """Greedy must survive the noise and reproduce in float64."""
    eos = model.config.text_config.eos_token_id
    kwargs = dict(do_sample=False, num_beams=1)
    ok = True
    for c in cases:
        if not stable_under_noise(model, c, [c["new_ids"]], eos, kwargs):
            ok = False
        exact = generate(model64, c["inputs"], dtype=torch.float64, **kwargs)
        if new_tokens(exact, len(c["input_ids"]), eos) != [c["new_ids"]]:
            ok = False
    return ok


def beam_cases(model, model64, processor, cases) -> int:
    eos = model.config.text_config.eos_token_id
    for c in cases:
        n = len(c["input_ids"])
        out = generate(model, c["inputs"], output_scores=True, return_dict_in_generate=True, **BEAMS)
        assert out.sequences.shape[0] == 1 and out.sequences[0, :n].tolist() == c["input_ids"]
        new_ids = new_tokens(out.sequences, n, eos)[0]
        exact = generate(
            model64, c["inputs"], dtype=torch.float64, output_scores=True, return_dict_in_generate=True, **BEAMS
        )
        noise_ok = stable_under_noise(model, c, [new_ids], eos, BEAMS)
        raw, text = decode(processor.tokenizer, new_ids)
        c["beams3"] = dict(
            new_ids=new_ids,
            text=text,
            raw_text=raw,
            stopped_on_eos=new_ids[-1] == eos,
            score=float(out.sequences_scores[0]),
            score_f64=float(exact.sequences_scores[0]),
            stable=bool(noise_ok and new_tokens(exact.sequences, n, eos) == [new_ids]),
        )
    return sum(c["beams3"]["stable"] for c in cases)


def add_tensors(model, model64, cases):
    """pixel_values, image_embeds, query_output, language_model_inputs and the
    first generation step's logits, in float32 and (float64 model) float64."""
    for c in cases:
        inputs = c["inputs"]
        ids = torch.tensor([c["input_ids"]])
        for m, dtype, suffix in ((model, torch.float32, ""), (model64, torch.float64, "_f64")):
            with torch.no_grad():
                pixel_values = inputs["pixel_values"].to(dtype)
                image_embeds = m.vision_model(pixel_values=pixel_values).last_hidden_state
                query_output = m.qformer(
                    query_embeds=m.query_tokens,
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                ).last_hidden_state
                lm_inputs = m.language_projection(query_output)
                features = m.get_image_features(pixel_values=pixel_values)
                torch.testing.assert_close(features.pooler_output, lm_inputs, rtol=0, atol=0)
                logits = m(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            assert image_embeds.dtype == dtype and logits.dtype == dtype
            c["image_embeds" + suffix] = image_embeds[0].numpy()
            c["query_output" + suffix] = query_output[0].numpy()
            c["language_model_inputs" + suffix] = lm_inputs[0].numpy()
            c["first_logits" + suffix] = logits.numpy()
        c["pixel_values"] = inputs["pixel_values"][0].numpy()
        # Greedy's first-step scores are the raw first-step logits (no processors).
        torch.testing.assert_close(torch.tensor(c["first_logits"]), c["first_scores"], rtol=0, atol=1e-4)


def legacy_generate(model, pixel_values, prompt_ids, **kwargs):
    """LAVIS / transformers 4.x: the projected queries prepended to embed(prompt_ids),
    an all-ones mask, and the language model's own generate (new tokens only)."""
    with torch.no_grad():
        queries = model.get_image_features(pixel_values=pixel_values).pooler_output
        ids = torch.tensor([prompt_ids])
        embeds = torch.cat([queries, model.get_input_embeddings()(ids)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
    return out, logits


def write_legacy(model, processor, plain_tokenizer):
    """The same weights in the older convention: no image_token_index, no <image>
    in the tokenizer, no num_query_tokens, sharded safetensors, untied lm_head."""
    out = MODELS / LEGACY
    shutil.rmtree(out, ignore_errors=True)
    config = copy.deepcopy(model.config)
    config.text_config.tie_word_embeddings = False
    untied = Blip2ForConditionalGeneration(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["language_model.lm_head.weight"] = state["language_model.model.decoder.embed_tokens.weight"].clone()
    untied.load_state_dict(state, strict=True)
    assert untied.language_model.lm_head.weight is not untied.language_model.get_input_embeddings().weight
    untied.save_pretrained(out, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "language_model.lm_head.weight" in index["weight_map"]
    assert len(set(index["weight_map"].values())) >= 3
    cfg = json.loads((out / "config.json").read_text())
    del cfg["image_token_index"]
    assert cfg["text_config"]["tie_word_embeddings"] is False
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # processor_config.json as Blip2Processor writes it, without num_query_tokens;
    # the tokenizer without <image> (the processor would add it, so it is saved alone).
    with tempfile.TemporaryDirectory() as tmp:
        Blip2Processor(processor.image_processor, copy.deepcopy(plain_tokenizer)).save_pretrained(tmp)
        pcfg = json.loads((Path(tmp) / "processor_config.json").read_text())
    pcfg.pop("num_query_tokens")
    (out / "processor_config.json").write_text(json.dumps(pcfg, indent=2, sort_keys=True) + "\n")
    plain_tokenizer.save_pretrained(out)
    assert "<image>" not in json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert all(t["content"] != "<image>" for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"])
    return out


def legacy_facts(reference_model, cases):
    """What transformers 5.23 does with the legacy folder, and the proof that the
    legacy semantics give the current convention's tokens."""
    out = MODELS / LEGACY
    facts = {}
    model = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    facts["loads"] = True
    facts["config_image_token_index"] = model.config.image_token_index
    lm = model.language_model
    facts["lm_head_untied"] = lm.lm_head.weight is not lm.get_input_embeddings().weight
    assert facts["lm_head_untied"]
    ref_state = reference_model.state_dict()
    for k, v in model.state_dict().items():
        key = "language_model.model.decoder.embed_tokens.weight" if k == "language_model.lm_head.weight" else k
        assert torch.equal(v, ref_state[key]), k
    facts["same_weights_as_current"] = True
    processor = Blip2Processor.from_pretrained(out)
    facts["processor_num_query_tokens"] = processor.num_query_tokens
    facts["processor_adds_image_token_id"] = processor.tokenizer.convert_tokens_to_ids("<image>")
    image = Image.open(IMAGES / cases[0]["image"])
    prompt = PROMPTS[1]
    legacy_inputs = processor(images=image, text=prompt, return_tensors="pt")
    facts["processor_prompt_input_ids"] = legacy_inputs["input_ids"][0].tolist()
    attempts = {
        "no_prompt": dict(pixel_values=legacy_inputs["pixel_values"]),
        "prompt_from_legacy_processor": dict(legacy_inputs),
    }
    for name, kwargs in attempts.items():
        try:
            model.generate(**kwargs, max_new_tokens=2)
            facts[f"generate_{name}"] = "works"
        except Exception as e:  # noqa: BLE001 - the failure is the fact
            facts[f"generate_{name}"] = f"fails: {type(e).__name__}: {e}"
    # The equivalence: legacy embeddings through the legacy folder's weights.
    max_logit_diff = 0.0
    for c in cases:
        pixel_values = c["inputs"]["pixel_values"]
        if c["prompt"] is not None:
            assert processor.tokenizer(c["prompt"]).input_ids == c["prompt_ids"]
        greedy, logits = legacy_generate(model, pixel_values, c["prompt_ids"], do_sample=False, num_beams=1)
        beams, _ = legacy_generate(model, pixel_values, c["prompt_ids"], **BEAMS)
        eos = model.config.text_config.eos_token_id
        assert new_tokens(greedy, 0, eos) == [c["new_ids"]], (c["image"], c["prompt"])
        assert new_tokens(beams, 0, eos) == [c["beams3"]["new_ids"]], (c["image"], c["prompt"])
        max_logit_diff = max(max_logit_diff, float((logits - torch.tensor(c["first_logits"])).abs().max()))
    facts["legacy_semantics_equal_new_ids"] = True
    facts["legacy_first_logits_max_abs_diff"] = max_logit_diff
    return facts


def generation_config_facts(model, processor, cases):
    """Does generate apply the checkpoint's generation_config.json?"""
    facts = {}
    c = cases[0]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(MODELS / NAME, tmp, dirs_exist_ok=True)
        path = Path(tmp) / "generation_config.json"
        gen = json.loads(path.read_text())
        gen.update(max_new_tokens=3, num_beams=2)
        path.write_text(json.dumps(gen, indent=2))
        reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp).eval()
        assert reloaded.generation_config.max_new_tokens == 3 and reloaded.generation_config.num_beams == 2
        out = generate(reloaded, c["inputs"], output_scores=True, return_dict_in_generate=True)
    new = out.sequences.shape[1] - len(c["input_ids"])
    beam = getattr(out, "sequences_scores", None) is not None
    facts["test"] = (
        "copied the model folder with generation_config.json max_new_tokens=3, num_beams=2, "
        "reloaded, generate(pixel_values) with no generation kwargs"
    )
    facts["top_level_generation_config_loaded"] = True
    facts["new_tokens_generated"] = new
    facts["beam_search_used"] = beam
    facts["top_level_generation_config_applied"] = bool(new == 3 or beam)
    assert not facts["top_level_generation_config_applied"] and out.sequences[0, len(c["input_ids"]) :].tolist() == c["new_ids"]
    lm_gen = model.language_model.generation_config
    facts["language_model_generation_config"] = {
        k: v for k, v in lm_gen.to_diff_dict().items() if k != "transformers_version"
    }
    facts["eos_token_id"] = lm_gen.eos_token_id
    facts["bos_token_id"] = lm_gen.bos_token_id
    facts["pad_token_id"] = lm_gen.pad_token_id
    facts["max_new_tokens_config"] = lm_gen.max_new_tokens
    facts["max_length_config"] = lm_gen.max_length
    facts["note"] = (
        "generate() forwards to language_model.generate, whose generation_config is built "
        "from text_config; the checkpoint's generation_config.json only reaches "
        "model.generation_config, which generate never reads. Default length: max_length 20 "
        "+ input length (capped at max_position_embeddings) = 20 new tokens."
    )
    return facts


def tokenizer_facts(processor, cases):
    """transformers' tokenizer vs the `tokenizers` library on the saved tokenizer.json
    files (what the Rust crate loads): same ids, same decode."""
    facts = {}
    tok = processor.tokenizer
    rust_like = {
        NAME: Tokenizer.from_file(str(MODELS / NAME / "tokenizer.json")),
        LEGACY: Tokenizer.from_file(str(MODELS / LEGACY / "tokenizer.json")),
    }
    legacy_tok = GPT2Tokenizer.from_pretrained(MODELS / LEGACY)
    for p in PROMPTS[1:]:
        plain = tok(p, add_special_tokens=False).input_ids
        full = tok(p).input_ids
        assert full == [2] + plain
        assert legacy_tok(p).input_ids == full
        for name, t in rust_like.items():
            assert t.encode(p, add_special_tokens=False).ids == plain, name
            assert t.encode(p).ids == full, name
    sequences = []
    for c in cases:
        sequences += [c["new_ids"], c["beams3"]["new_ids"], c["prompt_ids"]]
    for ids in sequences:
        expected = tok.decode(ids, skip_special_tokens=True)
        assert legacy_tok.decode(ids, skip_special_tokens=True) == expected
        for name, t in rust_like.items():
            assert t.decode(ids, skip_special_tokens=True) == expected, (name, ids)
    for c in cases:
        expected = tok.decode(c["input_ids"], skip_special_tokens=True)
        assert rust_like[NAME].decode(c["input_ids"], skip_special_tokens=True) == expected
    cfg = json.loads((MODELS / NAME / "tokenizer_config.json").read_text())
    facts["tokenizer_class"] = type(tok).__name__
    facts["prepends_eos_as_bos"] = True
    facts["tokenizer_json_post_processor"] = json.loads((MODELS / NAME / "tokenizer.json").read_text())[
        "post_processor"
    ]["type"]
    facts["clean_up_tokenization_spaces_in_tokenizer_config"] = cfg.get("clean_up_tokenization_spaces", "absent")
    facts["clean_up_tokenization_spaces_effective"] = tok.clean_up_tokenization_spaces
    # With clean-up requested, 5.23 still skips it for BPE tokenizers.
    probe = "a cat . is it ? yes , it is"
    ids = tok(probe, add_special_tokens=False).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forced = tok.decode(ids, clean_up_tokenization_spaces=True)
    facts["clean_up_true_ignored_for_bpe"] = forced == probe
    assert facts["clean_up_true_ignored_for_bpe"]
    facts["checked"] = (
        "tokenizers.Tokenizer.from_file(tokenizer.json) of both folders: encode(prompt, "
        "add_special_tokens=False) and encode(prompt) ids equal transformers'; decode(ids, "
        "skip_special_tokens=True) equals transformers' for every recorded sequence"
    )
    facts["legacy_tokenizer_has_image_token"] = "<image>" in legacy_tok.get_vocab()
    facts["special_ids"] = {t: tok.convert_tokens_to_ids(t) for t in ["<s>", "<pad>", "</s>", "<unk>", "<image>"]}
    facts["newline_token"] = "Ċ"
    facts["vocab_size_with_image"] = len(tok)
    return facts


def save_reference(model, cases, seed, facts, generation_facts, prompt_records):
    REFERENCE.mkdir(parents=True, exist_ok=True)
    tensors = {}
    records = []
    for i, c in enumerate(cases):
        key = f"case{i}"
        c["key"] = key
        tensors[f"{key}.pixel_values"] = c["pixel_values"].astype(np.float32)
        for t in ("image_embeds", "query_output", "language_model_inputs", "first_logits"):
            tensors[f"{key}.{t}"] = c[t].astype(np.float32)
            tensors[f"{key}.{t}_f64"] = c[t + "_f64"].astype(np.float64)
        records.append(
            dict(
                key=key,
                image=c["image"],
                prompt=c["prompt"],
                input_ids=c["input_ids"],
                prompt_ids=c["prompt_ids"],
                greedy=dict(
                    new_ids=c["new_ids"],
                    text=c["text"],
                    raw_text=c["raw_text"],
                    stopped_on_eos=c["stopped_on_eos"],
                    min_margin=c["min_margin"],
                ),
                beams3=c["beams3"],
            )
        )
    save_file(tensors, str(REFERENCE / f"{NAME}.safetensors"))
    text = model.config.text_config
    meta = dict(
        model=NAME,
        legacy_model=LEGACY,
        seed=seed,
        transformers=transformers.__version__,
        torch=torch.__version__,
        min_margin=min(c["min_margin"] for c in cases),
        noise=NOISE,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=text.eos_token_id,
        bos_token_id=text.bos_token_id,
        pad_token_id=text.pad_token_id,
        image_token_index=model.config.image_token_index,
        num_query_tokens=model.config.num_query_tokens,
        beams3_kwargs=BEAMS,
        tensors=dict(
            keys=[c["key"] for c in cases],
            names=[
                "pixel_values",
                "image_embeds",
                "image_embeds_f64",
                "query_output",
                "query_output_f64",
                "language_model_inputs",
                "language_model_inputs_f64",
                "first_logits",
                "first_logits_f64",
            ],
        ),
        prompts=prompt_records,
        facts=facts,
        generation_facts=generation_facts,
        cases=records,
    )
    (REFERENCE / f"{NAME}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def main():
    # One intra-op thread: every op here is far below torch's parallel grain size,
    # so results do not depend on it, and on a busy 2-core machine OpenMP's
    # barriers made 2 threads ~40x slower.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Using the model-agnostic default")
    plain = build_tokenizer()
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    assert image_processor.resample == 3 and image_processor.do_convert_rgb
    processor = Blip2Processor(image_processor, copy.deepcopy(plain), num_query_tokens=NUM_QUERY_TOKENS)
    image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_token_index == len(plain) == len(processor.tokenizer) - 1
    config = blip2_config(processor.tokenizer, image_token_index)
    unk = processor.tokenizer.unk_token_id
    for p in PROMPTS[1:]:
        assert unk not in processor.tokenizer(p).input_ids
        n_input = NUM_QUERY_TOKENS + len(processor.tokenizer(p).input_ids)
        # The default max_length (20 + input) is capped at max_position_embeddings.
        assert n_input + MAX_NEW_TOKENS <= config.text_config.max_position_embeddings

    best = None
    candidates = 0
    seeds = [int(sys.argv[sys.argv.index("--seed") + 1])] if "--seed" in sys.argv else SEEDS
    for seed in seeds:
        model = make_model(seed, config)
        cases = run_cases(model, processor)
        if not acceptable(cases, image_token_index):
            continue
        model64 = copy.deepcopy(model).double()
        if not check_greedy(model, model64, cases):
            print(f"seed {seed}: greedy not stable")
            continue
        stable = beam_cases(model, model64, processor, cases)
        candidates += 1
        print(f"seed {seed}: min margin {min(c['min_margin'] for c in cases):.3f}, beams3 stable {stable}/{len(cases)}")
        # The most stable beams first, then the widest greedy margin.
        rank = (stable, min(c["min_margin"] for c in cases))
        if best is None or rank > best[0]:
            best = (rank, seed)
        if candidates >= MAX_CANDIDATES:
            break
    if best is None:
        raise SystemExit("no seed gave clear margins")
    seed = best[1]
    model = make_model(seed, config)
    cases = run_cases(model, processor)

    out = MODELS / NAME
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "language_model.lm_head.weight" not in f.keys()
    assert json.loads((out / "config.json").read_text())["text_config"]["tie_word_embeddings"] is True

    # Reload from disk, as a user would, and recompute everything from the reload.
    reloaded = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    reprocessor = Blip2Processor.from_pretrained(out)
    assert reloaded.language_model.lm_head.weight is reloaded.language_model.get_input_embeddings().weight
    assert reprocessor.num_query_tokens == NUM_QUERY_TOKENS
    assert reprocessor.tokenizer.convert_tokens_to_ids("<image>") == image_token_index
    recheck = run_cases(reloaded, reprocessor)
    for a, b in zip(cases, recheck):
        assert a["new_ids"] == b["new_ids"] and a["input_ids"] == b["input_ids"], (a["image"], a["prompt"])
    model64 = copy.deepcopy(reloaded).double()
    assert check_greedy(reloaded, model64, recheck)
    stable = beam_cases(reloaded, model64, reprocessor, recheck)
    add_tensors(reloaded, model64, recheck)
    lm_gen = reloaded.language_model.generation_config
    # Nothing configured: generate falls back to its model-agnostic max_length of 20.
    assert lm_gen.max_new_tokens is None and lm_gen.max_length in (None, MAX_NEW_TOKENS)
    assert max(len(c["new_ids"]) for c in recheck) == MAX_NEW_TOKENS

    write_legacy(reloaded, reprocessor, plain)
    facts = {"legacy": legacy_facts(reloaded, recheck)}
    facts["tokenizer"] = tokenizer_facts(reprocessor, recheck)
    facts["notes"] = [
        "generate(): input_ids = [<image>]*num_query_tokens + [</s>] + prompt; the <image> rows "
        "of embed(input_ids) are replaced by language_projection(qformer(query_tokens, image_embeds)); "
        "all-ones attention mask; language_model.generate does the rest and returns input_ids + new tokens.",
        "text = tokenizer.decode(new_ids, skip_special_tokens=True).strip(); raw_text is before strip "
        "(a caption stopped on eos ends with its newline).",
        "Every recorded text's Python strip() equals a strip of Unicode White_Space (Rust's trim()).",
        "Biases and LayerNorm affines are random (transformers would zero them), including the k third "
        "of the vision qkv.bias; query_tokens ~ N(0,1).",
        "first_logits: language model logits at the last input position for the full input "
        "(equal to greedy's first-step scores).",
        "Greedy ids are identical in float64 (deepcopy(model).double()) and under +-noise jitter.",
        "Seed search: Python threads set to 1 (results independent of it for ops this small).",
    ]
    facts["max_new_tokens"] = (
        "not configured anywhere: transformers' default max_length 20 becomes 20 + input length "
        "(capped at text_config.max_position_embeddings=64, not reached), i.e. 20 new tokens"
    )
    gen_facts = generation_config_facts(reloaded, reprocessor, recheck)
    prompt_records = [
        dict(
            prompt=p,
            input_ids=reprocessor.tokenizer(p).input_ids,
            input_ids_no_special_tokens=reprocessor.tokenizer(p, add_special_tokens=False).input_ids,
            tokens=reprocessor.tokenizer.convert_ids_to_tokens(reprocessor.tokenizer(p).input_ids),
        )
        for p in PROMPTS[1:]
    ]
    for c in recheck:
        if c["prompt"] is not None:
            assert c["prompt_ids"] == reprocessor.tokenizer(c["prompt"]).input_ids
    save_reference(reloaded, recheck, seed, facts, gen_facts, prompt_records)

    print(
        f"{NAME}: seed {seed}, min margin {min(c['min_margin'] for c in recheck):.3f}, "
        f"beams3 stable {stable}/{len(recheck)}, eos stops {sum(c['stopped_on_eos'] for c in recheck)}"
    )
    short = {None: "-", PROMPTS[1]: "what", PROMPTS[2]: "shapes", PROMPTS[3]: "chat"}
    for c in recheck:
        b = c["beams3"]
        print(
            f"  {c['key']:6} {c['image']:13} {short[c['prompt']]:6} margin {c['min_margin']:7.3f} "
            f"eos={c['stopped_on_eos']!s:5} n={len(c['new_ids']):2} {c['text']!r}  "
            f"beams3[{'stable' if b['stable'] else 'UNSTABLE'}] {b['text']!r}"
        )


if __name__ == "__main__":
    main()
