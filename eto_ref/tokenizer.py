"""Tokenizer and chat templates: a conversation -> token ids + the agent-token mask.

`render(messages)` returns `(ids, mask)` where `mask[i]` is True exactly on the
tokens of assistant turns: their content and the turn's end token (`</s>`,
`<|eot_id|>`, `<|im_end|>`), so the agent learns to stop. Everything else
(system, instruction, observations, role headers, BOS) is False: never trained
on, never scored. This mask is what the BC and DPO losses read.

A rendering is the concatenation of per-message *segments*, each tokenized on
its own (special tokens inserted by id, never by tokenizing their text). So a
conversation can grow turn by turn -- the agent appends an observation segment
and the next assistant header to its KV cache -- and `render(messages[:k])` is
always an exact prefix of `render(messages)`.

Templates (one rendered example each):

    chatml (Qwen2, and the built-in tiny model)
        <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
                                                           ^^^^^^^^^^^^^^^^^^ mask
    llama-3
        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\nHello<|eot_id|>
                                                        ^^^^^^^^^^^^^^^^ mask
    llama-2 (FastChat's "llama-2" conversation, as the official ETO code trains it)
        <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\nHi [/INST] Hello </s><s>[INST] ...
                                                        ^^^^^^^^^^^ mask
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

TEMPLATES = ("llama-2", "llama-3", "chatml")
TEMPLATE_SPECIALS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama-2": ["<s>", "</s>", "<unk>"],
    "llama-3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama-2": "</s>", "llama-3": "<|eot_id|>"}
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def detect_template(vocab: dict) -> str:
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama-3"
    if "<|im_start|>" in vocab:
        return "chatml"
    return "llama-2"


class Tokenizer:
    """A `tokenizer.json` plus one chat template."""

    def __init__(self, hf: HFTokenizer, template: str, config: dict | None = None, source: str = "tokenizer"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
        self.hf, self.template, self.source = hf, template, source
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        config = config or {}
        self.special = {}
        for name in TEMPLATE_SPECIALS[template]:
            token_id = hf.token_to_id(name)
            if token_id is None and name not in ("<unk>", "<|endoftext|>", "<|end_of_text|>"):
                raise ValueError(f"{source}: chat template {template!r} needs special token {name!r}, "
                                 "which is not in the vocabulary")
            self.special[name] = token_id
        self.bos_id = {"llama-2": self.special.get("<s>"), "llama-3": self.special.get("<|begin_of_text|>")}.get(template)
        self.end_of_turn_id = self.special[END_OF_TURN[template]]
        eos_name = _token_name(config.get("eos_token"))
        eos = hf.token_to_id(eos_name) if eos_name else None
        self.eos_id = eos if eos is not None else self.end_of_turn_id
        self.stop_ids = sorted({self.end_of_turn_id, self.eos_id})
        pad_name = _token_name(config.get("pad_token"))
        pad = hf.token_to_id(pad_name) if pad_name else None
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @classmethod
    def from_dir(cls, model_dir: str | Path, template: str | None = None) -> "Tokenizer":
        """Read `model_dir/tokenizer.json` (+ `tokenizer_config.json`); detect the template unless named."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        hf = HFTokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if template is not None and template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
        return cls(hf, template or detect_template(hf.get_vocab(with_added_tokens=True)), config, str(path))

    # ----------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no special tokens added."""
        return self.hf.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------- chat templates

    def render_turn(self, message: dict, index: int, system: str | None = None) -> tuple[list[int], list[bool]]:
        """One message's segment: (ids, mask). `index` is its position (the first carries BOS)."""
        role, content = message["role"], message["content"]
        return getattr(self, "_" + self.template.replace("-", ""))(role, content, index, system)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Conversation -> (ids, mask), mask True exactly on assistant content + end-of-turn tokens."""
        system = None
        if messages and messages[0]["role"] == "system" and self.template == "llama-2":
            system, messages = messages[0]["content"], messages[1:]  # llama-2 puts it inside the first [INST]
        ids, mask = [], []
        for index, message in enumerate(messages):
            seg_ids, seg_mask = self.render_turn(message, index, system)
            ids += seg_ids
            mask += seg_mask
        if add_generation_prompt:
            header = self.generation_prompt()
            ids += header
            mask += [False] * len(header)
        return ids, mask

    def generation_prompt(self) -> list[int]:
        """The assistant header alone: what the model continues from to write a reply."""
        if self.template == "chatml":
            return [self.special["<|im_start|>"]] + self.encode("assistant\n")
        if self.template == "llama-3":
            return self._llama3_header("assistant")
        return []  # llama-2: the reply follows "[/INST]" directly

    def _chatml(self, role, content, index, system):
        head = [self.special["<|im_start|>"]] + self.encode(f"{role}\n")
        body = self.encode(content) + [self.end_of_turn_id]
        tail = self.encode("\n")
        agent = role == "assistant"
        return head + body + tail, [False] * len(head) + [agent] * len(body) + [False] * len(tail)

    def _llama3_header(self, role):
        return [self.special["<|start_header_id|>"]] + self.encode(role) + \
            [self.special["<|end_header_id|>"]] + self.encode("\n\n")

    def _llama3(self, role, content, index, system):
        head = ([self.bos_id] if index == 0 else []) + self._llama3_header(role)
        body = self.encode(content) + [self.end_of_turn_id]
        agent = role == "assistant"
        return head + body, [False] * len(head) + [agent] * len(body)

    def _llama2(self, role, content, index, system):
        """FastChat LLAMA2 style: `<s>[INST] user [/INST] assistant </s>` per exchange."""
        if role == "assistant":
            body = self.encode(" " + content.strip() + " ") + [self.end_of_turn_id]
            return body, [True] * len(body)
        if role == "system":
            raise ValueError("llama-2 template: a system message must come first")
        text = content
        if index == 0 and system:
            text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        ids = [self.bos_id] + self.encode(f"[INST] {text.strip()} [/INST]")
        return ids, [False] * len(ids)


def _token_name(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        template: str = "chatml") -> Tokenizer:
    """Train a byte-level BPE (any unicode round-trips) with the template's special tokens; save HF files."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
    specials = TEMPLATE_SPECIALS[template]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save(str(out_dir / "tokenizer.json"))
    eos = {"chatml": "<|im_end|>", "llama-2": "</s>", "llama-3": "<|eot_id|>"}[template]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"llama-2": "<s>", "llama-3": "<|begin_of_text|>"}.get(template),
        "eos_token": eos,
        "pad_token": {"chatml": "<|endoftext|>"}.get(template, eos),
        "model_max_length": 4096,
        "chat_template_name": template,
    }
    if template == "chatml":
        config["chat_template"] = CHATML_JINJA
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return Tokenizer.from_dir(out_dir, template)
