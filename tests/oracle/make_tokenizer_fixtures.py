#!/usr/bin/env python3
"""Record tokenizer and chat-template reference ids from HF for phi3-core's parity test.

Run from the repository root (needs `tokenizers`, `transformers` >= 5 and `jinja2`; no torch):

    /root/oracle-venv/bin/python tests/oracle/make_tokenizer_fixtures.py

Reads the real Phi-3 tokenizer from ../shared/phi3-tokenizer/ (never committed) and writes
tests/fixtures/tokenizer/phi3_parity.json, checked by phi3-core/tests/tokenizer_parity.rs.
The fixture holds only our own strings and the ids/text HF produced for them, no tokenizer data.

Reference: transformers' `AutoTokenizer` (for Phi-3: `LlamaTokenizer`, legacy=False), i.e.
`tokenizer(text, add_special_tokens=...)["input_ids"]`, `tokenizer.decode(ids, skip_special_tokens=...)`
and `apply_chat_template(messages, add_generation_prompt=..., tokenize=True)`. transformers 5
rebuilds the Llama pre-tokenizer (Metaspace, prepend_scheme="first", no normalizer), so its ids
differ from `tokenizers.Tokenizer.from_file("tokenizer.json")` (which transformers 4 matched)
around leading spaces and text after special tokens; where they differ, the `tokenizers`
library's ids are recorded as `ids_tokenizers_lib`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import tokenizers
import transformers
from tokenizers import Tokenizer
from transformers import AutoTokenizer

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
TOKENIZER_DIR = os.path.normpath(os.path.join(ROOT, "..", "shared", "phi3-tokenizer"))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "phi3_parity.json")

TEXTS = [
    # empty and whitespace
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    " \t\n ",
    "   \n",
    "\r\nwindows line\r\n",
    # leading / trailing / repeated spaces
    "hello",
    " hello",
    "hello ",
    "  hello  world  ",
    "Hello, world! How are you?",
    "a\nb",
    "line one\n\nline two\n",
    "\ttab\tseparated\tvalues",
    "▁already▁metaspace▁",
    # scripts
    "日本語のテキストです。",
    "中文测试，标点符号！",
    "안녕하세요 세계",
    "Привет, мир",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "café naïve résumé Ünïcödé",
    "a\u0301 combining accent",
    # byte fallback: emoji, rare CJK, math letters, control characters
    "😀",
    " 😀 leading space emoji",
    "👍🏽 family: 👨‍👩‍👧 flag: 🏳️‍🌈",
    "𠀀𪚥 rare ideographs",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ʕ•ᴥ•ʔ Ⅻ ﷺ",
    "nul\u0000 bell\u0007 del\u007f",
    # code, numbers, urls
    "def square(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "3.14159 2718 1,000,000 0x1F -42 1e-9",
    "https://example.com/path?q=1&r=two#frag",
    # special tokens inline (rstrip eats the whitespace after most of them)
    "<|user|>\nhi<|end|>\n<|assistant|>",
    "<|user|> hi <|end|>  bye",
    "<|system|>\nYou are helpful.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>",
    "</s>",
    "x</s> y",
    "<s>text",
    "hi <s> there",
    "<|endoftext|>",
    "end.<|endoftext|> next",
    "<unk>",
    "<|placeholder1|>\t<|placeholder6|>",
    "<|user|",
]

# Id sequences that encode() never produces but decode() and the streaming decoder must handle.
DECODE_IDS = [
    [],
    [1],
    [29871, 243, 162],  # truncated emoji: U+FFFD per byte
    [22172, 243, 162, 155, 131, 150, 22172],  # emoji + stray continuation byte: whole run U+FFFD
    [1, 32010, 22172, 32007, 32001, 2, 32000],
    [29871, 29871, 29871],
    [32007, 29871, 22172],
    [2, 2, 22172, 2],
    [0, 29871, 0],
]

MESSAGES = [
    ("single user", [("user", "Hello!")]),
    ("system dropped by the Phi-3 template", [("system", "You are a pirate."), ("user", "Hi there")]),
    (
        "multi turn",
        [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", " 6 "), ("user", "Thanks")],
    ),
    ("assistant first", [("assistant", "I start."), ("user", "ok")]),
    ("leading and trailing whitespace", [("user", "  spaced out \n"), ("assistant", "\nnewline first")]),
    ("unicode and emoji", [("user", "日本語 😀 café 𠀀")]),
    ("special token text in content", [("user", "say <|end|> and </s> please<|assistant|>")]),
    ("template syntax in content is data", [("user", "{{ 7 * 7 }} {% for x in y %}{% endfor %}")]),
    ("empty content", [("user", "")]),
    ("unknown role dropped", [("tool", "{\"x\": 1}"), ("user", "go")]),
]


def main() -> None:
    if int(transformers.__version__.split(".")[0]) < 5:
        sys.exit(f"transformers >= 5 required (found {transformers.__version__}): the fixture records its ids")
    tok_json = os.path.join(TOKENIZER_DIR, "tokenizer.json")
    if not os.path.isfile(tok_json):
        sys.exit(f"{tok_json} not found")
    hf = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    lib = Tokenizer.from_file(tok_json)

    cases = []
    n_diff = 0
    for text in TEXTS:
        for add_special in (True, False):
            ids = hf(text, add_special_tokens=add_special)["input_ids"]
            assert hf.encode(text, add_special_tokens=add_special) == ids, text
            case = {"text": text, "add_special_tokens": add_special, "ids": ids}
            lib_ids = lib.encode(text, add_special_tokens=add_special).ids
            if lib_ids != ids:
                case["ids_tokenizers_lib"] = lib_ids
                n_diff += 1
            case["decoded"] = hf.decode(ids, skip_special_tokens=False)
            case["decoded_skip_special"] = hf.decode(ids, skip_special_tokens=True)
            # Same decoder in both libraries; the Rust test relies on it.
            assert case["decoded"] == lib.decode(ids, skip_special_tokens=False), text
            assert case["decoded_skip_special"] == lib.decode(ids, skip_special_tokens=True), text
            cases.append(case)

    decode_cases = []
    for ids in DECODE_IDS:
        d = {
            "ids": ids,
            "decoded": hf.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": hf.decode(ids, skip_special_tokens=True),
        }
        assert d["decoded"] == lib.decode(ids, skip_special_tokens=False)
        decode_cases.append(d)

    chat_cases = []
    for name, msgs in MESSAGES:
        messages = [{"role": r, "content": c} for r, c in msgs]
        for agp in (True, False):
            text = hf.apply_chat_template(messages, add_generation_prompt=agp, tokenize=False)
            ids = hf.apply_chat_template(messages, add_generation_prompt=agp, tokenize=True)
            if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            assert ids == hf(text, add_special_tokens=False)["input_ids"], name
            chat_cases.append(
                {"name": name, "messages": messages, "add_generation_prompt": agp, "text": text, "ids": ids}
            )

    with open(tok_json, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    fixture = {
        "about": "Reference ids/text from HF for phi3-core/tests/tokenizer_parity.rs; "
        "made by tests/oracle/make_tokenizer_fixtures.py",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer_json_sha256": sha,
        "vocab_size": len(hf),
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "cases": cases,
        "decode_cases": decode_cases,
        "chat_cases": chat_cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(
        f"wrote {OUT}: {len(cases)} encode cases ({n_diff} differ from the tokenizers library), "
        f"{len(decode_cases)} decode cases, {len(chat_cases)} chat cases, {os.path.getsize(OUT)} bytes"
    )


if __name__ == "__main__":
    main()
