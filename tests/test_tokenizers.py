"""A model's tokenizer travels in its GGUF: llama.cpp, reading only the file, splits text into the
same tokens as the model's own Hugging Face tokenizer, for byte-level BPE vocabularies (SmolLM,
Llama 3, Qwen) and SentencePiece ones (Llama 2, Mistral v0.1, Gemma)."""

import gguf
import numpy as np
import pytest

from edgequant.assets import read_text
from edgequant.models import load_model
from exporters.gguf import write_gguf
from tests.helpers import write_spm_tokenizer, write_tiny_model

TEXTS = ("wiki.utf8", "code.utf8", "multilingual.utf8")  # prose; runs of spaces and symbols; many scripts


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """A tiny llama whose tokenizer is a Llama-2-style SentencePiece one (3000 pieces, 3072
    embedding rows), written as a float GGUF; returns (the loaded model, the file)."""
    folder = write_tiny_model(tmp_path_factory.mktemp("spm") / "model", vocab_size=3072)
    write_spm_tokenizer(folder)
    loaded = load_model(str(folder))
    path = folder.parent / "model.gguf"
    write_gguf(path, loaded, None, "full precision", np.float32)
    return loaded, path


@pytest.mark.parametrize("text", TEXTS)
def test_llama_cpp_tokenizes_like_the_models_sentencepiece_tokenizer(sentencepiece_gguf, text):
    from llama_cpp import Llama

    loaded, path = sentencepiece_gguf
    sample = read_text(text).lstrip()[:20000]  # (leading spaces: the next test)
    ours = Llama(str(path), vocab_only=True, verbose=False).tokenize(sample.encode(), add_bos=False, special=False)
    assert ours == loaded.tokenizer(sample, add_special_tokens=False).input_ids


def test_before_leading_spaces_llama_cpp_adds_the_dummy_prefix_as_sentencepiece_does(sentencepiece_gguf):
    """SentencePiece puts "▁" before every text; transformers' fast tokenizer skips it when the
    text already starts with a space. llama.cpp follows SentencePiece, the library the
    vocabulary was made with."""
    import sentencepiece
    from llama_cpp import Llama

    loaded, path = sentencepiece_gguf
    sample = read_text("code.utf8")[:2000]
    assert sample.startswith("   ")
    ours = Llama(str(path), vocab_only=True, verbose=False).tokenize(sample.encode(), add_bos=False, special=False)
    assert ours == sentencepiece.SentencePieceProcessor(model_file=str(path.parent / "model" / "tokenizer.model")).encode(sample)
    assert ours[1:] == loaded.tokenizer(sample, add_special_tokens=False).input_ids  # one "▁" more


def test_a_sentencepiece_vocabulary_is_written_as_llama_cpp_reads_it(sentencepiece_gguf):
    loaded, path = sentencepiece_gguf
    fields = gguf.GGUFReader(path).fields

    def value(key):
        return fields[key].contents()

    assert value("tokenizer.ggml.model") == "llama" and value("tokenizer.ggml.pre") == "default"
    tokens, types, scores = (value(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == 3072
    assert tokens[3000:] == [f"[PAD{i}]" for i in range(3000, 3072)] and set(types[3000:]) == {5}  # unused rows
    assert tokens[0] == "<unk>" and types[0] == 2 and types[1] == types[2] == 3  # unknown, then <s> and </s> as control
    assert sum(t == 6 for t in types) == 256 and tokens[types.index(6)] == "<0x00>"  # every byte, as fallback
    assert value("tokenizer.ggml.bos_token_id") == loaded.tokenizer.bos_token_id == 1
    assert value("tokenizer.ggml.add_bos_token") is True and value("tokenizer.ggml.add_space_prefix") is True
    normal = [s for s, t in zip(scores, types) if t == 1]
    assert len(set(normal)) == len(normal)  # a strict merge order: no two pieces tie


def test_a_tokenizer_llama_cpp_cannot_hold_is_refused_in_one_line(tiny_model, tmp_path):
    """A word-level vocabulary (no merges, no byte fallback) has no GGUF form."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from edgequant.errors import EdgequantError

    loaded = load_model(str(tiny_model()))
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(99)} | {"<unk>": 99}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    loaded.tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    with pytest.raises(EdgequantError, match="WordLevel tokenizer cannot be written to GGUF"):
        write_gguf(tmp_path / "model.gguf", loaded, None, "full precision", np.float32)
    assert list(tmp_path.iterdir()) == []


def test_windows_start_with_bos_where_the_tokenizer_puts_one_and_llama_cpp_says_so_too(sentencepiece_gguf, tiny_model):
    """Evaluation and calibration windows begin as the model's texts begin: with BOS for a
    SentencePiece vocabulary that adds one (the GGUF says add_bos_token too), without for byte-level BPE."""
    from edgequant.evaluation import bos_token, token_windows

    loaded, path = sentencepiece_gguf
    windows = token_windows(loaded.tokenizer, read_text("wiki.utf8"), 1024, 256)
    assert windows.shape == (4, 256) and (windows[:, 0] == loaded.tokenizer.bos_token_id).all()
    assert (windows[:, 1:] != loaded.tokenizer.bos_token_id).all()  # the text itself, 255 tokens a window
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.add_bos_token"].contents() is True
    plain = load_model(str(tiny_model())).tokenizer  # SmolLM2's: a BOS token it never puts before a text
    assert plain.bos_token_id is not None and bos_token(plain) is None
    assert token_windows(plain, read_text("wiki.utf8"), 512, 256)[0].tolist() == \
        plain(read_text("wiki.utf8")[:4096], add_special_tokens=False).input_ids[:256]
