#!/usr/bin/env bash
# The one-shot GPU check as one command on a machine without network (see bench/gpu_check.py's docstring):
# installs the wheels carried in .whl/ (lm-eval 0.4.13 and its missing pure-Python deps, torchao) into a
# temporary folder when those packages are not importable, then runs bench/gpu_check.py with the given flags.
#     bash bench/gpu_check.sh [--budget-s 420] [--peak-tflops N] ...
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-$(mktemp -d /tmp/gpu_check_site.XXXXXX)}
missing=$($PY -c "
import importlib.util as u
print(' '.join(n for n in ('lm_eval', 'datasets', 'dill', 'multiprocess', 'torchao') if u.find_spec(n) is None))")
if [ -n "$missing" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: missing Python packages ($missing) and no wheels in $WHEELS/: run 'python bench/gpu_check.py --prepare' on a machine with PyPI access and bring $WHEELS/ along" >&2
    exit 2
  fi
  echo "gpu_check: installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE (missing: $missing)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 3
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" bench/gpu_check.py "$@"
