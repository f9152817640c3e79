#!/usr/bin/env bash
# Device smoke + GPU test run: build under the device's torch/Python with the carried
# nvidia-cutlass wheel, import, round-trip a CUDA op, run every gpu/sm90 test.
# Extra arguments go to pytest (e.g. a test path). Needs `.whl` carried.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
ts_build
python3 scripts/device_smoke.py
python3 -m pytest -q -m "gpu or sm90" -p no:cacheprovider "${@:-tests}"
