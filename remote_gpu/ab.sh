# Same-call A/B of code variants on the device tool's GPU machine: spd-bench's job run on copies of the tree.
# Here (a copy of overlap/, spd/, tests/ and scripts/ at COMMIT, optionally with one constant or line changed by sed):
#   source remote_gpu/ab.sh && ab_copy NAME COMMIT ['SED_EXPRESSION' FILE]
#   e.g. ab_copy p4 HEAD 's/^PDL_PRELOAD_TILES = 1 /PDL_PRELOAD_TILES = 4 /' overlap/kernels/norm_gemv.py
# There (after `export SPD_COMMIT=<hash>; source remote_gpu/gpu_jobs.sh`, whose bench abbench runs; carry .whl,
# runs/gpujobs, runs/ab):
#   source remote_gpu/ab.sh && bench runs/gpujobs/v4_dec_pdl 80 && abbench p4 <hash>+preload=4 v4_dec_pdl 80
# abbench runs the job with the copy first on the import path and labels its records LABEL (their `commit`),
# which must say what differs from the commit (docs/benchmarks/pdl.md has records made so). Records go to
# $OUT/records.jsonl like bench's.
# The copy holds tests/ and scripts/ too: `abtests NAME SECONDS PYTEST_ARGS...` runs the GPU tests against the
# copy's code, and scripts/kernel_kinds.py run inside the copy profiles it (the script puts its own root first).

ab_copy() {  # ab_copy NAME COMMIT [SED_EXPRESSION FILE]: runs/ab/NAME = overlap/, spd/, tests/, scripts/ at COMMIT,
  # FILE edited
  local name=$1 commit=$2 dir=runs/ab/$1
  rm -rf "$dir" && mkdir -p "$dir" && git archive "$commit" overlap spd tests scripts | tar -x -C "$dir" || return 1
  if [ $# -ge 4 ]; then
    cp "$dir/$4" "$dir/$4.orig" && sed -i "$3" "$dir/$4"
    if cmp -s "$dir/$4" "$dir/$4.orig"; then echo "ab_copy $name: '$3' changed nothing in $4" >&2; return 1; fi
    rm "$dir/$4.orig"
  fi
  echo "runs/ab/$name: $(git rev-parse --short "$commit")${3:+ with $3 on $4}"
}

abbench() {  # abbench NAME LABEL JOB SECONDS: gpu_jobs.sh's bench of runs/gpujobs/JOB, run on runs/ab/NAME
  local d=runs/ab/$1 here=$PWD out
  out=$(mkdir -p "$OUT" && cd "$OUT" && pwd)  # bench writes there from inside the copy
  echo "== abbench $1 ($2)" | tee -a "$out/log.txt"
  (cd "$d" && OUT=$out SPD_COMMIT=$2 PYTHONPATH="/tmp/site:$here/$d" bench "$here/runs/gpujobs/$3" "$4")
}

abtests() {  # abtests NAME SECONDS PYTEST_ARGS...: gpu_jobs.sh's gputests, run on runs/ab/NAME's code and tests
  local name=$1 d=runs/ab/$1 secs=$2 here=$PWD out
  shift 2
  out=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
  echo "== abtests $name" | tee -a "$out/log.txt"
  (cd "$d" && OUT=$out PYTHONPATH="/tmp/site:$here/$d" gputests "$secs" "$@")
}
