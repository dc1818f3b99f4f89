#!/usr/bin/env bash
# Sets everything up on a fresh machine, starts `sp-serve serve` on the default model
# (SmolLM2-135M-Instruct, 2 CPU ranks), asks it a question with the openai client and prints
# the answer. The server keeps serving on http://127.0.0.1:8000 until Ctrl-C (QUICKSTART_ONCE=1:
# stop after the answer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT=${PORT:-8000}
sp-serve serve --sp-size 2 --port "$PORT" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
python3 - "$PORT" <<'PY'
import sys, time, httpx, openai
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):  # the first start converts the model (~30 s) and calibrates the scheduler
    try:
        if httpx.get(base + "/health").status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
client = openai.OpenAI(base_url=base + "/v1", api_key="none")
model = client.models.list().data[0].id
question = "What is the capital of France?"
reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       max_tokens=32, temperature=0)
print(f"\n{question}\n{model} ({reply.usage.completion_tokens} tokens): {reply.choices[0].message.content}")
print(f"server: {base}/v1  (Ctrl-C to stop)")
PY
if [ "${QUICKSTART_ONCE:-0}" != 1 ]; then wait $server; fi
