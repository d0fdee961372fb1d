"""Console entry points, run as a user would."""

import subprocess
import sys



def run(*args):
    code = "import sys; from spd.cli import info; sys.argv = ['spd-info', *sys.argv[1:]]; info()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_spd_info_stories260k():
    out = run("model=stories260k", "max_new_tokens=12")
    assert out.returncode == 0, out.stderr
    assert "layers 5, heads 8, KV heads 4, hidden 64, FFN 172, vocab 512" in out.stdout
    assert "R = 8: 1 heads/rank, KV heads replicated 2x" in out.stdout
    assert "Once upon a time, there was a little girl" in out.stdout


def test_spd_info_random_large_model_needs_no_weights():
    out = run("model=llama2_70b", "parallel.tp=8")
    assert out.returncode == 0, out.stderr
    assert "layers 80, heads 64, KV heads 8" in out.stdout and "(69.0 M)" not in out.stdout


def test_spd_info_rejects_bad_degree_with_valid_list():
    out = run("model=smollm2_135m", "parallel.tp=4")
    assert out.returncode == 2
    assert "valid degrees: 1, 3, 9" in out.stderr and "Traceback" not in out.stderr
