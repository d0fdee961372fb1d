#!/usr/bin/env bash
# #19's measurements on one GPU (device tool; results under $OUT):
#   bash remote_gpu/scale_run.sh rank     SmolLM2-135M shape ranked at the paper's size, bf16 and fp32 (the peer)
#   bash remote_gpu/scale_run.sh bench llama2_7b --tp 4        scripts/scale_bench.py (any of its arguments)
#   bash remote_gpu/scale_run.sh bench llama2_70b --tp 4 8 --max-memory 0=100GiB cpu=110GiB   (GPU + CPU offload)
set -euo pipefail
cd "$(dirname "$0")/.."
source remote_gpu/device_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2; df -h /tmp | tail -1
SMOL="model=tiny model.name=smollm2_shape model.hidden_size=576 model.intermediate_size=1536 model.num_layers=30
  model.num_heads=9 model.num_kv_heads=3 model.vocab_size=49152 model.max_position_embeddings=8192
  model.rope_theta=100000 model.tie_word_embeddings=true model.device=cuda calib=paper parallel.tp=3 distill.spill_gb=64"
case "$1" in
  rank)
    for dt in bfloat16 float32; do
      cmd="spd-rank $(echo $SMOL) model.dtype=$dt"
      t0=$(date +%s.%N)
      python3 -m spd.cli rank $SMOL model.dtype=$dt hydra.run.dir=/tmp/rank_$dt > $OUT/rank_$dt.log 2>&1
      t1=$(date +%s.%N)
      python3 scripts/rank_cost.py /tmp/rank_$dt --wall "$(python3 -c "print($t1 - $t0)")" --command "$cmd" >> $OUT/rank_cost.jsonl
      tail -3 $OUT/rank_$dt.log
    done ;;
  bench)
    shift
    python3 scripts/scale_bench.py --models "$@" --out $OUT/scale.jsonl --work /tmp 2>&1 | grep -v -i "warn" \
      | tee -a $OUT/scale.log | grep -E '^\{|estimate|device map|measured' ;;
esac
