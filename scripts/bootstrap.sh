# Sourced by scripts/run.sh and scripts/test.sh: make sure an environment with the project exists.
# - uses the active virtualenv, else creates/uses ./.venv
# - installs with uv (with pip where uv cannot be installed), torch first (TORCH_SPEC, default
#   the CPU build torch==2.13.0; on CUDA machines set e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")
# - installs the project (editable, with dev extras) when pyproject.toml changed since the last install
# - exports the offline / quiet environment and keeps caches inside the project
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi

PIP="python -m pip --disable-pip-version-check -q"
# uv installs the same resolution as pip several times faster; it does not read pip's config, so
# the wheel folders pip is told to look in (the CPU torch file of this machine) are handed to it;
# it compiles the bytecode at install time as pip does (else every first import compiles it)
if python -m uv --version >/dev/null 2>&1 || $PIP install uv >/dev/null 2>&1; then
  LINKS="${PIP_FIND_LINKS:-$(python -m pip config get global.find-links 2>/dev/null || true)}"
  INSTALL="python -m uv pip install -q --compile-bytecode"
  for link in $LINKS; do INSTALL="$INSTALL --find-links $link"; done
else
  echo "[bootstrap] uv is not installable here: installing with pip"
  INSTALL="$PIP install"
fi
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] installing ${TORCH_SPEC:=torch==2.13.0}"
  # shellcheck disable=SC2086
  $INSTALL $TORCH_SPEC 2> >(grep -v "^WARNING: Location" >&2)
fi
STAMP="$VIRTUAL_ENV/.diffusiongpt-installed"
WANT="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[bootstrap] installing diffusiongpt and its dependencies"
  # the torch installed above stays: no dependency may swap it for another build
  python -W ignore -c "import torch; print('torch==' + torch.__version__)" > "$VIRTUAL_ENV/.torch-constraint.txt"
  $INSTALL --constraint "$VIRTUAL_ENV/.torch-constraint.txt" -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
  echo "$WANT" > "$STAMP"
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" HF_EVALUATE_OFFLINE="${HF_EVALUATE_OFFLINE:-1}"
export HF_UPDATE_DOWNLOAD_COUNTS=0 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HOME="${HF_HOME:-$ROOT/.cache/huggingface}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.cache/prefect}"
mkdir -p "$HF_HOME" "$TORCH_EXTENSIONS_DIR" "$PREFECT_HOME"  # Prefect does not create missing parents
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
