#!/usr/bin/env bash
# One lease of a GPU machine, used whole: build duogpt and the CUDA benchmarks for the GPU in hand,
# then run the chosen steps, each under its own time limit, logging to OUTDIR. A failing step does
# not stop the next: the log says what failed.
#
# Usage (repository root, on the GPU machine):  bash bench/gpu_session.sh OUTDIR STEP...
#   test      pytest -m "cuda or cuda_build" (the CUDA kernels and their host API, graph capture,
#             the CUDA-graph decode loop);
#             TEST_ARGS adds options (a -k selection)
#   sanitize  compute-sanitizer memcheck and racecheck over a few CUDA tests
#   gemv      gemv_cuda, every shape and sparsity of issue 3 (gemv-quick: 50 % weights only)
#   gemv-threshold  gemv_cuda --quick with the threshold rule on two shapes: the top-k select's cost
#   obs       obs_cuda: the fused OBS block against the eager column loop
#   solver    bench/solver.py --shapes llama2-7b --device cuda
#   decode    duogpt bench decode random:llama2-7b --device cuda (DECODE_ARGS adds options)
#   cpu       the host CPU's kernels (its AVX-512 path where it has one, which the CI machine lacks):
#             the CPU GEMV and bitmap tests, then gemv_cpu --quick on 8 threads, with its own ISA
#             and with AVX2 (AVX-512 has no four-channel group kernel: which path is faster there
#             has not been measured)
# The build (one CMake tree: the Python extension, copied into duogpt/, and the benchmarks) always
# runs first; its architecture is the GPU's own (nvidia-smi's compute capability). At the end the
# logs and JSON go into OUTDIR/session.tar.gz (the device tool returns at most 8 files), beside
# summary.txt.
set -u
out=${1:?usage: bash bench/gpu_session.sh OUTDIR STEP...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
summary=$out/summary.txt

deadline=${DEADLINE:-570}  # seconds from the start by which every step has ended (the tool's limit is 600)
step() {  # step NAME LIMIT_S COMMAND...: run, log to OUTDIR/NAME.log, record status and time
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  ((limit > deadline - SECONDS)) && limit=$((deadline - SECONDS))
  if ((limit < 10)); then echo "$name skipped: past the deadline" | tee -a "$summary"; return 1; fi
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  printf '%-10s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$summary"
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
  nvcc --version | tail -n 2; date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null; } >"$out/env.txt" 2>&1
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)

step build 200 bash -c "
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDUOGPT_CUDA=ON -DDUOGPT_BUILD_BENCH=ON \
        -DCMAKE_CUDA_ARCHITECTURES=${cc}-real -Dpybind11_DIR=\$(python3 -m pybind11 --cmakedir) &&
  cmake --build build/gpu -j \$(nproc) && cp build/gpu/_C*.so duogpt/ &&
  python3 -m duogpt env" || exit 1

for s in "$@"; do
  case $s in
    test) step test 240 python3 -m pytest -m "cuda or cuda_build" -q -rfE --tb=short -p no:cacheprovider -n 12 tests \
            ${TEST_ARGS:-} ;;
    sanitize)
      for tool in memcheck racecheck; do
        step "sanitize-$tool" 240 compute-sanitizer --tool "$tool" --error-exitcode 9 \
          python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "graph or 1025x40 or 4095x40"
      done ;;
    gemv) step gemv 420 build/gpu/bench/cuda/gemv_cuda --json "$out/gemv.json" ;;
    gemv-quick) step gemv 120 build/gpu/bench/cuda/gemv_cuda --quick --json "$out/gemv.json" ;;
    gemv-threshold) step gemv-threshold 120 build/gpu/bench/cuda/gemv_cuda --quick --rule threshold \
                      --shape 4096x4096 --shape 11008x4096 ;;
    obs) step obs 120 build/gpu/bench/cuda/obs_cuda --json "$out/obs.json" ;;
    solver) step solver 300 python3 bench/solver.py --shapes llama2-7b --device cuda ;;
    decode) step decode 480 python3 -m duogpt bench decode random:llama2-7b --device cuda \
              --json "$out/decode.json" ${DECODE_ARGS:-} ;;
    cpu) step cpu-test 240 python3 -m pytest -m "not cuda" -q -rfE --tb=short -p no:cacheprovider -n 12 \
           tests/test_gemv.py tests/test_bitmap.py
         step cpu-gemv 120 env OMP_NUM_THREADS=8 build/gpu/bench/gemv_cpu --quick --json "$out/gemv_cpu.json"
         step cpu-gemv-avx2 120 env OMP_NUM_THREADS=8 build/gpu/bench/gemv_cpu --quick --isa avx2 \
           --json "$out/gemv_cpu_avx2.json" ;;
    *) echo "unknown step $s" | tee -a "$summary" ;;
  esac
done
tar -czf /tmp/session.tar.gz -C "$out" --exclude=summary.txt . &&
  find "$out" -type f ! -name summary.txt -delete && mv /tmp/session.tar.gz "$out/"
