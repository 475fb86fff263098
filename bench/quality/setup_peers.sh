#!/usr/bin/env bash
# Creates (idempotently) bench/.venv-peers with the peer baselines of bench/quality: RecBole 1.2.1 and Surprise.
# torch goes in first and alone, pinned, so the CPU wheel is taken and recbole's "torch>=..." is already met.
set -euo pipefail
bench_dir="$(cd "$(dirname "$0")/.." && pwd)"
venv="$bench_dir/.venv-peers"
requirements="$bench_dir/quality/peers-requirements.txt"
stamp="$venv/.requirements.sha256"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    echo "peers venv up to date: $venv"
    exit 0
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "$(grep -E '^torch==' "$requirements")"
"$venv/bin/pip" install --quiet -r "$requirements"
"$venv/bin/python" -c "import recbole, surprise, torch, numpy; assert numpy.__version__ < '2'"
echo "$wanted" > "$stamp"
echo "peers venv ready: $venv"
