#!/usr/bin/env bash
# GPU tests and benchmarks in one go on a GPU machine, run from the checkout (PYTHONPATH=.).
#
#   examples/device_suite.sh tests      # tests/gpu (and tests/multi_gpu when 2+ GPUs)
#   examples/device_suite.sh fast       # fused kernels, bf16 vs HF, 0.6B throughput / batch 1, step profiles
#   examples/device_suite.sh bench      # kernel and engine benchmarks (1 GPU)
#   examples/device_suite.sh sync       # memory release/resume and colocated weight-sync benchmarks (1 GPU)
#   examples/device_suite.sh timeline   # the offline workload step by step, prompt-phase kernels, attention tiles
#   examples/device_suite.sh rollout    # a GRPO rollout step: makespan, tail, prefix-cache gain (1 GPU)
#   examples/device_suite.sh cuts       # decode pieces: the uniform and the balanced cut, kernel and engine
#   examples/device_suite.sh moe        # Qwen3-30B-A3B throughput (one H200)
#   examples/device_suite.sh multi      # multi-GPU tests and the NCCL weight-sync benchmark
#
# Wheels the machine lacks can be put in .whl/ (see ../shared/tools/device-wheels.sh); they are
# installed into /tmp/site first. Logs go to $OUT (default /tmp/rollout-device); a summary table
# of every step (exit code, seconds) is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/rollout-device}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
: > "$OUT/summary.txt"

# step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record exit code and time.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-28s rc=%-4s %5ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}

case "${1:-tests}" in
  tests)
    step gpu_tests 420 python3 -m pytest -q -p no:cacheprovider tests/gpu -k "not flashinfer"
    step flashinfer_tests 240 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_flashinfer_backend_gpu.py
    ;;
  fast)  # the fast path's checks and figures first: fused kernels, HF equality, throughput, latency, profiles
    step fused_kernels 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_kernels_fused.py \
      tests/unit/test_kernels_attention.py tests/unit/test_kernels_decode_pieces.py tests/unit/test_kernels_decode_qkv.py \
      tests/unit/test_kernels_sampling.py tests/unit/test_kernels_gemv_norm.py
    step bf16_vs_hf 180 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_engine.py
    step offline_qwen3_0.6b 200 python3 examples/offline_throughput.py --shape qwen3-0.6b --attention-backend triton
    step batch1_qwen3_0.6b 100 python3 examples/offline_throughput.py --shape qwen3-0.6b --batch1 \
      --attention-backend triton
    TAIL=70 step profile_b256 100 python3 examples/profile_decode.py --shape qwen3-0.6b --batch 256 --context 600
    TAIL=70 step profile_b1 100 python3 examples/profile_decode.py --shape qwen3-0.6b --batch 1 --context 128
    TAIL=40 step timeline_qwen3_0.6b 200 python3 examples/workload_timeline.py --shape qwen3-0.6b --show-steps 24
    ;;
  timeline)  # where the offline workload's time goes, and the kernels of its prompt phase
    TAIL=40 step timeline_qwen3_0.6b 200 python3 examples/workload_timeline.py --shape qwen3-0.6b --show-steps 24
    TAIL=45 step timeline_prompt_profile 200 python3 examples/workload_timeline.py --shape qwen3-0.6b \
      --profile-steps 6
    TAIL=12 step attention_sweep 200 python3 -m kernels.bench_attention --context 640 --sweep
    TAIL=12 step decode_graph_sweep 200 python3 -m kernels.bench_decode_graph
    ;;
  bench)
    step bf16_vs_hf 180 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_engine.py -k bf16
    step bench_attention 120 python3 -m kernels.bench_attention
    step bench_moe 120 python3 -m kernels.bench_moe
    step bench_sampling 120 python3 -m kernels.bench_sampling
    step bench_gemv 150 python3 -m kernels.bench_gemv
    step offline_qwen3_0.6b 240 python3 examples/offline_throughput.py --shape qwen3-0.6b --attention-backend triton
    step batch1_qwen3_0.6b 120 python3 examples/offline_throughput.py --shape qwen3-0.6b --batch1 \
      --attention-backend triton
    step offline_qwen3_0.6b_proc 240 python3 examples/offline_throughput.py --shape qwen3-0.6b \
      --attention-backend triton --separate-process
    step batch1_llama_8b 180 python3 examples/offline_throughput.py --shape llama-8b --batch1 --attention-backend triton
    ;;
  rollout)  # one GRPO rollout step (128 x 8, shared prefix, long tail to 8k), prefix cache on and off
    TAIL=45 step rollout_qwen3_0.6b 540 python3 examples/rollout_bench.py --shape qwen3-0.6b --attention-backend triton
    ;;
  cuts)  # decode pieces cut uniformly (default) or by length (ROLLOUT_DECODE_CUT=balanced)
    step cut_tests 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_kernels_decode_pieces.py \
      tests/gpu/test_pdl_decode_gpu.py tests/gpu/test_triton_backend_gpu.py
    TAIL=12 step cut_kernel 120 python3 -m kernels.bench_decode_graph --splits 1 --tiles 64/4/3 --interleaved --all \
      --batch 32,128,256 --context 600 --ragged 0.8 --long 0.05 --spare u,0.5
    for cut in uniform balanced; do
      TAIL=40 step "profile_grouped_$cut" 150 env ROLLOUT_DECODE_CUT=$cut python3 examples/profile_decode.py \
        --shape qwen3-0.6b --batch 128 --context 1200 --ragged 0.5 --long 0.05 --group 8
      TAIL=20 step "rollout_staggered_$cut" 150 env ROLLOUT_DECODE_CUT=$cut python3 examples/rollout_bench.py \
        --shape qwen3-0.6b --attention-backend triton --prompts 64 --max-running-requests 128 \
        --max-new-tokens 4096 --only "cache on"
    done
    ;;
  moe)  # one H200: the Qwen3-30B-A3B anchor (1,000 in / 2,000 out)
    step offline_qwen3_30b_a3b 540 python3 examples/offline_throughput.py --shape qwen3-30b-a3b --num-prompts 256 \
      --input-len 1000 --output-len 2000 --attention-backend triton --separate-process
    ;;
  sync)
    step memory_bench 180 python3 examples/memory_bench.py --kv-gib 40 --cycles 2
    step ipc_bench 180 python3 examples/weight_sync_bench.py --shape llama-8b --ipc
    ;;
  multi)
    step nccl_bench_1g 120 python3 examples/weight_sync_bench.py --shape llama-8b --bucket-mb 1024
    step nccl_bench_2g 120 python3 examples/weight_sync_bench.py --shape llama-8b --bucket-mb 2048
    step multi_gpu_tests 200 python3 -m pytest -v -x -p no:cacheprovider tests/multi_gpu
    ;;
esac
echo "==== summary"
cat "$OUT/summary.txt"
