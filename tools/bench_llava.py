"""transformers' side of bench/llava.sh: time to first token and decoding
rate of LlavaForConditionalGeneration on a model folder, on the same image
and prompt as `cargo bench --bench llava` (benches/llava.rs).

    python tools/bench_llava.py MODEL_DIR [--dtype bf16] [--rounds 2] [--new-tokens 16] [--threads 2]

Each round times what a user's script does for the first token (the
processor on the decoded image, `model(**inputs)` with a cache, argmax) and
then `--new-tokens` single-token forwards with the cache (greedy), as
`generate` runs them without its bookkeeping. Prints one JSON object.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "tests" / "fixtures" / "images" / "astronaut.jpg"
# benches/llava.rs's PROMPT.
PROMPT = "USER: <image>\nWhat is shown in this picture? ASSISTANT:"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    start = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    load_s = time.perf_counter() - start
    image = Image.open(IMAGE).convert("RGB")
    ttft, rates, prompt_tokens = [], [], 0
    with torch.inference_mode():
        for _ in range(args.rounds):
            start = time.perf_counter()
            inputs = processor(images=image, text=PROMPT, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            prompt_tokens = inputs["input_ids"].shape[1]
            out = model(**inputs, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ttft.append(time.perf_counter() - start)
            past = out.past_key_values
            mask = inputs["attention_mask"]
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
                out = model(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            rates.append(args.new_tokens / (time.perf_counter() - start))
    print(json.dumps({
        "load_s": load_s,
        "prompt_tokens": prompt_tokens,
        "new_tokens": args.new_tokens,
        "ttft_s": ttft,
        "decode_tokens_per_s": rates,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
