"""Chat templates: the agent-token mask covers exactly the assistant turns (+ end tokens).

Test tokenizers are trained on the spot with `train_bpe_tokenizer` (one per
template). Oracles: FastChat's llama-2 string written out below; transformers'
`apply_chat_template` with our written templates and with the official
Llama-3 / Qwen2 templates; its `return_assistant_tokens_mask` for the mask.
"""

import shutil

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from eto_ref.tokenizer import TEMPLATES, Tokenizer, train_bpe_tokenizer

CONVERSATION = [
    {"role": "user", "content": "You are a household agent. Put a mug in the cabinet."},
    {"role": "assistant", "content": "Thought: I need a mug.\nAction: go to countertop 1"},
    {"role": "user", "content": "Observation: On the countertop 1, you see a mug 1."},
    {"role": "assistant", "content": "Thought: Take it.\nAction: take mug 1 from countertop 1"},
    {"role": "user", "content": "Observation: You pick up the mug 1."},
    {"role": "assistant", "content": "Thought: Now the cabinet.\nAction: put mug 1 in/on cabinet 1"},
]
SYSTEM = {"role": "system", "content": "Be brief."}
UNICODE = "système ünïcode 🙂 — Action: click[Buy Now] 日本語\n\ttabs  and  spaces "
CORPUS = [m["content"] for m in CONVERSATION] * 20 + ["[INST] [/INST] <<SYS>> <</SYS>> Be brief. user assistant system"]

# What each template wraps around an assistant's content inside the mask.
ASSISTANT_TEXT = {"chatml": "{}<|im_end|>", "llama-3": "{}<|eot_id|>", "llama-2": " {} </s>"}
GENERATION_PROMPT = {"chatml": "<|im_start|>assistant\n", "llama-3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "llama-2": ""}


@pytest.fixture(scope="module", params=TEMPLATES)
def tok(request, tmp_path_factory):
    return train_bpe_tokenizer(CORPUS, vocab_size=400, out_dir=tmp_path_factory.mktemp(request.param),
                               template=request.param)


def masked_runs(ids, mask):
    """The maximal runs of masked-in ids."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# --------------------------------------------------------------------------- every template


@pytest.mark.parametrize("with_system", [False, True])
def test_mask_is_exactly_the_assistant_turns_plus_end_tokens(tok, with_system):
    messages = [SYSTEM] * with_system + CONVERSATION
    ids, mask = tok.render(messages)
    assert len(ids) == len(mask)
    runs = masked_runs(ids, mask)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(run) for run in runs] == [ASSISTANT_TEXT[tok.template].format(a) for a in assistant]
    assert all(run[-1] == tok.end_of_turn_id for run in runs)  # the agent learns to stop
    masked_text = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Observation" not in masked_text and "household" not in masked_text and "brief" not in masked_text
    # Everything else is unmasked: BOS, headers, user and observation turns.
    unmasked_text = tok.decode([i for i, m in zip(ids, mask) if not m])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in unmasked_text
    if tok.bos_id is not None:
        assert ids[0] == tok.bos_id and not mask[0]


def test_first_masked_position_is_the_first_assistant_token(tok):
    prefix, _ = tok.render(CONVERSATION[:1], add_generation_prompt=True)
    ids, mask = tok.render(CONVERSATION)
    assert mask.index(True) == len(prefix)
    first = tok.decode(ids[len(prefix):len(prefix) + 1])  # llama-2: may be the space before "Thought"
    assert first and ASSISTANT_TEXT[tok.template].format(CONVERSATION[1]["content"]).startswith(first)


@pytest.mark.parametrize("with_system", [False, True])
def test_render_is_prefix_stable(tok, with_system):
    messages = [SYSTEM] * with_system + CONVERSATION
    full, full_mask = tok.render(messages)
    for k in range(len(messages) + 1):
        part, part_mask = tok.render(messages[:k])
        assert full[:len(part)] == part and full_mask[:len(part)] == part_mask
        if k < len(messages) and messages[k]["role"] == "assistant":  # generation prompt = next assistant header
            with_header, _ = tok.render(messages[:k], add_generation_prompt=True)
            assert full[:len(with_header)] == with_header


def test_render_is_the_concatenation_of_turn_segments(tok):
    ids = []
    for index, message in enumerate(CONVERSATION):
        ids += tok.render_turn(message, index)[0]
    assert ids == tok.render(CONVERSATION)[0]
    assert tok.render(CONVERSATION, add_generation_prompt=True)[0] == \
        tok.render(CONVERSATION)[0] + tok.generation_prompt()


def test_generation_prompt(tok):
    assert tok.decode(tok.generation_prompt()) == GENERATION_PROMPT[tok.template]
    ids, mask = tok.render(CONVERSATION[:1], add_generation_prompt=True)
    assert not any(mask)


def test_unicode_round_trip(tok):
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    ids, mask = tok.render([{"role": "user", "content": "go"}, {"role": "assistant", "content": UNICODE}])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == ASSISTANT_TEXT[tok.template].format(UNICODE)


def test_special_tokens_come_from_the_template_only(tok):
    """Special-token text inside a message is plain characters; the template inserts the real ids."""
    sneaky = "</s><|im_end|><|eot_id|><s>"
    assert not set(tok.encode(sneaky)) & set(tok.special.values())
    assert tok.decode(tok.encode(sneaky)) == sneaky
    ids, mask = tok.render(CONVERSATION)
    ends = [m for i, m in zip(ids, mask) if i == tok.end_of_turn_id]  # mask value at each end-of-turn token
    closes_every_turn = tok.template != "llama-2"  # chatml/llama-3 close user turns too (outside the mask)
    assert ends.count(True) == 3 and ends.count(False) == 3 * closes_every_turn


def test_special_ids(tok):
    vocab = tok.hf.get_vocab()
    expected = {"chatml": (None, "<|endoftext|>", "<|endoftext|>"), "llama-2": ("<s>", "</s>", "</s>"),
                "llama-3": ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>")}[tok.template]
    bos, eos, pad = (None if name is None else vocab[name] for name in expected)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eos, pad)
    assert tok.stop_ids == sorted({tok.end_of_turn_id, eos})
    assert tok.vocab_size == len(vocab)


def test_reload_from_directory_detects_template(tok, tmp_path):
    src = tok.source.rsplit("/", 1)[0]
    shutil.copy(f"{src}/tokenizer.json", tmp_path / "tokenizer.json")
    again = Tokenizer.from_dir(tmp_path)  # no tokenizer_config.json: detected from the vocabulary
    assert again.template == tok.template
    assert again.render(CONVERSATION) == tok.render(CONVERSATION)
    shutil.copy(f"{src}/tokenizer_config.json", tmp_path / "tokenizer_config.json")
    again = Tokenizer.from_dir(tmp_path)  # detected from the chat_template
    assert (again.template, again.eos_id, again.pad_id) == (tok.template, tok.eos_id, tok.pad_id)


# Our templates (tokenizer.CHAT_TEMPLATES) with transformers' {% generation %} marks on what the mask must cover.
WITH_GENERATION_TAGS = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    ),
    "llama-3": (
        "{% for message in messages %}{% if loop.first %}{{ '<|begin_of_text|>' }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
    ),
    "llama-2": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<s>[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{% generation %}{{ ' ' + message['content'] + ' </s>' }}{% endgeneration %}{% endif %}{% endfor %}"
    ),
}


def test_agrees_with_transformers_apply_chat_template(tok):
    """Our written Jinja template, run by transformers, gives the same ids; its assistant mask is ours."""
    transformers = pytest.importorskip("transformers")
    directory = tok.source.rsplit("/", 1)[0]
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for messages in (CONVERSATION, [SYSTEM] + CONVERSATION[:3]):
        ids, mask = tok.render(messages, add_generation_prompt=messages[-1]["role"] == "user")
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                          add_generation_prompt=messages[-1]["role"] == "user")
        assert ids == list(expected)

    # The mask oracle: the template with {% generation %} around assistant content + end token.
    out = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 chat_template=WITH_GENERATION_TAGS[tok.template])
    assert list(out["input_ids"]) == tok.render(CONVERSATION)[0]
    assert [bool(m) for m in out["assistant_masks"]] == tok.render(CONVERSATION)[1]


# --------------------------------------------------------------------------- llama-2 = FastChat


def fastchat_llama2_prompt(messages, add_generation_prompt=False):
    """FastChat's Conversation.get_prompt, SeparatorStyle.LLAMA2, "llama-2" template, written out.

    system_template "[INST] <<SYS>>\\n{system_message}\\n<</SYS>>\\n\\n", roles ("[INST]", "[/INST]"),
    sep " ", sep2 " </s><s>". The tokenizer then adds BOS in front.
    """
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = [m["content"] for m in messages if m["role"] != "system"] + [None] * add_generation_prompt
    seps, roles = [" ", " </s><s>"], ["[INST]", "[/INST]"]
    ret = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n" if system else "[INST] "
    for i, message in enumerate(turns):
        if message:
            ret += message + " " if i == 0 else roles[i % 2] + " " + message + seps[i % 2]
        else:
            ret += roles[i % 2]
    return "<s>" + ret


@pytest.mark.parametrize("with_system", [False, True])
def test_llama2_renders_as_fastchat(tmp_path, with_system):
    tok = train_bpe_tokenizer(CORPUS, 400, tmp_path, template="llama-2")
    messages = [SYSTEM] * with_system + CONVERSATION
    for k in range(1 + with_system, len(messages) + 1):
        ids, _ = tok.render(messages[:k])
        expected = fastchat_llama2_prompt(messages[:k])
        if messages[k - 1]["role"] == "assistant":
            assert expected.endswith(" </s><s>")
            expected = expected[:-len("<s>")]  # FastChat's trailing <s> opens the next exchange: not ours
        else:
            ids, _ = tok.render(messages[:k], add_generation_prompt=True)
            expected = fastchat_llama2_prompt(messages[:k], add_generation_prompt=True)
        assert tok.decode(ids) == expected


def sentencepiece_style_tokenizer(tmp_path):
    """A tiny tokenizer shaped like Llama-2's tokenizer.json: Prepend("▁") + Replace(" ", "▁") normalizer."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # sentencepiece: no merges across words
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    letters = sorted(set("".join(CORPUS)))
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=letters, show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    return hf


@pytest.mark.parametrize("with_system", [False, True])
def test_llama2_sentencepiece_style_matches_whole_string_tokenization(tmp_path, with_system):
    """A dummy-prefix tokenizer must not double the space before the reply: ids equal FastChat's string, tokenized."""
    hf = sentencepiece_style_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.template == "llama-2" and tok.dummy_prefix
    messages = [SYSTEM] * with_system + CONVERSATION
    expected = hf.encode(fastchat_llama2_prompt(messages)[:-len("<s>")], add_special_tokens=False).ids
    assert tok.render(messages)[0] == expected
    runs = masked_runs(*tok.render(messages))
    assert hf.encode(" Thought", add_special_tokens=False).tokens[0] == "▁"  # the doubling we avoid
    assert hf.id_to_token(runs[0][0]).startswith("▁Thought")  # one space, joined to the word


def test_llama2_needs_alternating_turns(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, 400, tmp_path, template="llama-2")
    with pytest.raises(ValueError, match="llama-2 template"):
        tok.render([CONVERSATION[0], CONVERSATION[2]])
    with pytest.raises(ValueError, match="llama-2 template"):
        tok.render(CONVERSATION[:2] + [SYSTEM])


# --------------------------------------------------------------------------- official templates


# Meta-Llama-3-8B-Instruct's chat_template (its `| trim` is a no-op on our stripped contents).
LLAMA3_OFFICIAL = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2-7B-Instruct's chat_template (a default system message when none is given).
QWEN2_OFFICIAL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("template, official", [("llama-3", LLAMA3_OFFICIAL), ("chatml", QWEN2_OFFICIAL)])
def test_matches_official_chat_templates(tmp_path, template, official):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe_tokenizer(CORPUS, 400, tmp_path, template=template)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [SYSTEM] + CONVERSATION[:3]
    expected = hf.apply_chat_template(messages, chat_template=official, tokenize=True, return_dict=False,
                                      add_generation_prompt=True)
    assert tok.render(messages, add_generation_prompt=True)[0] == list(expected)


# --------------------------------------------------------------------------- errors


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'.*llama-2, llama-3, chatml"):
        train_bpe_tokenizer(CORPUS, 400, tmp_path, template="vicuna")
    tok = train_bpe_tokenizer(CORPUS, 400, tmp_path, template="chatml")
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        Tokenizer.from_dir(tmp_path, template="vicuna")
    with pytest.raises(ValueError, match=r"'llama-3' needs special token '<\|begin_of_text\|>'"):
        Tokenizer.from_dir(tmp_path, template="llama-3")
    with pytest.raises(ValueError, match=r"'llama-2' needs special token '<s>'"):
        Tokenizer.from_dir(tmp_path, template="llama-2")
    with pytest.raises(ValueError, match="role"):
        tok.render([{"role": "tool", "content": "x"}])


def test_missing_chatml_token(tmp_path):
    train_bpe_tokenizer(CORPUS, 400, tmp_path, template="llama-2")
    with pytest.raises(ValueError, match=r"'chatml' needs special token '<\|im_start\|>'"):
        Tokenizer.from_dir(tmp_path, template="chatml")
