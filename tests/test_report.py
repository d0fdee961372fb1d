"""spd/report.py's latency curves from bench records: one setup per curve, the newest that measured base."""

from spd.report import breakdown_plot, latency_curve, latency_saving

TARGET = {"model": "m", "tp": 4, "interconnect": "nvlink", "phase": "decode", "batch": 1}


def rec(variant, ms, commit="a", fused=False, **extra):
    return dict(schema="spd.bench/1", model="m", tp=4, interconnect="nvlink", phase="decode", batch=1, tokens=1,
                variant=variant, median_ms=ms, commit=commit, device="d", impl="nccl", fused=fused, **extra)


def test_curve_comes_from_one_setup_the_newest_with_base():
    old = [rec("base", 16.0), rec("spd50", 15.5), rec("spd100", 15.0)]
    new = [rec("base", 14.0, commit="b", fused=True), rec("spd100", 13.0, commit="b", fused=True)]
    assert latency_curve(old + new, TARGET) == {0.0: 14.0, 1.0: 13.0}  # not the old spd50 against the new base
    assert latency_curve(old, TARGET) == {0.0: 16.0, 0.5: 15.5, 1.0: 15.0}
    partial = [rec("spd50", 1.0, commit="c")]  # a newer setup without base does not displace a complete one
    assert latency_curve(old + new + partial, TARGET) == {0.0: 14.0, 1.0: 13.0}
    assert latency_curve([rec("spd100", 1.0)], TARGET) is None
    assert abs(latency_saving({0.0: 14.0, 1.0: 13.0}, 0.5) - (1 - 13.5 / 14.0)) < 1e-12


def test_newest_record_of_a_setup_wins():
    recs = [rec("base", 20.0), rec("spd100", 15.0), rec("base", 16.0)]  # a rerun of base in the same setup
    assert latency_curve(recs, TARGET) == {0.0: 16.0, 1.0: 15.0}


def test_breakdown_plot_uses_a_complete_setup(tmp_path):
    recs = [rec("base", 16.0), rec("spd100", 15.0), rec("nocomm", 13.0), rec("base", 14.0, commit="b")]
    assert breakdown_plot(recs, tmp_path / "b.png").is_file()  # setup b lacks spd100/nocomm: setup a is drawn
    assert breakdown_plot([rec("base", 14.0)], tmp_path / "c.png") is None


def test_study_table_says_how_many_documents_and_what_was_shared():
    from spd.report import study_table

    def job(fraction, strategy, limit, trained, minutes):
        tasks = {"spd_piqa": {"acc": {"value": 0.6}}, "spd_arc_easy": {"acc": {"value": 0.4}}}
        return {"model": "m", "tp": 3, "fraction": fraction, "strategy": strategy, "spd_blocks": int(30 * fraction),
                "ranking": {"method": "backward"}, "perplexity": {"word_perplexity": 40.0},
                "eval": {"tasks": tasks, "limit": limit}, "distill_trained": trained,
                "stages": {"distill": "computed" if trained else "reused"},
                "distill_minutes": minutes, "kd_minutes": 0.0}

    md, rows = study_table([job(1.0, "b2b", None, 30, 3.0), job(0.5, "b2b", 1000.0, 0, 3.0)], {})
    lines = md.splitlines()
    assert "docs/task" in lines[0]
    half, full = (line.split(" | ") for line in lines[2:4])
    assert half[5] == "1000" and full[5] == "all"
    assert half[-2] == "shared" and full[-2] == "3.00"  # 3 minutes spent waiting for another job's blocks
    assert rows[1]["avg_acc"] == 0.5
