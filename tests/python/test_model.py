"""Model loading and the HF oracle fixtures through Python (as phi3-core/tests/oracle.rs)."""

import numpy as np
import pytest

import phi3
from conftest import FIXTURES

FIXTURE_MODELS = ["gqa-longrope-bf16", "mha-f32-tied", "partial-rotary-f16", "sliding-window-f32"]
MAX_REL_L2 = 1e-4


def oracle(name):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    return safetensors_numpy.load_file(str(FIXTURES / name / "oracle.safetensors"))


def rel_l2(ours, ref):
    return float(np.linalg.norm(ours.astype(np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_logits_match_hf_token_by_token(name):
    model = phi3.Model(FIXTURES / name, device="cpu")
    o = oracle(name)
    tokens, logits = o["tokens"].tolist(), o["logits"]
    assert model.vocab_size == logits.shape[1]
    s = model.session()
    worst = 0.0
    for i, t in enumerate(tokens):
        row = s.append_tokens([t])
        assert row.dtype == np.float32 and row.shape == (model.vocab_size,)
        worst = max(worst, rel_l2(row, logits[i]))
    assert worst < MAX_REL_L2, f"{name}: relative L2 {worst:.2e}"
    assert s.tokens == tokens and len(s) == len(tokens)


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_logits_match_hf_prefill_fork_truncate(name):
    model = phi3.Model(str(FIXTURES / name), device="cpu")
    o = oracle(name)
    tokens, logits = o["tokens"].tolist(), o["logits"]
    s = model.session()
    assert rel_l2(s.append_tokens(tokens), logits[-1]) < MAX_REL_L2
    half = len(tokens) // 2
    f = model.session()
    f.append_tokens(tokens[:half])
    g = f.fork()
    assert rel_l2(g.append_tokens(tokens[half:]), logits[-1]) < MAX_REL_L2
    assert len(f) == half
    s.truncate(half)
    assert rel_l2(s.logits(), logits[half - 1]) < MAX_REL_L2


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_greedy_continuation_matches_hf(name):
    model = phi3.Model(FIXTURES / name, device="cpu")
    o = oracle(name)
    s = model.session()
    row = s.append_tokens(o["greedy_prompt"])  # a numpy int64 array is accepted too
    out = []
    for _ in range(len(o["greedy_tokens"])):
        out.append(int(np.argmax(row)))
        row = s.append_tokens([out[-1]])
    assert out == o["greedy_tokens"].tolist()


def test_fixture_model_has_no_tokenizer():
    model = phi3.Model(FIXTURES / "mha-f32-tied", device="cpu")
    with pytest.raises(phi3.UnsupportedError, match="tokenizer"):
        model.tokenizer
    s = model.session()
    with pytest.raises(phi3.UnsupportedError):
        s.append_text("hello")


def test_demo_model(demo):
    assert demo.path is None
    assert demo.device.startswith("cpu")
    assert demo.max_context == 4096
    assert demo.tokenizer is demo.tokenizer
    assert demo.vocab_size >= demo.tokenizer.vocab_size
    assert "Model.demo" in repr(demo)
    assert phi3.Model.demo(max_context=100).max_context == 100


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(phi3.IoError, match="no-such-model") as e:
        phi3.Model(tmp_path / "no-such-model")
    assert isinstance(e.value, OSError)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(phi3.ModelFormatError, match="config.json"):
        phi3.Model(tmp_path)


def test_bad_load_arguments_raise_before_loading(tmp_path):
    missing = tmp_path / "missing"  # loading it would be an IoError
    with pytest.raises(phi3.InvalidArgumentError, match="tpu") as e:
        phi3.Model(missing, device="tpu")
    assert isinstance(e.value, ValueError)
    with pytest.raises(phi3.InvalidArgumentError, match="int3"):
        phi3.Model(missing, weights="int3")
    # An already-quantized folder is not quantized again into another format.
    with pytest.raises(phi3.InvalidArgumentError, match="already quantized"):
        phi3.Model(FIXTURES / "quant" / "model-awq-g32", device="cpu", weights="int8")
    with pytest.raises(phi3.InvalidArgumentError, match="max_context"):
        phi3.Model(missing, max_context=0)
    with pytest.raises(phi3.InvalidArgumentError, match="max_context"):
        phi3.Model.demo(max_context=-5)
    with pytest.raises(TypeError):
        phi3.Model(123)
    with pytest.raises(TypeError):
        phi3.Model.demo(device=0)



def test_cuda_device_loads_or_raises_cleanly():
    # Without a CUDA backend (or device) this is an ordinary error naming the device.
    try:
        model = phi3.Model.demo(device="cuda:0")
    except (phi3.UnsupportedError, phi3.DeviceError) as e:
        assert "cuda" in str(e)
    else:
        assert "cuda" in model.device.lower()


def test_quantized_weights():
    """weights= quantizes the projections at load time; logits stay close to the native model's."""
    native = phi3.Model.demo(device="cpu")
    assert native.weights == "native"
    ids = native.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    want = native.session().append_tokens(ids)
    cases = [("int8", "int8", 0.02), ("int4", "int4-g128", 0.25), ("int4-g32", "int4-g32", 0.25)]
    for weights, name, bound in cases:
        m = phi3.Model.demo(device="cpu", weights=weights)
        assert m.weights == name
        assert m.weight_bytes < native.weight_bytes
        got = m.session().append_tokens(ids)
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        assert err < bound, (weights, err)
    # No int4 group divides this fixture's 112-wide down_proj rows: refused, naming the tensor.
    with pytest.raises(phi3.InvalidArgumentError, match="down_proj"):
        phi3.Model(FIXTURES / "gqa-longrope-bf16", device="cpu", weights="int4-g32")
    m = phi3.Model(FIXTURES / "gqa-longrope-bf16", device="cpu", weights="int8")
    assert m.weights == "int8"


def test_quantize_writes_a_folder_that_loads_as_stored(tmp_path):
    out = tmp_path / "q"
    summary = phi3.quantize(FIXTURES / "mha-f32-tied", out, weights="int4-g32")
    assert summary["format"] == "int4-g32" and summary["quantized"] == 8
    assert summary["bytes_out"] < summary["bytes_in"]
    stored = phi3.Model(out, device="cpu")
    at_load = phi3.Model(FIXTURES / "mha-f32-tied", device="cpu", weights="int4-g32")
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    a = stored.session().append_tokens(tokens)
    b = at_load.session().append_tokens(tokens)
    assert np.array_equal(a, b)
    with pytest.raises(phi3.InvalidArgumentError, match="already exists"):
        phi3.quantize(FIXTURES / "mha-f32-tied", out, weights="int8")
    with pytest.raises(phi3.InvalidArgumentError, match="int4"):
        phi3.quantize(FIXTURES / "mha-f32-tied", tmp_path / "q8", weights="int8", awq=True)
    with pytest.raises(phi3.InvalidArgumentError):
        phi3.quantize(FIXTURES / "mha-f32-tied", tmp_path / "qn", weights="native")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    head = phi3.quantize(FIXTURES / "partial-rotary-f16", tmp_path / "h", "int8", lm_head=True)
    plain = phi3.quantize(FIXTURES / "partial-rotary-f16", tmp_path / "p", "int8")
    assert head["quantized"] == plain["quantized"] + 1


def test_kv_usage_and_memory_budget():
    unlimited = phi3.Model.demo(device="cpu")
    u = unlimited.kv_usage()
    assert isinstance(u, phi3.KvUsage)
    assert u.block_tokens > 0 and u.block_bytes > 0
    assert u.max_blocks is None and u.blocks_in_use == 0
    assert u.as_dict()["block_bytes"] == u.block_bytes
    assert "KvUsage(" in repr(u)

    model = phi3.Model.demo(device="cpu", kv_memory=2 * u.block_bytes)
    bt = u.block_tokens
    s = model.session()
    s.append_tokens(list(range(5, 5 + 2 * bt)))
    used = model.kv_usage()
    assert (used.max_blocks, used.blocks_in_use) == (2, 2)
    assert used.steps >= 1 and used.sequences >= used.steps and used.max_batch >= 1
    before, logits = s.tokens, s.logits()
    with pytest.raises(phi3.OutOfMemoryError, match="KV memory") as e:
        s.append_tokens([5])
    assert isinstance(e.value, MemoryError)
    assert s.tokens == before and np.array_equal(s.logits(), logits)
    fork = s.fork()  # copy-on-write: no new blocks
    assert model.kv_usage().blocks_in_use == 2
    s.truncate(bt)
    del fork
    assert model.kv_usage().blocks_in_use == 1

    with pytest.raises(phi3.InvalidArgumentError, match="KV"):
        phi3.Model.demo(device="cpu", kv_memory=1)
    with pytest.raises(phi3.InvalidArgumentError, match="kv_memory"):
        phi3.Model.demo(device="cpu", kv_memory=0)
    with pytest.raises(TypeError):
        phi3.Model.demo("cpu", None, "native", 1 << 20)  # keyword-only


def test_prefill_chunk_sets_the_passes_of_a_prompt_not_its_logits():
    default = phi3.Model.demo(device="cpu")
    assert default.prefill_chunk == 512
    small = phi3.Model.demo(device="cpu", prefill_chunk=9)
    assert small.prefill_chunk == 9
    prompt = list(range(5, 5 + 40))
    steps = small.kv_usage().steps
    a, b = default.session(), small.session()
    a.append_tokens(prompt)
    b.append_tokens(prompt)
    assert small.kv_usage().steps - steps == 5  # 40 tokens in passes of at most 9
    # The last pass holds 4 tokens, which run as decode rows (a dot product each) instead of the
    # prefill GEMM: the same values to rounding, not bit for bit.
    np.testing.assert_allclose(a.logits(), b.logits(), rtol=1e-5, atol=1e-5)
    for bad in (0, -3, 65537):
        with pytest.raises(phi3.InvalidArgumentError, match="prefill_chunk"):
            phi3.Model.demo(device="cpu", prefill_chunk=bad)
