#!/usr/bin/env bash
# Install Triton's perf_analyzer into bench/.peers/perf_analyzer (its own venv: it pins
# numpy < 2). The newest build that runs on glibc 2.36 is the one inside
# tritonclient[all]==2.51.0; its binary links libcudart (from a PyPI wheel; no GPU needed)
# and libb64 (a Debian package). Prints the path of a wrapper script that sets
# LD_LIBRARY_PATH and runs the binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.peers/perf_analyzer"
if [ ! -x "$venv/bin/perf_analyzer" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "tritonclient[all]==2.51.0" "nvidia-cuda-runtime-cu12"
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
  if command -v apt-get >/dev/null; then
    (apt-get install -y -q libb64-0d >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null; })
  fi
fi
cudart=$("$venv/bin/python" -c "import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], 'lib'))")
cat > "$venv/run" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$venv/bin/perf_analyzer" "\$@"
WRAP
chmod +x "$venv/run"
"$venv/run" --version >/dev/null 2>&1 || "$venv/run" -h >/dev/null 2>&1 || {
  echo "perf_analyzer does not run: see PEERS notes in bench/README.md" >&2; exit 1; }
echo "$venv/run"
