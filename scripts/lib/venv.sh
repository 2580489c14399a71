# Sourced by the scripts: make sure ./.venv exists with the project installed (pip install -e .).
VENV="${ADVBCT_VENV:-.venv}"

# faiss_extra : the extra that brings faiss here. gpu (faiss-gpu-cu12) where an NVIDIA driver answers
# (nvidia-smi -L), cpu (faiss-cpu) elsewhere; ADVBCT_FAISS=cpu|gpu decides instead.
faiss_extra() {
  case "${ADVBCT_FAISS:-}" in
    cpu|gpu) echo "$ADVBCT_FAISS"; return 0 ;;
    "") ;;
    *) echo "error: ADVBCT_FAISS='$ADVBCT_FAISS': expected cpu or gpu" >&2; return 2 ;;
  esac
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo gpu; else echo cpu; fi
}

# _install_extra EXTRA : pip install -e ".[EXTRA,timm,test,plot]". faiss-cpu and faiss-gpu-cu12 install the same
# `faiss` package, so the other one is removed first (removing it afterwards would delete shared files).
_install_extra() {
  local extra="$1" other=faiss-cpu
  [[ "$extra" == gpu ]] || other=faiss-gpu-cu12
  if "$VENV/bin/python" -m pip show -q "$other" >/dev/null 2>&1; then
    echo "removing $other from $VENV (faiss comes from the '$extra' extra here)" >&2
    "$VENV/bin/python" -m pip uninstall -q -y "$other" >&2
  fi
  "$VENV/bin/python" -m pip install -q -e ".[$extra,timm,test,plot]" >&2
}

ensure_venv() {
  local stamp="$VENV/.advbct-installed" want extra have=""
  want="$(faiss_extra)" || exit 2
  extra="$want"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV ..." >&2
    python3 -m venv "$VENV"
  fi
  # the stamp holds the faiss extra wanted (then the one installed): a venv moved to a machine of the other
  # kind is reinstalled
  if [[ -f "$stamp" ]]; then read -r have _ <"$stamp" || true; fi  # (a stamp of older scripts is empty)
  if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || "$have" != "$want" ]]; then
    echo "installing advbct and its dependencies into $VENV (faiss: '$extra' extra; first run: a few minutes) ..." >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    if ! _install_extra "$extra"; then
      if [[ "$extra" != gpu ]]; then
        echo "error: pip install -e \".[$extra,timm,test,plot]\" into $VENV failed (output above)" >&2
        exit 1
      fi
      # no faiss-gpu-cu12 wheel for this Python or platform: exact search then runs on the CPU
      echo "note: faiss-gpu-cu12 could not be installed (wheels: Linux, Python 3.10-3.13); installing faiss-cpu" >&2
      extra=cpu
      _install_extra cpu || { echo "error: pip install -e \".[cpu,timm,test,plot]\" into $VENV failed" >&2; exit 1; }
    fi
    echo "$want $extra" >"$stamp"
  fi
}
