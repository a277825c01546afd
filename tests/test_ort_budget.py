"""ONNX Runtime's memory, as the planner predicts it (edgequant.ort_budget), against ONNX Runtime itself."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edgequant import ort_budget
from edgequant.benchmark import PROBE
from edgequant.ggml_quants import get_type
from edgequant.planning import Matrix, Plan

def one_matrix_model(path, name: str, rows: int, cols: int = 4096) -> int:
    """A model of one ``MatMulNBits`` in configuration ``name`` (random codes), its data in a file
    beside it as our exporter writes it; returns the data's bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    qtype = get_type(name)
    rng = np.random.default_rng(0)
    n_blocks = cols // qtype.block
    arrays = {"B": rng.integers(0, 256, (rows, n_blocks, qtype.block * qtype.bits // 8), dtype=np.uint8),
              "S": rng.random(rows * n_blocks, dtype=np.float32)}
    if qtype.zero_points:
        arrays["Z"] = rng.integers(0, 256, (rows, qtype.zp_bytes(n_blocks)), dtype=np.uint8)
    inits = [numpy_helper.from_array(a, k) for k, a in arrays.items()]
    node = helper.make_node("MatMulNBits", ["A", *arrays], ["Y"], domain="com.microsoft", K=cols, N=rows,
                            bits=qtype.bits, block_size=qtype.block, accuracy_level=4)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, cols])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, rows])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    assert sum(a.nbytes for a in arrays.values()) == qtype.tensor_bytes(rows, cols)
    return qtype.tensor_bytes(rows, cols)


def resident(path) -> int:
    """What making a session of ``path`` adds to a fresh process's resident memory (runtimes/probe.py)."""
    done = subprocess.run([sys.executable, str(PROBE), "session", str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["session_bytes"]


@pytest.mark.parametrize("name", ["MNB4_B32_SYM", "MNB4_B64_ZP", "MNB4_B256_SYM", "MNB8_B32_SYM"])
def test_a_matrix_holds_its_stored_bytes_and_12_more_a_block_once_prepacked(tmp_path, name):
    # the growth from 4096 to 12288 rows, so that what any session holds cancels out
    grown = []
    for rows in (4096, 12288):
        (tmp_path / str(rows)).mkdir()
        path = tmp_path / str(rows) / "m.onnx"
        grown.append((one_matrix_model(path, name, rows), resident(path)))
    (stored0, held0), (stored1, held1) = grown
    blocks = 8192 * 4096 // get_type(name).block
    assert held1 - held0 == pytest.approx(stored1 - stored0 + ort_budget.PACKED_BYTES_PER_BLOCK * blocks, rel=0.03)



def test_only_the_matrices_a_matmul_multiplies_are_prepacked():
    """An untied input embedding is only looked up (no prepacking); a tied one is the output
    matrix too, and its codes also stay mapped for the lookup."""
    q, embd, out = Matrix("blk.0.attn_q.weight", 256, 256), Matrix("token_embd.weight", 1000, 256), Matrix("output.weight", 1000, 256)
    blocks = 256 // 32  # a row's blocks at MNB4_B32_SYM

    def plan(*matrices):
        return Plan({m.name: "MNB4_B32_SYM" for m in matrices}, list(matrices), 0, "uniform")

    untied, tied = plan(q, embd, out), plan(q, embd)
    assert ort_budget.weight_bytes(untied) == untied.total_bytes + 12 * blocks * (256 + 1000)
    assert ort_budget.weight_bytes(tied) == tied.total_bytes + 12 * blocks * (256 + 1000) + 1000 * 256 // 2
    assert ort_budget.decode_read_bytes(untied) == untied.total_bytes - untied.matrix_bytes(embd)
    assert ort_budget.decode_read_bytes(tied) == tied.total_bytes
