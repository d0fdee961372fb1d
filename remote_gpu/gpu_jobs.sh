# Steps for one device-tool call on a GPU machine, sourced there after the job files were made here:
#   source remote_gpu/gpu_jobs.sh && bench runs/gpujobs/dec_nccl 90 && profile runs/gpujobs/dec_fused decode 8 60 \
#     && gputests 240 tests/test_overlap_gpu.py
# (carry .whl and runs/gpujobs). Job files come from spd-bench dry runs here, for example
#   python -m overlap.cli parallel.tp=4 hydra.run.dir=runs/gpujobs/dec_nccl 'bench.phases=[decode]' \
#     bench.out=runs/gpu/dec_nccl.jsonl bench.dry_run=true
# Every step is bounded (seconds), appends to $OUT/log.txt and copies what it made into $OUT as soon as it
# ends, so a step cut off by its bound (or the call's) keeps what finished: bench records are appended one
# line per measurement. Few files come back from a call: records go to $OUT/records.jsonl (all jobs),
# a profile to one $OUT/prof_<job>_<phase>.tgz (its breakdown also in log.txt). Set SPD_COMMIT to the
# commit the job files were made at (no .git travels).
source remote_gpu/device_setup.sh
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader >> "$OUT/log.txt" 2>&1

_worker() {  # the torchrun command of a job directory
  local tp
  tp=$(python3 -c "import json; print(json.load(open('$1/job.json'))['tp'])")
  echo "python3 -m torch.distributed.run --standalone --nproc-per-node $tp -m overlap.bench --job $1/job.json"
}

bench() {  # bench DIR SECONDS: the job's records (new lines of its out file) -> $OUT/records.jsonl
  local dir=$1 secs=$2 name recs before
  name=$(basename "$dir")
  recs=$(python3 -c "import json; print(json.load(open('$dir/job.json'))['out'])")
  mkdir -p "$(dirname "$recs")" && touch "$recs"
  before=$(wc -l < "$recs")
  echo "== bench $name $(date +%T)" | tee -a "$OUT/log.txt"
  timeout -k 5 "$secs" $(_worker "$dir") >> "$OUT/log.txt" 2>&1 || echo "bench $name exit $?" | tee -a "$OUT/log.txt"
  tail -n +"$((before + 1))" "$recs" >> "$OUT/records.jsonl"
  return 0
}

profile() {  # profile DIR PHASE LAYERS SECONDS: traces (gzip), timeline, breakdown -> $OUT/prof_<name>_<phase>.tgz
  local dir=$1 phase=$2 layers=$3 secs=$4 name src
  name=$(basename "$dir")
  src="runs/prof/$name-$phase"
  echo "== profile $name $phase $(date +%T)" | tee -a "$OUT/log.txt"
  timeout -k 5 "$secs" $(_worker "$dir") --profile "$src" --layers "$layers" --phase "$phase" \
    >> "$OUT/log.txt" 2>&1 || echo "profile $name exit $?" | tee -a "$OUT/log.txt"
  for t in "$src"/*.trace.json; do
    [ -f "$t" ] || continue
    python3 -m overlap.timeline --breakdown --top 25 "$t" 2>&1 | tee -a "$src/breakdown.txt" >> "$OUT/log.txt"
    gzip -f "$t"
  done
  tar czf "$OUT/prof_${name}_$phase.tgz" -C "$src" . 2>/dev/null
  return 0
}

gputests() {  # gputests SECONDS PYTEST_ARGS...: the GPU-marked tests, verbose log -> $OUT/tests.txt
  local secs=$1
  shift
  echo "== tests $* $(date +%T)" | tee -a "$OUT/log.txt"
  timeout -k 5 "$secs" python3 -m pytest -m gpu -v -rs -p no:cacheprovider "$@" >> "$OUT/tests.txt" 2>&1
  echo "tests exit $?" | tee -a "$OUT/log.txt" "$OUT/tests.txt"
  return 0
}
