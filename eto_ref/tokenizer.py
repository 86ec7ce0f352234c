"""Tokenizer and chat templates: a conversation -> token ids + the agent-token mask.

`render(messages)` returns `(ids, mask)` where `mask[i]` is True exactly on the
tokens of assistant turns: their content and the turn's end token (`</s>`,
`<|eot_id|>`, `<|im_end|>`), so the agent learns to stop. Everything else
(system, instruction, observations, role headers, BOS) is False: never trained
on, never scored. This mask is what the BC and DPO losses read.

A rendering is the concatenation of per-message *segments*, each tokenized on
its own: special tokens are inserted by id (never by tokenizing their text),
text pieces go through `encode`. So a conversation can grow turn by turn -- the
agent appends an observation segment and the next assistant header to its KV
cache -- and `render(messages[:k])` is always an exact prefix of `render(messages)`.

Templates (one rendered example each; `^` marks the mask):

    chatml (Qwen2, and the built-in tiny model)
        <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
                                                           ^^^^^^^^^^^^^^^
    llama-3
        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\nHello<|eot_id|>
                                                        ^^^^^^^^^^^^^^^
    llama-2 (FastChat's "llama-2" conversation, as the official ETO code trains it)
        <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\nHi [/INST] Hello </s><s>[INST] ...
                                                        ^^^^^^^^^^^

Text inside messages is data: `encode` tokenizes the text of a special token
(say an observation that contains "</s>") as plain characters, so only the
template can put control tokens into a sequence.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

TEMPLATES = ("llama-2", "llama-3", "chatml")
ROLES = ("system", "user", "assistant")

# The special tokens each template inserts (must be in the vocabulary) ...
REQUIRED_SPECIALS = {
    "llama-2": ("<s>", "</s>"),
    "llama-3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}
# ... the token that ends an assistant turn (inside the mask) ...
END_OF_TURN = {"llama-2": "</s>", "llama-3": "<|eot_id|>", "chatml": "<|im_end|>"}
# ... and the defaults for bos/eos when tokenizer_config.json does not name them.
DEFAULT_BOS = {"llama-2": "<s>", "llama-3": "<|begin_of_text|>", "chatml": None}
DEFAULT_EOS = {"llama-2": "</s>", "llama-3": "<|end_of_text|>", "chatml": "<|endoftext|>"}

# Jinja chat templates written into tokenizer_config.json, so transformers' apply_chat_template
# renders our tokenizers exactly as `Tokenizer.render` does (tests check it). Not used at runtime.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama-3": (
        "{% for message in messages %}"
        "{% if loop.first %}{{ '<|begin_of_text|>' }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "llama-2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ '<s>[INST] ' }}"
        "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + ' </s>' }}{% endif %}"
        "{% endfor %}"
    ),
}

# A chatml template's literal default system turn (newline written as a character or as \n).
DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a template

# Qwen2's pre-tokenizer regex (Llama-3's, with single digits): newline runs are their own pieces,
# so "<|end_header_id|>" + "\n\n" + "Hi" splits the same whether tokenized whole or by segment.
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def read_chat_template(model_dir: Path, config: dict) -> str | None:
    """The model's Jinja chat template: tokenizer_config.json's `chat_template`, else chat_template.jinja."""
    chat_template = config.get("chat_template")
    if isinstance(chat_template, str):
        return chat_template
    path = model_dir / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return None  # (a list of named templates, as some configs hold, is not read)


def default_system_message(chat_template: str | None) -> str | None:
    """The system message a chatml template inserts when a conversation has none, else None.

    SmolLM2's template starts every conversation without a system turn with
    `<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n`
    (Qwen2's with "You are a helpful assistant."). The text is read from the Jinja
    source: a string literal `<|im_start|>system` + newline + text + `<|im_end|>`,
    whose text holds no quotes or braces (so `+ message['content'] +` is not taken for it).
    """
    if not chat_template:
        return None
    match = DEFAULT_SYSTEM.search(chat_template)
    return match.group(1).replace("\\n", "\n") if match else None


def check_template_name(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")


def detect_template(vocab: dict, chat_template: str | None = None) -> str:
    """Which template a model uses: from its Jinja chat_template when given, else from its vocabulary."""
    if chat_template:
        if "<|im_start|>" in chat_template:
            return "chatml"
        if "<|start_header_id|>" in chat_template:
            return "llama-3"
        if "[INST]" in chat_template:
            return "llama-2"
    if "<|eot_id|>" in vocab or "<|start_header_id|>" in vocab:
        return "llama-3"
    if "<|im_start|>" in vocab:
        return "chatml"
    return "llama-2"


def adds_dummy_prefix(hf: HFTokenizer) -> bool:
    """True if encoding "a" yields a space-marked "▁a"/"Ġa": sentencepiece's dummy prefix (Llama-2, Mistral).

    Such a tokenizer puts a space before every piece it encodes, so a segment
    that itself starts with a space must drop it, or the space is doubled.
    """
    text = "a"
    if hf.normalizer is not None:
        text = hf.normalizer.normalize_str(text)
    if hf.pre_tokenizer is not None:
        text = "".join(piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(text))
    return text != "a"


def _token_name(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizer.json` plus one chat template.

    Attributes: `template`, `vocab_size`, `bos_id` (the BOS the template inserts; None for
    chatml), `eos_id`, `end_of_turn_id` (the token closing an assistant turn), `stop_ids`
    (end-of-turn and eos: stop generating at any of them), `pad_id` (pad token, else eos, else 0).
    """

    def __init__(self, hf: HFTokenizer, template: str, config: dict | None = None, source: str = "tokenizer",
                 chat_template: str | None = None):
        check_template_name(template)
        config = config or {}
        self.hf, self.template, self.source = hf, template, source
        # The system turn the model's own template adds to a conversation without one (SmolLM2, Qwen2).
        self.default_system = default_system_message(chat_template) if template == "chatml" else None
        self.hf.encode_special_tokens = True  # text is data: "</s>" inside a message is 4 characters
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.dummy_prefix = adds_dummy_prefix(hf)

        self.special = {}  # the template's control tokens, name -> id
        for name in REQUIRED_SPECIALS[template]:
            token_id = hf.token_to_id(name)
            if token_id is None:
                raise ValueError(f"{source}: chat template {template!r} needs special token {name!r}, "
                                 "which is not in the vocabulary")
            self.special[name] = token_id
        self.end_of_turn_id = self.special[END_OF_TURN[template]]
        self.bos_id = self._config_token(config, "bos_token", DEFAULT_BOS[template])
        self.eos_id = self._config_token(config, "eos_token", DEFAULT_EOS[template], fallback=self.end_of_turn_id)
        self.stop_ids = sorted({self.end_of_turn_id, self.eos_id})
        pad = self._config_token(config, "pad_token", None)
        self.pad_id = pad if pad is not None else self.eos_id

    def _config_token(self, config: dict, key: str, default: str | None, fallback: int | None = None) -> int | None:
        """The id of the token tokenizer_config.json names under `key`, else of `default`, else `fallback`."""
        for name in (_token_name(config.get(key)), default):
            if name is not None and self.hf.token_to_id(name) is not None:
                return self.hf.token_to_id(name)
        return fallback

    @classmethod
    def from_dir(cls, model_dir: str | Path, template: str | None = None) -> "Tokenizer":
        """Read `model_dir/tokenizer.json` (+ `tokenizer_config.json`); detect the template unless named."""
        if template is not None:
            check_template_name(template)
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library's own message names neither file nor cause
            raise ValueError(f"{path}: not a readable tokenizer.json ({type(e).__name__}: {e}); "
                             "is it truncated or from another library?") from e
        config_path = model_dir / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
        chat_template = read_chat_template(model_dir, config)
        template = template or detect_template(hf.get_vocab(with_added_tokens=True), chat_template)
        return cls(hf, template, config, str(path), chat_template)

    # ----------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. No BOS/EOS added; special-token text is encoded as ordinary characters."""
        return self.hf.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _encode_continuation(self, text: str) -> list[int]:
        """Encode a segment that continues the text before it, e.g. " Hello " after "[/INST]".

        A dummy-prefix tokenizer adds the leading space itself ("▁Hello"); drop ours, or it doubles.
        """
        if self.dummy_prefix and text.startswith(" "):
            text = text[1:]
        return self.encode(text)

    # ----------------------------------------------------------------- conversations

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Conversation -> (ids, mask): the concatenation of each message's segment.

        mask is True exactly on assistant content + end-of-turn tokens. With
        `add_generation_prompt` the assistant header follows (mask False), so a
        model continues with a reply.
        """
        self._check_conversation(messages)
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        ids, mask = [], []
        for index, message in enumerate(messages):
            segment_ids, segment_mask = self.render_turn(message, index, system=system)
            ids += segment_ids
            mask += segment_mask
        if add_generation_prompt:
            header = self.generation_prompt()
            ids += header
            mask += [False] * len(header)
        return ids, mask

    def render_turn(self, message: dict, index: int, system: str | None = None) -> tuple[list[int], list[bool]]:
        """One message's segment (ids, mask). `index` is its position in the conversation.

        The first segment carries BOS (llama-3; llama-2 starts every exchange with `<s>`).
        llama-2 has no system turn of its own: its system segment is empty and the
        `system` text goes inside the first `[INST]` (the user message at index 1).
        """
        render = {"chatml": self._chatml_turn, "llama-3": self._llama3_turn, "llama-2": self._llama2_turn}
        return render[self.template](message["role"], message["content"], index, system)

    def generation_prompt(self) -> list[int]:
        """The assistant header alone: what the model continues from to write a reply."""
        if self.template == "chatml":
            return [self.special["<|im_start|>"]] + self.encode("assistant\n")
        if self.template == "llama-3":
            return self._llama3_header("assistant")
        return []  # llama-2: the reply follows the user segment's "[/INST]" directly

    def _check_conversation(self, messages: list[dict]) -> None:
        for i, message in enumerate(messages):
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise ValueError(f"message {i}: need role in {ROLES} and string content, got {message!r}")
        if self.template != "llama-2":
            return
        # FastChat's llama-2: an optional system message first, then user/assistant alternating.
        turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
        for i, message in enumerate(turns):
            expected = ("user", "assistant")[i % 2]
            if message["role"] != expected:
                raise ValueError(f"llama-2 template: turn {i} after the system message must be {expected!r}, "
                                 f"got {message['role']!r} (a system message may only come first; "
                                 "user and assistant turns alternate, starting with user)")

    # ----------------------------------------------------------------- one function per template

    def _chatml_turn(self, role: str, content: str, index: int, system: str | None):
        """<|im_start|>{role}\\n{content}<|im_end|>\\n   -- mask on content + <|im_end|> of assistant turns.

            <|im_start|>assistant\\nThought: ...\\nAction: ...<|im_end|>\\n
            F            F          T  T  ...                 T          F
        """
        head = [self.special["<|im_start|>"]] + self.encode(f"{role}\n")
        body = self.encode(content) + [self.end_of_turn_id]
        tail = self.encode("\n")
        agent = role == "assistant"
        return head + body + tail, [False] * len(head) + [agent] * len(body) + [False] * len(tail)

    def _llama3_header(self, role: str) -> list[int]:
        """<|start_header_id|>{role}<|end_header_id|>\\n\\n"""
        return ([self.special["<|start_header_id|>"]] + self.encode(role)
                + [self.special["<|end_header_id|>"]] + self.encode("\n\n"))

    def _llama3_turn(self, role: str, content: str, index: int, system: str | None):
        """[<|begin_of_text|>]<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>

            <|start_header_id|>assistant<|end_header_id|>\\n\\nThought: ...<|eot_id|>
            F                  F         F                F    T  ...      T
        """
        head = ([self.bos_id] if index == 0 else []) + self._llama3_header(role)
        body = self.encode(content) + [self.end_of_turn_id]
        agent = role == "assistant"
        return head + body, [False] * len(head) + [agent] * len(body)

    def _llama2_turn(self, role: str, content: str, index: int, system: str | None):
        """FastChat "llama-2": each exchange is `<s>[INST] {user} [/INST] {assistant} </s>`.

        The system text sits inside the first [INST] (`<<SYS>>` block); the system
        message's own segment is empty. Contents are not stripped (as in FastChat).

            <s>[INST] <<SYS>>\\nBe brief.\\n<</SYS>>\\n\\nFind a mug. [/INST] Thought: ... </s><s>[INST] Obs ... [/INST]
            F   F ...                                            F    T  ...        T  T   F
        FastChat's string ends with " </s><s>"; we leave out the trailing <s> (it
        belongs to the next exchange's segment, and is never scored).
        """
        if role == "system":
            return [], []
        if role == "assistant":
            body = self._encode_continuation(f" {content} ") + [self.end_of_turn_id]
            return body, [True] * len(body)
        text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}" if system and index == 1 else content
        ids = [self.bos_id] + self.encode(f"[INST] {text} [/INST]")
        return ids, [False] * len(ids)


# --------------------------------------------------------------------------- training a tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        template: str = "chatml", model_max_length: int = 4096) -> Tokenizer:
    """Train a byte-level BPE on `texts` with the template's special tokens; write HF files to `out_dir`.

    Byte-level (every byte is in the alphabet), so any unicode text round-trips.
    Pre-tokenization is Qwen2's (regex split + ByteLevel). Special tokens get the first ids:
        chatml : <|endoftext|> (eos, pad), <|im_start|>, <|im_end|>
        llama-2: <unk>, <s> (bos), </s> (eos, pad)
        llama-3: <|begin_of_text|> (bos), <|end_of_text|> (pad), <|start_header_id|>,
                 <|end_header_id|>, <|eot_id|> (eos)
    Writes `tokenizer.json` and `tokenizer_config.json` (bos/eos/pad tokens,
    model_max_length, and a Jinja `chat_template` equal to `render`).
    """
    check_template_name(template)
    config = {
        "chatml": dict(bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
        "llama-2": dict(bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>"),
        "llama-3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"),
    }[template]
    specials = {
        "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "llama-2": ["<unk>", "<s>", "</s>"],
        "llama-3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"],
    }[template]

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save(str(out_dir / "tokenizer.json"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_max_length,
                  clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATES[template])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return Tokenizer.from_dir(out_dir, template)
