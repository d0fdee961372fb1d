"""The main job end to end on stories260K (conf/study_quick.yaml), resuming, and the report."""

import json

import pytest
from hydra import compose, initialize_config_dir

from spd.config import CONF_DIR, as_dataclass
from spd.report import run_report
from spd.study import run_study


def quick(tmp_path, *overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("study_quick", overrides=[
            f"study.shared_dir={tmp_path / 'shared'}", "eval.limit=8", "ppl.limit=5", "calib.num_samples=4",
            "distill.epochs=1", *overrides])
    cfg = as_dataclass(cfg)
    cfg.run_dir = str(tmp_path / "study" / f"{cfg.spd.fraction}-{cfg.study.strategy}")
    return cfg


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cfg = quick(tmp, "spd.fraction=1.0", "study.strategy=b2b_hg", "spd.sb_count=2", "spd.esb_count=1")
    return tmp, cfg, run_study(cfg)


def test_pipeline_writes_every_artifact(done):
    tmp, cfg, summary = done
    job = tmp / "study" / "1.0-b2b_hg"
    for name in ("config.yaml", "meta.json", "plan.json", "distill.json", "perplexity.json", "eval/results.json",
                 "model/config.json", "model/model.safetensors", "study.json"):
        assert (job / name).is_file(), name
    assert summary["spd_blocks"] == 5 and summary["strategy"] == "b2b_hg"
    plan = json.loads((job / "plan.json").read_text())
    assert sorted(plan["tiers"].values()) == ["ESB", "ISB", "ISB", "SB", "SB"]
    exported = json.loads((job / "model" / "config.json").read_text())["spd_plan"]
    assert exported["tp"] == 2 and len(exported["head_perm"]) == 1  # head grouping ran on the ESB block
    assert summary["eval"]["tasks"]["spd_tinystories_cloze"]["acc"]["value"] >= 0


def test_rerun_skips_complete_stages(done):
    tmp, cfg, _ = done
    job = tmp / "study" / "1.0-b2b_hg"
    stamps = {p: p.stat().st_mtime_ns for p in (job / "perplexity.json", job / "eval" / "results.json",
                                                  job / "distill.json", job / "model" / "model.safetensors")}
    run_study(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_sweep_jobs_share_the_ranking_and_distilled_blocks(done):
    tmp, _, _ = done
    rankings = list((tmp / "shared").glob("*/*/rank-*/sensitivity.json"))
    manifest = next((tmp / "shared").glob("*/*/distill-b2b_hg-*/manifest.json"))
    before = json.loads(manifest.read_text())["blocks"]
    cfg = quick(tmp, "spd.fraction=0.6", "study.strategy=b2b_hg", "spd.sb_count=2", "spd.esb_count=1",
                "study.evaluate=false", "study.export=false")
    run_study(cfg)
    assert list((tmp / "shared").glob("*/*/rank-*/sensitivity.json")) == rankings
    assert len(list((tmp / "shared").glob("*/activations-*/complete.json"))) == 1  # captured once, reopened
    after = json.loads(manifest.read_text())["blocks"]
    same = [k for k in before if k in after and before[k]["hg"] == after[k]["hg"]]
    assert same and all(after[k] == before[k] for k in same)  # reused, not retrained (same minutes, losses)


def test_report_reads_artifacts_only(done, tmp_path):
    tmp, cfg, _ = done
    cfg.report.studies = [str(tmp / "study" / "*" / "study.json")]
    cfg.report.rankings = [str(tmp / "shared" / "*" / "*" / "rank-*" / "sensitivity.json")]
    cfg.report.bench, cfg.report.planners, cfg.report.baselines = [], [], []
    cfg.report.out_dir = str(tmp_path / "report")
    md = run_report(cfg).read_text()
    assert "| stories260k | 2 | backward | 5 (100%) | b2b_hg |" in md
    assert (tmp_path / "report" / "sensitivity_stories260k_tp2_backward.png").is_file()
