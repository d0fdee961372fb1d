# Same-call A/B of code variants on the device tool's GPU machine: spd-bench's job run on copies of the tree.
# Here (a copy of overlap/ and spd/ at COMMIT, optionally with one constant or line changed by sed):
#   source remote_gpu/ab.sh && ab_copy NAME COMMIT ['SED_EXPRESSION' FILE]
#   e.g. ab_copy p4 HEAD 's/^PDL_PRELOAD_TILES = 1 /PDL_PRELOAD_TILES = 4 /' overlap/kernels/norm_gemv.py
# There (after `export SPD_COMMIT=<hash>; source remote_gpu/gpu_jobs.sh`; carry .whl, runs/gpujobs, runs/ab):
#   source remote_gpu/ab.sh && bench runs/gpujobs/v4_dec_pdl 80 && abbench p4 <hash>+preload=4 v4_dec_pdl 80
# abbench runs the job with the copy first on the import path and labels its records LABEL (their `commit`),
# which must say what differs from the commit (docs/benchmarks/pdl.md has records made so). Records go to
# $OUT/records.jsonl like bench's.

ab_copy() {  # ab_copy NAME COMMIT [SED_EXPRESSION FILE]: runs/ab/NAME = overlap/ and spd/ at COMMIT, FILE edited
  local name=$1 commit=$2 dir=runs/ab/$1
  rm -rf "$dir" && mkdir -p "$dir" && git archive "$commit" overlap spd | tar -x -C "$dir" || return 1
  if [ $# -ge 4 ]; then
    cp "$dir/$4" "$dir/$4.orig" && sed -i "$3" "$dir/$4"
    if cmp -s "$dir/$4" "$dir/$4.orig"; then echo "ab_copy $name: '$3' changed nothing in $4" >&2; return 1; fi
    rm "$dir/$4.orig"
  fi
  echo "runs/ab/$name: $(git rev-parse --short "$commit")${3:+ with $3 on $4}"
}

abbench() {  # abbench NAME LABEL JOB SECONDS: the job on runs/ab/NAME, records labelled LABEL -> $OUT/records.jsonl
  local d=runs/ab/$1 label=$2 job=$3 secs=$4 here=$PWD
  echo "== abbench $1 ($label) $job $(date +%T)" | tee -a "$OUT/log.txt"
  (cd "$d" && SPD_COMMIT="$label" PYTHONPATH=/tmp/site:$here/$d timeout -k 5 "$secs" python3 -m torch.distributed.run \
    --standalone --nproc-per-node 1 -m overlap.bench --job "$here/runs/gpujobs/$job/job.json") >> "$OUT/log.txt" 2>&1 \
    || echo "abbench $1 exit $?" | tee -a "$OUT/log.txt"
  cat "$d/runs/gpu/$job.jsonl" >> "$OUT/records.jsonl" 2>/dev/null
  return 0
}
