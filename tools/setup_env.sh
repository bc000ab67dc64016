#!/usr/bin/env bash
# Set up a Python environment for up2 on a fresh machine (CPU-only, no internet but package registries).
#
#   bash tools/setup_env.sh          # creates .venv unless a virtual environment is already active
#
# Steps (each skipped when already satisfied, so a second run takes seconds):
#   1. a virtual environment (.venv) unless $VIRTUAL_ENV is set;
#   2. PyTorch + torchvision (torch==2.14.1 torchvision==0.29.1) unless a working pair is importable;
#   3. Detectron2: an existing `import detectron2` is kept (e.g. the official build from git); otherwise
#      the `pb1-detectron2==0.6` sdist (a re-upload of Detectron2 0.6 without its C++ sources) is patched
#      by tools/patch_detectron2_sdist.py (no C++ extension but a pure-Python `detectron2/_C.py` stand-in,
#      tools/detectron2_C_standin.py; fixes for current Python, numpy and torch) and built with its
#      runtime dependencies. A fallback build left by older versions of these tools is rebuilt;
#   4. `pip install -e .` (up2 and its Python dependencies).
# Prints the interpreter to use on stdout (and nothing else; logs go to stderr).
set -euo pipefail
# Everything goes to stderr; only the interpreter path is printed on stdout (fd 3), at the end.
exec 3>&1 1>&2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "[up2 setup] $*" >&2; }

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
  log "using the active virtual environment $VIRTUAL_ENV"
else
  if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
fi
PIP=("$PY" -m pip --disable-pip-version-check)

# Stamp: the hash of everything that decides what gets installed. Same stamp + imports work => done.
STAMP_FILE="$("$PY" -c 'import sys; print(sys.prefix)')/.up2-setup-stamp"
STAMP="$(cat tools/setup_env.sh tools/detectron2_C_standin.py tools/patch_detectron2_sdist.py setup.py \
  | sha256sum | cut -d' ' -f1)"
# The fallback Detectron2 build is identified by the hash of the two files that make it.
D2_BUILD_ID="$(cat tools/detectron2_C_standin.py tools/patch_detectron2_sdist.py | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]] \
   && "$PY" -c "import torch, torchvision, detectron2, up2" >/dev/null 2>&1; then
  log "environment up to date ($PY)"
  echo "$PY" >&3
  exit 0
fi

# 2. PyTorch
if "$PY" -c "import torch, torchvision; torchvision.ops.nms" >/dev/null 2>&1; then
  log "keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  log "installing torch==2.14.1 torchvision==0.29.1 (about a minute from the local wheel cache)"
  "${PIP[@]}" install -q "torch==2.14.1" "torchvision==0.29.1"
fi

# Detectron2 0.6 imports pkg_resources in model_zoo; setuptools >= 81 removed it.
"${PIP[@]}" install -q "setuptools<81" wheel

# 3. Detectron2. Its state: "official" (any Detectron2 these tools did not build: always kept),
# "current" (the fallback build of these very tools), "outdated" (a fallback build of older tools,
# rebuilt) or "missing".
D2_STATE="$("$PY" -c '
import sys
import detectron2
try:
    from detectron2 import _up2_fallback
except ImportError:
    try:  # the stand-in of older tools, or a compiled extension (that may fail to load)
        from detectron2 import _C
        ours = getattr(_C, "BUILT_WITHOUT_EXTENSION", False)
    except Exception:
        ours = False
    print("outdated" if ours else "official")
else:
    print("current" if _up2_fallback.BUILD_ID == sys.argv[1] else "outdated")
' "$D2_BUILD_ID" 2>/dev/null)" || D2_STATE=missing
if [[ "$D2_STATE" == official || "$D2_STATE" == current ]]; then
  log "keeping the installed detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)')"
else
  log "building Detectron2 0.6 (pb1-detectron2 sdist, patched) without C++ extensions ($D2_STATE)"
  BUILD_DIR="$(mktemp -d)"
  trap 'rm -rf "$BUILD_DIR"' EXIT
  "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
      "pb1-detectron2==0.6" -d "$BUILD_DIR"
  tar -xzf "$BUILD_DIR"/pb1-detectron2-0.6.tar.gz -C "$BUILD_DIR"
  SRC="$BUILD_DIR/pb1-detectron2-0.6"
  "$PY" tools/patch_detectron2_sdist.py "$SRC" "$D2_BUILD_ID"
  # With its runtime dependencies (black for LazyConfig.to_py, pydot, future, ...).
  "${PIP[@]}" install -q --no-build-isolation "$SRC"
fi

# 4. up2 itself and its dependencies
log "installing up2 (pip install -e .)"
"${PIP[@]}" install -q --no-build-isolation -e ".[dev]"

"$PY" -c "import torch, torchvision, detectron2, up2" 
echo "$STAMP" > "$STAMP_FILE"
log "done: $PY"
echo "$PY" >&3
