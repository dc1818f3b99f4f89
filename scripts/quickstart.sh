#!/usr/bin/env bash
# Sets everything up on a fresh machine, starts `sp-serve serve` on the built-in tiny model
# (2 CPU ranks), sends it one chat request with the openai client and prints the answer.
# The server keeps serving on http://127.0.0.1:8000 until Ctrl-C (QUICKSTART_ONCE=1: stop after
# the answer).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
PORT=${PORT:-8000}
sp-serve serve --sp-size 2 --port "$PORT" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
python3 - "$PORT" <<'PY'
import sys, time, httpx, openai
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):
    try:
        if httpx.get(base + "/health").status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
client = openai.OpenAI(base_url=base + "/v1", api_key="none")
model = client.models.list().data[0].id
reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                       max_tokens=16, temperature=0)
print(f"\nmodel {model} answered ({reply.usage.completion_tokens} tokens): {reply.choices[0].message.content!r}")
print(f"server: {base}/v1  (random weights, so the text is noise; Ctrl-C to stop)")
PY
if [ "${QUICKSTART_ONCE:-0}" != 1 ]; then wait $server; fi
