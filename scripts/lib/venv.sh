# Sourced by the scripts: make sure ./.venv exists with the project installed (pip install -e .).
VENV="${ADVBCT_VENV:-.venv}"

ensure_venv() {
  local stamp="$VENV/.advbct-installed"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV ..." >&2
    python3 -m venv "$VENV"
  fi
  if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    echo "installing advbct and its dependencies into $VENV (first run: a few minutes) ..." >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e ".[test,plot]" >&2
    touch "$stamp"
  fi
}
