"""A small random Llama and a tokenizer trained offline, saved as a Hugging Face model directory that vLLM serves.

Why: tests and the serving benchmark need a real model behind a real vLLM server on machines without downloads.
Weights are random but fixed by a seed, so greedy outputs are deterministic and depend on the whole context;
the tokenizer is a byte-level BPE trained on generated text, with a chat template that renders system prompts,
tool definitions, tool calls, tool results and reasoning the way agent clients send them.

Run with the Python of an environment that has ``transformers`` and ``tokenizers`` (vLLM's):
``python -m kvtier.testing.tiny_model OUT_DIR [--layers 2 --hidden 256 --heads 4 --kv-heads 2]``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# A chat template in the shape agent clients need: tools first (JSON), then each turn. Appending a turn only
# appends text, so turn N's prompt is a prefix of turn N+1's (what prefix caching and kvtier rely on).
CHAT_TEMPLATE = (
    "{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] %}{% for p in m['content'] %}{{ p.get('text', '') }}{% endfor %}{% endif %}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<call>{{ c['function']['name'] }} "
    "{{ c['function']['arguments'] }}</call>{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|tools|>"]
WORDS = ("def class return import from self if else for while try except with as yield async await lambda "
         "file path read write edit grep bash test assert error value list dict tuple int str bytes none true "
         "false the a to of and in is it that this function call result output tool agent model cache kv block "
         "token session prompt system user assistant reasoning think plan step fix bug patch diff line").split()


def corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 24))]
        if rng.random() < 0.3:
            words.append(f"{rng.randint(0, 99999)}")
        lines.append(" ".join(words) + rng.choice([".", ":", "()", " {", "}", ",", "\n"]))
    return lines


def build(out: Path, *, layers: int = 2, hidden: int = 256, heads: int = 4, kv_heads: int = 2, vocab: int = 2048,
          max_len: int = 16384, seed: int = 0) -> Path:
    """Write the model directory (config, safetensors weights, tokenizer, chat template) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(4000, seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|eos|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_len, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, tie_word_embeddings=False, torch_dtype="bfloat16",
                         initializer_range=0.1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wide logit margins: greedy tokens do not flip on rounding between kernels
        model.lm_head.weight.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / "kvtier_tiny_model.json").write_text(json.dumps(
        {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "seed": seed}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(build(a.out, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, max_len=a.max_len,
                seed=a.seed))


if __name__ == "__main__":
    main()
