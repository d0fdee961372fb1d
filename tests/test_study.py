"""The main job end to end on stories260K (spd-study +experiment=quick): keyed artifacts, resuming, shared work, report."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
from hydra import compose, initialize_config_dir

import spd.study as study
from spd.config import CONF_DIR, as_dataclass
from spd.report import run_report
from spd.run import PROJECT_ROOT
from spd.study import run_study

SWEEP_SAME = 1e-5  # joblib's workers run torch with another thread count: sums differ in the last bits
STAGE_FILES = ("distill.json", "perplexity.json", "eval/summary.json", "model/model.safetensors")


def quick(tmp_path, *overrides, name="job"):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("study", overrides=["+experiment=quick",
            f"study.shared_dir={tmp_path / 'shared'}", "eval.limit=8", "ppl.limit=5", "calib.num_samples=4",
            "distill.epochs=1", *overrides])
    cfg = as_dataclass(cfg)
    cfg.run_dir = str(tmp_path / "study" / name)
    return cfg


def stamps(job):
    return {f: (job / f).stat().st_mtime_ns for f in STAGE_FILES}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cfg = quick(tmp, "spd.fraction=1.0", "study.strategy=b2b_hg", "spd.sb_count=2", "spd.esb_count=1")
    return tmp, cfg, run_study(cfg)


def test_pipeline_writes_every_artifact_with_its_key(done):
    tmp, cfg, summary = done
    job = tmp / "study" / "job"
    for name in ("config.yaml", "meta.json", "plan.json", "eval/results.json", "model/config.json",
                 "model/spd_export.json", "study.json", *STAGE_FILES):
        assert (job / name).is_file(), name
    assert summary["spd_blocks"] == 5 and summary["stages"] == {
        "rank": "computed", "distill": "computed", "perplexity": "computed", "eval": "computed", "export": "computed"}
    plan = json.loads((job / "plan.json").read_text())
    assert sorted(plan["tiers"].values()) == ["ESB", "ISB", "ISB", "SB", "SB"]
    assert len(plan["head_perm"]) == 1 and sorted(plan["weights"]) == sorted(
        i for i, t in plan["tiers"].items() if t != "ISB")  # the saved plan is the measured one
    exported = json.loads((job / "model" / "config.json").read_text())
    assert exported["spd_plan"]["head_perm"] == plan["head_perm"] and exported["spd_weights"]["weights"] == {
        i: w["sha256"] for i, w in plan["weights"].items()}
    results = json.loads((job / "eval" / "results.json").read_text())["results"]["spd_tinystories_cloze"]
    acc = summary["eval"]["tasks"]["spd_tinystories_cloze"]["acc"]["value"]
    assert acc == results["acc,none"] and 0.0 <= acc <= 1.0
    cost = summary["eval"]["cost"]  # every stage says what it cost: lm-eval's tokens forwarded and FLOP/s
    assert cost["tokens"] > 0 and cost["tokens_per_s"] > 0 and cost["tflop_per_s"] > 0
    ppl = json.loads((job / "perplexity.json").read_text())
    assert summary["perplexity"]["word_perplexity"] == ppl["word_perplexity"]
    assert math.isclose(ppl["word_perplexity"], math.exp(ppl["nll"] / ppl["words"]))
    for f in ("perplexity.json", "eval/summary.json", "model/spd_export.json", "distill.json"):
        art = json.loads((job / f).read_text())
        assert len(art["key"]) == 16 and len(art["settings"]) == 16, f
    mode = (job / "plan.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask() and (job / "model").stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unchanged_rerun_redoes_nothing(done):
    tmp, cfg, _ = done
    job = tmp / "study" / "job"
    before = stamps(job)
    summary = run_study(cfg)
    assert stamps(job) == before
    assert set(summary["stages"].values()) == {"reused"}


def test_changed_distill_setting_redoes_everything_downstream(done):
    tmp, cfg, first = done
    job = tmp / "study" / "lr"
    base = replace(cfg, run_dir=str(job))
    run_study(base)  # same settings as the fixture's job: everything shared is reused
    before = stamps(job)
    changed = replace(base, distill=replace(base.distill, lr=1e-2, epochs=2))
    summary = run_study(changed)
    after = stamps(job)
    assert all(after[f] != before[f] for f in STAGE_FILES)  # distill, perplexity, eval and export redone
    assert {k: v for k, v in summary["stages"].items() if k != "rank"} == {
        "distill": "computed", "perplexity": "computed", "eval": "computed", "export": "computed"}
    distill = json.loads((job / "distill.json").read_text())
    first_distill = json.loads((tmp / "study" / "job" / "distill.json").read_text())
    assert distill["settings"] != first_distill["settings"] and distill["key"] != first_distill["key"]
    assert all(len(b["epoch_losses"]) == 2 for b in distill["blocks"].values())  # epochs=2 ran
    assert summary["perplexity"] != first["perplexity"]  # new weights, new numbers
    config = (job / "config.yaml").read_text()
    assert "lr: 0.01" in config and "epochs: 2" in config


def test_killed_stage_is_redone_and_leaves_nothing(done, monkeypatch):
    tmp, cfg, _ = done
    job = tmp / "study" / "killed"
    cfg = replace(cfg, run_dir=str(job))
    import spd.evaluate as ev

    real_evaluate = ev.evaluate

    def killed(model, tokenizer, ecfg, run_dir, **kw):
        real_evaluate(model, tokenizer, ecfg, run_dir, **kw)  # results written into the stage's temporary dir
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg)
    assert not (job / "eval").exists() and not (job / "study.json").exists()
    assert not [p for p in job.iterdir() if p.name.startswith(".")]  # no temporary left behind
    monkeypatch.setattr(ev, "evaluate", real_evaluate)
    summary = run_study(cfg)
    assert summary["stages"]["eval"] == "computed" and summary["stages"]["perplexity"] == "reused"
    assert (job / "eval" / "summary.json").is_file()


def test_sweep_jobs_share_the_ranking_and_distilled_blocks(done):
    tmp, _, _ = done
    rankings = list((tmp / "shared").glob("*/*/rank-*/sensitivity.json"))
    manifest = next((tmp / "shared").glob("*/*/distill-*/manifest.json"))
    before = json.loads(manifest.read_text())["blocks"]
    cfg = quick(tmp, "spd.fraction=0.6", "study.strategy=b2b_hg", "spd.sb_count=2", "spd.esb_count=1",
                "study.evaluate=false", "study.export=false", name="f0.6")
    summary = run_study(cfg)
    assert summary["stages"]["rank"] == "reused" and summary["stages"]["eval"] == "off"
    assert list((tmp / "shared").glob("*/*/rank-*/sensitivity.json")) == rankings
    assert len(list((tmp / "shared").glob("*/activations-*/complete.json"))) == 1  # captured once, reopened
    after = json.loads(manifest.read_text())["blocks"]
    same = [k for k in before if k in after and before[k]["hg"] == after[k]["hg"]]
    assert same and all(after[k] == before[k] for k in same)  # reused, not retrained (same minutes, losses)


def test_kd_strategy_is_keyed_resumable_and_lowers_the_calibration_kl(done):
    """b2b_hg_kd: B2B + HG blocks from the shared folder, then KD; a re-run reuses it, a kd setting redoes it."""
    tmp, _, _ = done
    cfg = quick(tmp, "spd.fraction=1.0", "study.strategy=b2b_hg_kd", "spd.sb_count=2", "spd.esb_count=1",
                "study.evaluate=false", "study.export=false", "kd.steps=6", "kd.lr=1e-3", name="kd")
    first = run_study(cfg)
    job = tmp / "study" / "kd"
    kd = json.loads((job / "kd.json").read_text())
    assert first["stages"]["kd"] == "computed"
    assert kd["kl_after"] < kd["kl_before"] and kd["calibration_ppl_after"] < kd["calibration_ppl_before"]
    assert first["kd_minutes"] == kd["minutes"] > 0 and len(kd["losses"]) == 6
    plan = json.loads((job / "plan.json").read_text())
    assert sorted(plan["weights"]) == sorted(plan["tiers"]) and all(
        w["file"].startswith("kd/") for w in plan["weights"].values())  # the plan carries KD's weights
    again = run_study(cfg)
    assert again["stages"]["kd"] == "reused" and again["perplexity"] == first["perplexity"]
    changed = run_study(replace(cfg, kd=replace(cfg.kd, lr=2e-3)))
    assert changed["stages"]["kd"] == "computed" and changed["stages"]["perplexity"] == "computed"
    assert json.loads((job / "kd.json").read_text())["key"] != kd["key"]


def test_parallel_joblib_sweep_computes_shared_work_once(tmp_path):
    """Two jobs at once under Hydra's joblib launcher: one ranking, and the same results as serial runs."""
    common = ["eval.limit=4", "ppl.limit=3", "calib.num_samples=4",
              "distill.epochs=1", "spd.sb_count=1", "spd.esb_count=0", "study.strategy=b2b", "study.export=false"]
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")

    def spd_study(cwd, *args):
        cwd.mkdir()
        cmd = [sys.executable, "-m", "spd.cli", "study", "-m", "+experiment=quick", *common, *args]
        out = subprocess.run(cmd, cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return {p.parent.name: json.loads(p.read_text()) for p in cwd.glob("runs/study/*/*/*/study.json")}

    par = spd_study(tmp_path / "par", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    "spd.fraction=0.6,1.0")
    assert sorted(par) == ["backward-f0.6-b2b", "backward-f1.0-b2b"]
    assert sorted(s["stages"]["rank"] for s in par.values()) == ["computed", "reused"]
    assert len(list((tmp_path / "par").glob("runs/shared_quick/*/*/rank-*/sensitivity.json"))) == 1
    serial = spd_study(tmp_path / "ser", "spd.fraction=0.6,1.0")
    for name, s in serial.items():
        assert par[name]["plan"]["tiers"] == s["plan"]["tiers"], name
        for k, v in s["perplexity"].items():
            assert math.isclose(par[name]["perplexity"][k], v, rel_tol=SWEEP_SAME), (name, k)
        for task, metrics in s["eval"]["tasks"].items():
            for m, v in metrics.items():
                assert math.isclose(par[name]["eval"]["tasks"][task][m]["value"], v["value"], rel_tol=SWEEP_SAME), (task, m)


def test_report_reads_artifacts_only(done, tmp_path):
    tmp, cfg, _ = done
    cfg.report.studies = [str(tmp / "study" / "job" / "study.json")]
    cfg.report.rankings = [str(tmp / "shared" / "*" / "*" / "rank-*" / "sensitivity.json")]
    cfg.report.bench, cfg.report.planners, cfg.report.baselines = [], [], []
    cfg.report.out_dir = str(tmp_path / "report")
    md = run_report(cfg).read_text()
    assert "| stories260k | 2 | backward | 5 (100%) | b2b_hg |" in md
    assert (tmp_path / "report" / "sensitivity_stories260k_tp2_backward.png").is_file()


def test_random_shape_runs_the_whole_pipeline(tmp_path):
    """A random-weight shape (conf/model/tiny.yaml) borrows stories260K's tokenizer: every stage runs, so a
    study's cost can be measured without a checkpoint. With block inputs bigger than spd.rank_state_gb (a big
    model's), nothing is kept for every block boundary: the ranking captures one block input at a time and
    distillation only the inputs and outputs of the blocks it trains."""
    cfg = quick(tmp_path, "model=tiny", "spd.fraction=0.5", "study.strategy=b2b_hg", "spd.sb_count=1",
                "spd.esb_count=1", "spd.rank_state_gb=1e-6", name="tiny")
    summary = run_study(cfg)
    assert set(summary["stages"].values()) == {"computed"} and summary["spd_blocks"] == 2
    (ranking,) = (tmp_path / "shared").rglob("sensitivity.json")
    assert json.loads(ranking.read_text())["cost"]["max_states"] == 1
    assert not list((tmp_path / "shared").rglob("activations-*"))
    job = tmp_path / "study" / "tiny"
    assert (job / "model" / "tokenizer.json").is_file() and summary["perplexity"]["word_perplexity"] > 1


def test_random_shape_refuses_a_tokenizer_that_does_not_fit():
    from spd.config import ModelConfig
    from spd.errors import ModelLoadError
    from spd.load import random_tokenizer

    cfg = ModelConfig(name="x", source="random", vocab_size=300, tokenizer="stories260k")
    with pytest.raises(ModelLoadError, match="has 512 tokens, more than model.vocab_size=300"):
        random_tokenizer(cfg)


def test_b2b_reuses_the_sb_blocks_a_b2b_hg_job_distilled(done):
    """One shared folder for every strategy: b2b after b2b_hg trains only the ESB block (without HG here)."""
    tmp, _, _ = done
    cfg = quick(tmp, "spd.fraction=1.0", "study.strategy=b2b", "spd.sb_count=2", "spd.esb_count=1",
                "study.evaluate=false", "study.export=false", name="b2b_after_hg")
    run_study(cfg)
    hg_plan = json.loads((tmp / "study" / "job" / "plan.json").read_text())
    plan = json.loads((tmp / "study" / "b2b_after_hg" / "plan.json").read_text())
    distill = json.loads((tmp / "study" / "b2b_after_hg" / "distill.json").read_text())
    sb = [i for i, t in plan["tiers"].items() if t == "SB"]
    esb = [i for i, t in plan["tiers"].items() if t == "ESB"]
    assert plan["tiers"] == hg_plan["tiers"] and len(sb) == 2 and len(esb) == 1
    assert distill["trained"] == esb and all(distill["blocks"][i]["resumed"] for i in sb)
    for i in sb:  # the very same weights as the b2b_hg job's
        assert plan["weights"][i]["sha256"] == hg_plan["weights"][i]["sha256"]
    assert plan["weights"][esb[0]]["sha256"] != hg_plan["weights"][esb[0]]["sha256"]  # no HG: another block
    assert plan["head_perm"] == {}
    folders = {(tmp / "study" / job / p["weights"][i]["file"]).resolve().parent
               for job, p in (("job", hg_plan), ("b2b_after_hg", plan)) for i in sb + esb}
    assert len(folders) == 1  # both strategies' blocks in one shared folder
