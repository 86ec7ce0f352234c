"""Shared test fixtures. Keep this file small."""

import pytest


class FakeTokenizer:
    """A character-level stand-in with the API of `eto_ref.tokenizer.Tokenizer` used by the data code.

    Every message is one segment: [header] + one id per character + [END]; the
    mask is True on the characters and END of assistant messages. So the ids of
    a rendering can be written by hand:

        render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}])
        ids  = [USER, h, i, END, ASSISTANT, g, o, END]
        mask = [F,    F, F, F,   F,         T, T, T  ]
    """

    PAD, USER, ASSISTANT, SYSTEM, END = 0, 1, 2, 3, 4
    OFFSET = 5  # character c has id OFFSET + ord(c)
    HEADERS = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM}

    pad_id = PAD
    vocab_size = OFFSET + 128  # ASCII text

    def encode(self, text: str) -> list[int]:
        return [self.OFFSET + ord(c) for c in text]

    def decode(self, ids) -> str:
        names = {self.PAD: "<pad>", self.USER: "<user>", self.ASSISTANT: "<assistant>",
                 self.SYSTEM: "<system>", self.END: "<end>"}
        return "".join(names.get(i) or chr(i - self.OFFSET) for i in ids)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        ids, mask = [], []
        for m in messages:
            agent = m["role"] == "assistant"
            body = self.encode(m["content"]) + [self.END]
            ids += [self.HEADERS[m["role"]]] + body
            mask += [False] + [agent] * len(body)
        if add_generation_prompt:
            ids.append(self.ASSISTANT)
            mask.append(False)
        return ids, mask


@pytest.fixture
def fake_tok() -> FakeTokenizer:
    return FakeTokenizer()


from tests.helpers import data_files, tiny_model  # noqa: E402,F401  (fixtures for every test module)


@pytest.fixture(autouse=True)
def float32_on_every_cpu(monkeypatch):
    """`dtype auto` means float32 in tests on every CPU, so a test's numbers do not depend on whether the
    machine has bfloat16 instructions (tests of the bfloat16 choice patch `cpu_has_bf16` back)."""
    from eto_ref import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
