"""GGUF from scratch against the gguf package (bit-exact with llama.cpp), and llama.cpp's pipeline on the embedded model."""

import numpy as np
import pytest
import torch

from quantlesson import LessonError
from quantlesson.scratch import gguf_blocks

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    x[1, 5] = 40.0  # an outlier
    x[2, :32] = np.linspace(-1, 1, 32)  # exact halves after scaling
    return x


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("through_f16", [False, True])
def test_blocks_are_byte_identical_to_gguf(weights, kind, through_f16):
    x = weights.astype(np.float16).astype(np.float32) if through_f16 else weights
    ours = {"Q8_0": gguf_blocks.quantize_q8_0, "Q4_0": gguf_blocks.quantize_q4_0}[kind](x)
    library = gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind]).reshape(ours.shape)
    assert np.array_equal(ours, library)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_dequantize_matches_gguf_and_bits_per_weight(weights, kind):
    quantize, dequantize = {"Q8_0": (gguf_blocks.quantize_q8_0, gguf_blocks.dequantize_q8_0),
                            "Q4_0": (gguf_blocks.quantize_q4_0, gguf_blocks.dequantize_q4_0)}[kind]  # fmt: skip
    data = quantize(weights)
    library = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).reshape(-1, 32)
    assert np.array_equal(dequantize(data), library)
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    assert data.shape[1] == type_size and gguf_blocks.bits_per_weight(type_size, block_size) == {"Q8_0": 8.5, "Q4_0": 4.5}[kind]
    step = np.abs(data[:, :2].copy().view(np.float16).astype(np.float32))  # each block's scale
    assert np.all(np.abs(dequantize(data) - weights.reshape(-1, 32)) <= step * (0.6 if kind == "Q8_0" else 1.1) + 1e-6)  # half a step (one at Q4_0's clamped end), plus the fp16 scale


def test_written_file_is_byte_identical_to_gguf_writer(weights, tmp_path):
    metadata = {"general.architecture": "llama", "general.name": "toy", "llama.block_count": 4, "toy.scale": 1.5, "toy.flag": True}
    ours = gguf_blocks.write_gguf(tmp_path / "ours.gguf", metadata, {
        "a": (weights, "Q8_0"), "b": (weights, "Q4_0"), "c": (weights[0], "F32"), "d": (weights[:2], "F16")})
    writer = gguf.GGUFWriter(str(tmp_path / "theirs.gguf"), arch="llama")
    writer.add_name("toy")
    writer.add_block_count(4)
    writer.add_float32("toy.scale", 1.5)
    writer.add_bool("toy.flag", True)
    writer.add_tensor("a", gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("b", gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_0), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("c", weights[0])
    writer.add_tensor("d", weights[:2].astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert ours.read_bytes() == (tmp_path / "theirs.gguf").read_bytes()
    reader = gguf.GGUFReader(str(ours))
    assert reader.fields["general.name"].contents() == "toy"
    assert [t.name for t in reader.tensors] == ["a", "b", "c", "d"]
    assert np.array_equal(reader.tensors[2].data, weights[0])


def test_bad_input_gets_a_clear_error_and_no_file(weights, tmp_path):
    with pytest.raises(LessonError, match="multiple of 32"):
        gguf_blocks.quantize_q4_0(weights[:, :40])
    with pytest.raises(LessonError, match="Unknown tensor type"):
        gguf_blocks.write_gguf(tmp_path / "x.gguf", {}, {"a": (weights, "Q4_K")})
    with pytest.raises(LessonError, match="int, float, bool and str"):
        gguf_blocks.write_gguf(tmp_path / "x.gguf", {"a": [1, 2]}, {})
    assert list(tmp_path.iterdir()) == []


def test_q8_0_rounds_like_c_roundf_just_below_a_half():
    """0.49999997 (the float32 just below 0.5) rounds to 0 in C's roundf; floor(x + 0.5) gives 1 in float32."""
    x = np.float32(0.49999997)
    assert gguf_blocks.round_half_away(np.array([x, -x, 0.5, -0.5, 1.5, 2.5], dtype=np.float32)).tolist() == [0, 0, 1, -1, 2, 3]
    block = np.zeros((1, 32), dtype=np.float32)
    block[0, 0], block[0, 1] = 127, x  # d = 1: the second code is round(0.49999997)
    assert np.array_equal(gguf_blocks.quantize_q8_0(block), gguf.quants.quantize(block, gguf.GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("seed", range(3))
def test_q8_0_is_byte_identical_on_values_next_to_halves(seed):
    """Random blocks whose scaled values lie one float32 step either side of k + 0.5, where rounding is most fragile."""
    rng = np.random.default_rng(seed)
    halves = rng.integers(-127, 127, (64, 31)).astype(np.float32) + np.float32(0.5)
    x = np.concatenate([np.full((64, 1), 127, np.float32), np.nextafter(halves, rng.choice([-np.inf, np.inf], halves.shape).astype(np.float32))], axis=1)
    x *= rng.uniform(0.01, 2, (64, 1)).astype(np.float32)
    assert np.array_equal(gguf_blocks.quantize_q8_0(x), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))


def test_failed_write_leaves_no_partial_file(weights, tmp_path, monkeypatch):
    """However writing stops (an error, Ctrl-C), neither the file nor <name>.partial is left behind."""
    import builtins

    real_open = builtins.open

    class Interrupted:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise KeyboardInterrupt

    for failure in ("write", "rename"):
        with monkeypatch.context() as m:
            if failure == "write":
                m.setattr(builtins, "open", Interrupted)
            else:
                m.setattr(type(tmp_path), "replace", lambda self, target: (_ for _ in ()).throw(OSError("disk full")))
            with pytest.raises((KeyboardInterrupt, OSError)):
                gguf_blocks.write_gguf(tmp_path / "x.gguf", {"general.name": "toy"}, {"a": (weights, "Q8_0")})
        assert list(tmp_path.iterdir()) == []


def test_torch_tensors_are_accepted_from_any_device(weights):
    """A torch weight (float32 or bfloat16, on a GPU or not) is brought to the CPU as float32 first."""
    w = torch.from_numpy(weights)
    assert np.array_equal(gguf_blocks.quantize_q8_0(w), gguf_blocks.quantize_q8_0(weights))
    assert np.array_equal(gguf_blocks.quantize_q4_0(w.bfloat16()), gguf_blocks.quantize_q4_0(w.bfloat16().float().numpy()))


BAD_INPUTS = [
    (lambda w, p: gguf_blocks.quantize_q8_0(np.float32(1.0)), "multiple of 32"),
    (lambda w, p: gguf_blocks.quantize_q8_0(np.full((2, 32), np.nan, np.float32)), "NaN or infinite"),
    (lambda w, p: gguf_blocks.quantize_q4_0(w[:, :40]), "multiple of 32"),
    (lambda w, p: gguf_blocks.dequantize_q8_0(gguf_blocks.quantize_q4_0(w)), "[n_blocks, 34]"),
    (lambda w, p: gguf_blocks.dequantize_q4_0(gguf_blocks.quantize_q8_0(w)), "[n_blocks, 18]"),
    (lambda w, p: gguf_blocks.write_gguf(p, {"n": -1}, {}), "uint32"),
    (lambda w, p: gguf_blocks.write_gguf(p, {"n": 2**32}, {}), "uint32"),
    (lambda w, p: gguf_blocks.write_gguf(p, {"x": 1e39}, {}), "float32"),
    (lambda w, p: gguf_blocks.write_gguf(p, {3: "three"}, {}), "keys"),
    (lambda w, p: gguf_blocks.write_gguf(p, {}, {"a": (w, "Q4_K")}), "Unknown tensor type"),
    (lambda w, p: gguf_blocks.write_gguf(p, {"a": [1, 2]}, {}), "int, float, bool and str"),
    (lambda w, p: gguf_blocks.write_gguf(p, {}, {"a": w}), "(array, type)"),
]


@pytest.mark.parametrize("call,phrase", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_is_a_lesson_error_that_says_what_to_do(weights, tmp_path, call, phrase):
    with pytest.raises(LessonError) as caught:
        call(weights, tmp_path / "x.gguf")
    assert phrase in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# --- llama.cpp itself, through llama-cpp-python --------------------------------------------------

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def converted(embedded, tmp_path_factory):
    from quantlesson import llamacpp

    model, tokenizer = embedded
    folder = tmp_path_factory.mktemp("gguf")
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    return llamacpp.convert(folder / "hf", folder / "f16.gguf", pre_tokenizer="gpt-2")


def test_converted_model_computes_what_transformers_computes(embedded, converted):
    from quantlesson import data, evaluate, llamacpp

    model, tokenizer = embedded
    ids = data.evaluation_tokens(tokenizer, max_tokens=1024)
    ref = evaluate.reference(model, ids, progress=False)
    runner = llamacpp.LlamaCppModel(converted)
    quality = evaluate.compare(runner, ref, progress=False)
    assert quality["kld"] < 1e-5 and quality["top1"] > 0.995  # f16 weights: tiny rounding differences only
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"
    assert runner.llm.tokenize(text.encode(), add_bos=False) == tokenizer(text, add_special_tokens=False)["input_ids"]
    runner.close()


def test_quantize_types_and_errors(converted, tmp_path):
    from quantlesson import llamacpp

    q8 = llamacpp.quantize(converted, tmp_path / "q8.gguf", "Q8_0")
    table = llamacpp.tensor_table(q8)
    assert set(table[table["name"].str.endswith("attn_q.weight")]["type"]) == {"Q8_0"}
    assert llamacpp.bits_per_weight(q8) == pytest.approx(8.5)
    with pytest.raises(LessonError, match="Unknown GGUF type"):
        llamacpp.quantize(converted, tmp_path / "x.gguf", "Q4_K_XL")
    with pytest.raises(LessonError, match="needs an importance matrix"):
        llamacpp.quantize(converted, tmp_path / "x.gguf", "IQ2_XS")
    with pytest.raises(LessonError, match="failed"):
        llamacpp.quantize(tmp_path / "missing.gguf", tmp_path / "x.gguf", "Q4_0")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.partial"))


def test_server_answers_like_the_library_and_stops(converted):
    """llama-server's greedy completion is llama-cpp-python's, through the OpenAI-compatible API; bounded and local."""
    from quantlesson import llamacpp

    prompt = "def fibonacci(n):"
    library = llama_cpp.Llama(model_path=str(converted), n_ctx=512, verbose=False)
    expected = library.create_completion(prompt, max_tokens=12, temperature=0)["choices"][0]["text"]
    library.close()
    with llamacpp.Server(converted, start_timeout=60, request_timeout=60) as server:
        assert server.url.startswith("http://127.0.0.1:")
        reply = server.complete(prompt, max_tokens=12)
        chat = server.chat([{"role": "user", "content": "hello"}], max_tokens=4)
    assert reply["choices"][0]["text"] == expected
    assert reply["usage"]["completion_tokens"] == 12 and chat["object"] == "chat.completion"
    assert server.process.poll() is not None  # stopped when the block ended
    with pytest.raises(OSError):
        llamacpp._request(f"{server.url}/models", None, timeout=2)


def test_server_errors_say_what_to_do(tmp_path):
    from quantlesson import llamacpp

    with pytest.raises(LessonError, match="No GGUF file"):
        llamacpp.Server(tmp_path / "missing.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    server = llamacpp.Server(broken, start_timeout=30)
    with pytest.raises(LessonError, match="llama-server"):
        server.__enter__()
    assert server.process.poll() is not None  # nothing left running


def test_unknown_tokenizer_needs_the_pre_tokenizer_name(embedded, converted, tmp_path):
    """The converter refuses the lesson's own tokenizer unless told its pre-tokenizer (see llamacpp.convert)."""
    from quantlesson import llamacpp

    with pytest.raises(LessonError, match="pre-tokenizer was not recognized"):
        llamacpp.convert(converted.parent / "hf", tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())
    with pytest.raises(LessonError, match="no config.json"):
        llamacpp.convert(tmp_path, tmp_path / "x.gguf")


def test_transformers_dequantizes_gguf_on_load(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    from quantlesson import llamacpp

    llamacpp.quantize(converted, converted.parent / "q8.gguf", "Q8_0")
    loaded = AutoModelForCausalLM.from_pretrained(str(converted.parent), gguf_file="q8.gguf", dtype=torch.float32)
    reader = gguf.GGUFReader(str(converted.parent / "q8.gguf"))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").weight.dtype == torch.float32
    assert np.array_equal(loaded.get_submodule("model.layers.0.mlp.down_proj").weight.detach().numpy(), expected)


def test_converter_comes_from_a_clone_or_the_pinned_sdist_without_network(tmp_path, monkeypatch):
    """LLAMA_CPP_DIR wins; else the converter is unpacked from the sdist kept in the cache (no download)."""
    import io
    import subprocess
    import tarfile

    from quantlesson import llamacpp

    monkeypatch.setenv("QUANTLESSON_CACHE", str(tmp_path / "cache"))
    clone = tmp_path / "clone"
    clone.mkdir()
    monkeypatch.setenv("LLAMA_CPP_DIR", str(clone))
    with pytest.raises(LessonError, match="no convert_hf_to_gguf.py"):
        llamacpp.source_folder()
    (clone / "convert_hf_to_gguf.py").write_text("")
    assert llamacpp.source_folder() == clone

    monkeypatch.delenv("LLAMA_CPP_DIR")
    version = llamacpp.package_version()
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(downloads / f"llama_cpp_python-{version}.tar.gz", "w:gz") as archive:
        for name in ("convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py", "README.md"):
            info = tarfile.TarInfo(prefix + name)
            info.size = 1
            archive.addfile(info, io.BytesIO(b"#"))

    def no_network(*args, **kwargs):
        raise AssertionError("the converter must come from the kept sdist, not a download")

    monkeypatch.setattr(subprocess, "run", no_network)
    folder = llamacpp.source_folder()
    assert folder == tmp_path / "cache" / f"llama.cpp-{version}"
    assert (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert not (folder / "README.md").exists()  # only the converter and its packages are kept
