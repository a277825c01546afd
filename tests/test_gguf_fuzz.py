"""Fuzz the GGUF reader: mutated headers must give a clean one-line EdgequantError, never a
traceback, a hang or a giant allocation.

A tiny but realistic llama GGUF (metadata, a gpt2 tokenizer, F32/F16/Q8_0/Q4_0 tensors) is
written once; each example overwrites a few bytes of its header (everything before the tensor
data: magic, version, counts, keys, value types, lengths, tensor infos), sometimes with a huge
little-endian uint64, sometimes truncates the file, and then reads it like the CLI does.
"""

import os
import signal
import struct
import tempfile
import tracemalloc

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, configuration, given, settings
from hypothesis import strategies as st

from edgequant.errors import EdgequantError
from edgequant.models import gguf_config, read_gguf

SECONDS_PER_EXAMPLE = 5  # a valid tiny file reads in milliseconds; more means a runaway loop
MAX_ALLOCATED = 64 << 20  # bytes of Python/numpy memory one read may use at its peak

N_VOCAB, N_EMBD, N_FF = 8, 32, 64

# Even with database=None, Hypothesis caches the constants it finds in our source under
# ./.hypothesis; keep that out of the repo unless the user chose a place for it.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    configuration.set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "edgequant-hypothesis"))


def write_tiny_llama(path):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny fuzz llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "Ġab"])
    w.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (N_VOCAB - 2))
    w.add_token_merges(["a b", "Ġ a", "Ġa b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def add(name, shape, qtype):
        x = rng.standard_normal(shape).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    Q = gguf.GGMLQuantizationType
    add("token_embd.weight", (N_VOCAB, N_EMBD), Q.F16)
    add("blk.0.attn_norm.weight", (N_EMBD,), Q.F32)
    add("blk.0.attn_q.weight", (N_EMBD, N_EMBD), Q.Q8_0)
    add("blk.0.ffn_down.weight", (N_EMBD, N_FF), Q.Q4_0)
    add("output_norm.weight", (N_EMBD,), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def offset(reader, part):
    """Where a header item gguf-py parsed (a numpy view of the file) starts in the file."""
    return part.ctypes.data - reader.data.ctypes.data


class Valid:
    """The unmutated file, where its header items are, and a path to write mutations to."""

    def __init__(self, path):
        self.reader = read_gguf(path)
        self.data = path.read_bytes()
        self.header_len = self.reader.data_offset
        parts = [p for f in self.reader.fields.values() for p in f.parts]
        parts += [p for t in self.reader.tensors for p in t.field.parts]
        parts = [p for p in parts if p.nbytes]
        self.offsets = sorted({offset(self.reader, p) for p in parts})  # every count, length, type...
        self.u64_offsets = sorted({offset(self.reader, p) for p in parts if p.dtype.itemsize == 8})
        self.mutated = path.with_name("mutated.gguf")

    def write(self, edits, cut=None):
        data = bytearray(self.data)
        for pos, value in edits:
            data[pos : pos + len(value)] = value
        self.mutated.write_bytes(bytes(data[:cut]))
        return self.mutated


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf_fuzz") / "tiny.gguf"
    write_tiny_llama(path)
    return Valid(path)


def test_the_unmutated_file_reads(valid):
    reader = read_gguf(valid.write([]))
    arch, config = gguf_config(reader)
    assert arch.model_type == "llama"
    assert (config.vocab_size, config.hidden_size, config.num_key_value_heads) == (N_VOCAB, N_EMBD, 2)
    assert [t.name for t in reader.tensors][:3] == ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"]
    assert reader.tensors[0].data.shape == (N_VOCAB, N_EMBD)


class Runaway(BaseException):  # not an Exception, so no `except Exception` swallows it
    pass


def _alarm(signum, frame):
    raise Runaway(f"reading took more than {SECONDS_PER_EXAMPLE} s")


def read_like_the_cli(path):
    """Read the file and its config, within a time and memory budget. Returns None on success,
    or the message of the EdgequantError; anything else escaping is a bug."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_EXAMPLE)
    tracemalloc.start()
    try:
        try:
            reader = read_gguf(path)
        except EdgequantError as e:
            assert path.name in str(e), str(e)
            message = str(e)
        else:
            try:
                gguf_config(reader)
                message = None
            except EdgequantError as e:
                message = str(e)
            for t in reader.tensors:
                assert t.data.nbytes <= path.stat().st_size and t.data.shape is not None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < MAX_ALLOCATED, f"reading allocated {peak >> 20} MiB"
    assert message is None or (message.strip() and "\n" not in message), repr(message)
    return message


def u64(value):
    return struct.pack("<Q", value)


def u32(value):
    return struct.pack("<I", value)


def targeted_edits(valid, case):
    r = valid.reader
    token_type, tokens, name = (r.fields[k].parts for k in ("tokenizer.ggml.token_type", "tokenizer.ggml.tokens", "general.name"))
    tensor = r.tensors[2].field.parts  # blk.0.attn_q.weight: name length, name, n_dims, dims, type, offset
    return {
        "bad magic": [(0, b"GGUX")],
        "version 4": [(4, u32(4))],
        "2**60 tensors": [(8, u64(2**60))],
        "2**60 key/values": [(16, u64(2**60))],
        "2**60 tokens": [(offset(r, tokens[4]), u64(2**60))],
        "2**60 one-byte token types": [(offset(r, token_type[3]), u32(gguf.GGUFValueType.UINT8)),
                                       (offset(r, token_type[4]), u64(2**60))],  # gguf-py 0.19 loops for ever
        "2**60-byte string": [(offset(r, name[0]), u64(2**60))],
        "nested array": [(offset(r, token_type[3]), u32(gguf.GGUFValueType.ARRAY))],
        "2**32-1 tensor dimensions": [(offset(r, tensor[2]), u32(2**32 - 1))],
        "2**60 tensor rows": [(offset(r, tensor[3]) + 8, u64(2**60))],
        "tensor offset 2**60": [(offset(r, tensor[5]), u64(2**60))],
        "unknown tensor type": [(offset(r, tensor[4]), u32(999))],
        "embedding length 33": [(offset(r, r.fields["llama.embedding_length"].parts[-1]), u32(33))],
        "0 heads": [(offset(r, r.fields["llama.attention.head_count"].parts[-1]), u32(0))],
        "architecture with a newline": [(offset(r, r.fields["general.architecture"].parts[-1]), b"lla\nm")],
    }[case]


@pytest.mark.parametrize("case, words", [
    ("bad magic", "not a GGUF file (magic b'GGUX')"),
    ("version 4", "GGUF version 4"),
    ("2**60 tensors", "cannot fit"),
    ("2**60 key/values", "cannot fit"),
    ("2**60 tokens", "truncated"),
    ("2**60 one-byte token types", "truncated: tokenizer.ggml.token_type"),
    ("2**60-byte string", "truncated"),
    ("nested array", "unsupported value type"),
    ("2**32-1 tensor dimensions", "4294967295 dimensions"),
    ("2**60 tensor rows", "tensor blk.0.attn_q.weight ends past the end of the file"),
    ("tensor offset 2**60", "tensor blk.0.attn_q.weight ends past the end of the file"),
    ("unknown tensor type", "unknown type 999"),
    ("embedding length 33", "inconsistent model metadata (The hidden size (33) is not a multiple"),
    ("0 heads", "has a bad llama.attention.head_count (0; expected a positive number)"),
    ("architecture with a newline", "unsupported GGUF architecture 'lla\\nm'"),
])
def test_huge_counts_and_bad_values_fail_cleanly(valid, case, words):
    message = read_like_the_cli(valid.write(targeted_edits(valid, case)))
    assert message and words in message, message


def test_truncated_tensor_data_is_named(valid):
    message = read_like_the_cli(valid.write([], cut=len(valid.data) - 1))
    assert message.endswith("is truncated: tensor output_norm.weight ends past the end of the file"), message


BIG = [2**64 - 1, 2**63, 2**60, 2**40, 2**32, 2**31 + 1, 10**9, 10**6, 0, 1]


@st.composite
def mutations(draw, valid):
    """A few (offset, bytes) overwrites inside the header, and maybe a length to cut the file to:
    huge uint64s, mostly over counts/lengths/dimensions/offsets; small values (value types,
    dimension counts) and random bytes over any header item or anywhere in the header."""
    anywhere = st.integers(0, valid.header_len - 1)
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            pos = draw(st.one_of(st.sampled_from(valid.u64_offsets), anywhere))
            value = u64(draw(st.one_of(st.sampled_from(BIG), st.integers(0, 2**64 - 1))))
        else:
            pos = draw(st.one_of(st.sampled_from(valid.offsets), anywhere))
            value = draw(st.one_of(st.integers(0, 16).map(u32), st.binary(min_size=1, max_size=4)))
        edits.append((pos, value))
    cut = draw(st.one_of(st.none(), st.none(), st.integers(0, len(valid.data))))
    return edits, cut


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_headers_fail_cleanly(valid, data):
    edits, cut = data.draw(mutations(valid))
    read_like_the_cli(valid.write(edits, cut))


def test_metadata_that_lies_about_sizes_fails_before_the_model_is_allocated(tmp_path):
    """feed_forward_length = 2**31 would mean a 10^12-parameter MLP: the shapes are checked on a
    meta-device model first, so the load stops with one line instead of allocating."""
    from edgequant.assets import default_gguf
    from edgequant.models import load_gguf

    real = read_gguf(default_gguf())
    field = real.fields["llama.feed_forward_length"]
    data = bytearray(default_gguf().read_bytes())
    at = offset(real, field.parts[-1])
    data[at : at + 4] = u32(2**31)
    lying = tmp_path / "lying.gguf"
    lying.write_bytes(bytes(data))
    with pytest.raises(EdgequantError, match=r"tensor blk\.0\.ffn_gate\.weight is \(1536, 576\) but the metadata implies \(2147483648, 576\)"):
        load_gguf(lying)


def test_our_reader_reads_what_gguf_pys_reads(valid):
    """read_gguf reads through a plain view of the memory map (four times faster on a tokenizer);
    every field and tensor must come out as gguf-py's own reader gives them."""
    import gguf
    import numpy as np

    from edgequant.assets import default_gguf
    from edgequant.models import gguf_tensor_infos

    ours, theirs = read_gguf(default_gguf()), gguf.GGUFReader(default_gguf())
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert ours.fields[name].contents() == field.contents(), name
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    assert [(t.name, t.n_elements, t.n_bytes) for t in gguf_tensor_infos(default_gguf())] == \
        [(t.name, int(t.n_elements), int(t.n_bytes)) for t in theirs.tensors]
