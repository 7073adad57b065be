#!/usr/bin/env bash
# The prepared GPU run for the throughput issue: one script, one device call, figures to
# $OUT (copied back into benchmarks/results/ by the session that runs it).
#
# Not yet run: no GPU was lent to the session that wrote it. Before the device call, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl bitsandbytes==0.50.2 typer rich shellingham click annotated-doc
# then: device run, carry [".whl"], command: bash benchmarks/gpu_h100.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
B="python3 -m blip2cli bench --from-config opt-2.7b --json --repeat 2"
# 640x480: images/s end to end, ratio to plain batched generate (target >= 600 and >= 1.5x)
timeout 240 $B --synthetic 1024 --size 640x480 -b 64,256 --baseline > "$OUT/h100-opt27b-640x480.json" 2> "$OUT/h100-640.log"
# 12-megapixel JPEGs with the machine's cores (target >= 400 images/s)
timeout 150 $B --synthetic 256 --size 4032x3024 -b 128 --workers 16 > "$OUT/h100-opt27b-12mp.json" 2> "$OUT/h100-12mp.log"
# beam search, 5 beams (target >= 1.5x plain batched generate with 5 beams)
timeout 120 $B --synthetic 256 --size 640x480 -b 64 --num-beams 5 --baseline > "$OUT/h100-opt27b-beam5.json" 2> "$OUT/h100-beam5.log"
ls -la "$OUT"
