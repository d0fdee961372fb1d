#!/usr/bin/env bash
# Here (with PyPI): download the wheels the GPU machine lacks into .whl/ (git-ignored), for Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
mkdir -p .whl/alt
python3 -m pip download -q --no-deps $plat -d .whl lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 \
  multiprocess==0.70.19 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 \
  tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 hydra-core==1.3.8 omegaconf==2.3.1 \
  gguf==0.19.0 more_itertools==11.2.1 accelerate==1.15.0 psutil==7.2.2 pytz
python3 -m pip wheel -q --no-deps -w .whl sqlitedict==2.1.0 word2number==1.1 antlr4-python3-runtime==4.9.3
python3 -m pip download -q --no-deps $plat -d .whl/alt datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18
du -sh .whl
