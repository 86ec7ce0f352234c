"""Chat templates: the agent-token mask covers exactly the assistant turns (+ end tokens)."""

import pytest

from eto_ref.tokenizer import TEMPLATES, Tokenizer, train_bpe_tokenizer

CONVERSATION = [
    {"role": "user", "content": "You are a household agent. Put a mug in the cabinet."},
    {"role": "assistant", "content": "Thought: I need a mug.\nAction: go to countertop 1"},
    {"role": "user", "content": "Observation: On the countertop 1, you see a mug 1."},
    {"role": "assistant", "content": "Thought: Take it.\nAction: take mug 1 from countertop 1"},
    {"role": "user", "content": "Observation: You pick up the mug 1."},
    {"role": "assistant", "content": "Thought: Now the cabinet.\nAction: put mug 1 in/on cabinet 1"},
]
CORPUS = [m["content"] for m in CONVERSATION] * 20 + ["[INST] [/INST] <<SYS>> user assistant système ünïcode 🙂"]


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


def test_mask_is_exactly_the_assistant_turns_plus_end_tokens(tok):
    ids, mask = tok.render(CONVERSATION)
    assert len(ids) == len(mask)
    runs = masked_runs(ids, mask)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(assistant)
    for run, text in zip(runs, assistant):
        assert run[-1] == tok.end_of_turn_id  # the agent learns to stop
        assert tok.decode(run[:-1]).strip() == text
    masked_text = tok.decode([i for i, m in zip(ids, mask) if m])
    for m in CONVERSATION:
        if m["role"] == "user":
            assert "Observation" not in masked_text and m["content"] not in masked_text


def test_first_masked_position_is_the_first_assistant_token(tok):
    prefix, _ = tok.render(CONVERSATION[:1], add_generation_prompt=True)
    ids, mask = tok.render(CONVERSATION)
    assert mask.index(True) == len(prefix)


def test_render_is_prefix_stable(tok):
    full, _ = tok.render(CONVERSATION)
    for k in range(1, len(CONVERSATION)):
        part, _ = tok.render(CONVERSATION[:k])
        assert full[: len(part)] == part
        if CONVERSATION[k]["role"] == "assistant":  # generation prompt = the next assistant header
            with_header, _ = tok.render(CONVERSATION[:k], add_generation_prompt=True)
            assert full[: len(with_header)] == with_header


def test_unicode_round_trip(tok):
    text = "système ünïcode 🙂 — Action: click[Buy Now]"
    assert tok.decode(tok.encode(text)) == text


def test_reload_from_directory_detects_template(tok, tmp_path):
    import shutil
    src = tok.source.rsplit("/", 1)[0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{name}", tmp_path / name)
    again = Tokenizer.from_dir(tmp_path)
    assert again.template == tok.template
    assert again.render(CONVERSATION) == tok.render(CONVERSATION)


def test_llama2_renders_as_fastchat(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, 400, tmp_path, template="llama-2")
    msgs = [{"role": "system", "content": "Be brief."}] + CONVERSATION[:2]
    ids, _ = tok.render(msgs)
    expected = (f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{CONVERSATION[0]['content']} [/INST] "
                f"{CONVERSATION[1]['content']} </s>")
    assert tok.decode(ids) == expected


def test_chatml_matches_transformers_apply_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe_tokenizer(CORPUS, 400, tmp_path, template="chatml")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    hf.chat_template = __import__("json").loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    expected = hf.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    ids, _ = tok.render(CONVERSATION[:3], add_generation_prompt=True)
    assert tok.decode(ids) == expected


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    train_bpe_tokenizer(CORPUS, 400, tmp_path, template="chatml")
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        Tokenizer.from_dir(tmp_path, template="vicuna")
    with pytest.raises(ValueError, match=r"llama-3.*needs special token"):
        Tokenizer.from_dir(tmp_path, template="llama-3")
