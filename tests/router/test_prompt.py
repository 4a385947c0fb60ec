"""The router renders chat templates as the workers do (Hugging Face ``apply_chat_template`` semantics)."""

import json

from kvtier.router.prompt import PromptHasher


def test_chat_template_renders_tools_like_hugging_face_and_reads_chat_template_jinja(tmp_path):
    """Jinja's own ``tojson`` sorts keys and escapes ``<>&'``; workers' does neither, and transformers >= 4.43
    keeps the template in ``chat_template.jinja``. Either difference would make every routed key miss."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(
        "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{% if loop.index > 5 %}{% break %}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "grep", "description": "a <b> & 'c'"}}]
    hasher = PromptHasher(4, str(tmp_path))
    messages = [{"role": "user", "content": "hi"}]
    assert hasher._render(messages, tools) == json.dumps(tools, ensure_ascii=False) + "<user>hi"
