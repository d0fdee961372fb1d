# Source on a GPU machine of the device tool (python3 with CUDA torch, no lm-eval/hydra/datasets, no network):
#   source remote_gpu/device_setup.sh
# Installs the carried wheels (.whl/, made by remote_gpu/device_wheels.sh) into /tmp/site once per machine,
# unpacks carried assets (.gpu/assets/data.tar.xz) into /root/assets, and sets the environment every run needs.
# SPD_COMMIT: the commit of the tree this runs (no usable .git travels): every meta.json and record carries it.
: "${SPD_COMMIT:?export SPD_COMMIT=<the commit of this tree, git rev-parse HEAD where you made the call> first}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export SPD_ASSETS=/root/assets SPD_CACHE=/root/spd-cache MPLBACKEND=Agg
if [ ! -f /tmp/site/.done ] && [ -d .whl ]; then
  # datasets 5.x needs huggingface-hub >= 1.31; older hubs get the datasets 4.4 set in .whl/alt
  if python3 -c "import huggingface_hub as h, sys; v = tuple(int(x) for x in h.__version__.split('.')[:2]); sys.exit(v < (1, 31))"; then
    wheels=$(ls .whl/*.whl)
  else
    wheels="$(ls .whl/*.whl | grep -v -E '/(datasets|dill|multiprocess)-') $(ls .whl/alt/*.whl)"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD
if [ ! -d /root/assets/data ] && [ -f .gpu/assets/data.tar.xz ]; then
  mkdir -p /root/assets && tar -C /root/assets -xJf .gpu/assets/data.tar.xz
fi
