"""spd.placement: a model split over devices by accelerate (here the CPU and disk offload, the only devices a
CI machine has) gives what the undispatched model gives in every stage: logits (dense and SPD), the ranking,
head grouping + distillation (trained on the offloaded block's execution device, written back to the offload
files), perplexity, lm-eval scoring and the export. fp32 on one CPU: the same ops in the same order, so the
tolerance is float rounding (1e-5 relative), not a loose bound."""

from dataclasses import replace

import pytest
import torch

from spd.activations import capture_hidden_states
from spd.block import decoder_layers
from spd.config import DistillConfig, ModelConfig
from spd.distill import distill_blocks_
from spd.errors import ModelLoadError
from spd.export import export_, load_exported
from spd.load import load_model, model_config_by_name
from spd.perplexity import calibration_inputs, document_perplexity, prefix_token
from spd.placement import is_offloaded
from spd.plan import SPDPlan
from spd.sensitivity import rank_blocks
from spd.surgery import apply_plan_

SAME = 1e-5
# stories260K's 5 blocks: 0, 2 and 4 on the disk, the rest (and the embedding, norm and head) in memory
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
         **{f"model.layers.{i}": "disk" if i % 2 == 0 else "cpu" for i in range(5)}}


def models(tmp_path, device_map=SPLIT, **kw):
    cfg = replace(model_config_by_name("stories260k"), device="cpu")
    plain, tok = load_model(cfg)
    placed, _ = load_model(replace(cfg, device_map=device_map, offload_dir=str(tmp_path / "offload"), **kw))
    return plain, placed, tok


@torch.no_grad()
def close(a, b):
    return torch.allclose(a, b, rtol=SAME, atol=SAME * float(b.abs().max()))


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 512, (4, 64), generator=g)


def test_split_model_gives_the_same_logits_dense_and_spd(tmp_path, tokens):
    plain, placed, _ = models(tmp_path)
    assert is_offloaded(placed) and decoder_layers(placed)[0].self_attn.q_proj.weight.is_meta
    assert close(placed(tokens).logits, plain(tokens).logits)
    plan = SPDPlan(tp=2, num_layers=5, tiers={0: "ISB", 1: "SB", 4: "ISB"})
    for m in (plain, placed):
        apply_plan_(m, plan)
    assert close(placed(tokens).logits, plain(tokens).logits)


def test_auto_map_within_max_memory_offloads_and_matches(tmp_path, tokens):
    plain, placed, _ = models(tmp_path, device_map="sequential", max_memory={"cpu": "400KiB"})
    assert "disk" in placed.hf_device_map.values() and "cpu" in placed.hf_device_map.values()
    where = [placed.hf_device_map.get(f"model.layers.{j}") for j in range(5)]
    assert where == sorted(where, key=lambda d: d != "disk")  # offloaded blocks first: ranking steps run them least
    assert close(placed(tokens).logits, plain(tokens).logits)


def test_split_model_ranks_the_same(tmp_path, tokens):
    plain, placed, _ = models(tmp_path)
    inputs = calibration_inputs(tokens, prefix_token(config=plain.config))
    r = [rank_blocks(m, tokens, 2, "backward", 2, store=capture_hidden_states(m, inputs, range(5), 2, progress=False))
         for m in (plain, placed)]
    assert r[0]["order"] == r[1]["order"]
    for a, b in zip(r[0]["blocks"], r[1]["blocks"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=SAME)


def test_split_model_distills_perplexes_scores_and_exports_the_same(tmp_path, tokens):
    from lm_eval.api.instance import Instance

    from spd.lm_eval_model import SPDLM

    plain, placed, tok = models(tmp_path)
    plan = SPDPlan(tp=2, num_layers=5, tiers={0: "ESB", 1: "SB", 3: "ISB", 4: "SB"})
    cfg = DistillConfig(epochs=2, lr=1e-3, batch_size=2, max_rows=16)
    done = [distill_blocks_(m, plan, tokens, tmp_path / name, cfg, progress=False)
            for m, name in ((plain, "plain"), (placed, "placed"))]
    (p0, rep0), (p1, rep1) = done
    assert p0.head_perm == p1.head_perm and p0.head_perm  # block 0 (ESB, on disk) was grouped the same way
    for i in ("0", "1", "4"):  # trained on the same inputs with the same steps
        assert rep1["blocks"][i]["loss_after"] == pytest.approx(rep0["blocks"][i]["loss_after"], rel=1e-4)
        assert rep1["blocks"][i]["loss_after"] < rep1["blocks"][i]["loss_before"]
    assert decoder_layers(placed)[0].self_attn.q_proj.weight.is_meta  # written back to disk, off the device again
    assert close(placed(tokens).logits, plain(tokens).logits)

    docs = ["Once upon a time there was a little dog. He liked to play.", "The sun was hot. Lily went to the sea."]
    a, b = (document_perplexity(m, tok, docs, 64, 2, progress=False) for m in (plain, placed))
    assert b["token_perplexity"] == pytest.approx(a["token_perplexity"], rel=SAME)

    reqs = [Instance("loglikelihood", {}, ("Once upon a time", " there was a cat"), 0)]
    (ll0, _), (ll1, _) = (SPDLM(model=m, tokenizer=tok, batch_size=2, progress=False).loglikelihood(reqs)[0]
                          for m in (plain, placed))
    assert ll1 == pytest.approx(ll0, rel=SAME)

    export_(placed, tok, p1, tmp_path / "export")
    back, _, _ = load_exported(tmp_path / "export")
    assert close(back(tokens).logits, plain(tokens).logits)
    # the export, loaded split over devices by transformers (the hf source places while loading)
    cfg = ModelConfig(name="export", source="hf", path=str(tmp_path / "export"), device="cpu", device_map=SPLIT,
                      offload_dir=str(tmp_path / "offload"))
    again, _ = load_model(cfg)
    assert is_offloaded(again) and close(again(tokens).logits, plain(tokens).logits)


def test_bad_device_map_says_what_is_valid(tmp_path):
    cfg = replace(model_config_by_name("stories260k"), device="cpu")
    with pytest.raises(ModelLoadError, match="valid: null"):
        load_model(replace(cfg, device_map="everywhere"))
    with pytest.raises(ModelLoadError, match="model.layers.9"):
        load_model(replace(cfg, device_map={**SPLIT, "model.layers.9": "cpu"}))


def test_max_memory_from_the_command_line():
    from hydra import compose, initialize_config_dir

    from spd.config import CONF_DIR, as_dataclass
    from spd.placement import max_memory_of

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = as_dataclass(compose("study", overrides=["model.device_map=auto",
                                                       "++model.max_memory={0: 115GiB, cpu: 110GiB}"]))
    assert cfg.model.device_map == "auto" and max_memory_of(cfg.model) == {0: "115GiB", "cpu": "110GiB"}
