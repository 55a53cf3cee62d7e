"""The official `ollama` and `openai` clients pointed at BASE (an agent's local Ollama port, e.g.
http://127.0.0.1:11434), exactly as an agent would use them: no Host override, no extra
headers. Generate and chat, streamed and not; prints one JSON object with the texts received.
"""
import json
import sys

import ollama
import openai


def main():
    base = sys.argv[1]
    out = {}
    client = ollama.Client(host=base)
    out["tags"] = [m.model for m in client.list().models]
    out["generate"] = client.generate(model="fake", prompt="generate", stream=False).response
    out["generate_stream"] = "".join(
        part.response for part in client.generate(model="fake", prompt="generate-stream", stream=True)
    )
    messages = [{"role": "user", "content": "hello"}]
    out["chat"] = client.chat(model="fake", messages=messages, stream=False).message.content
    out["chat_stream"] = "".join(
        part.message.content for part in client.chat(model="fake", messages=messages, stream=True)
    )

    oa = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    done = oa.chat.completions.create(model="fake", messages=messages)
    out["openai_chat"] = done.choices[0].message.content
    stream = oa.chat.completions.create(model="fake", messages=messages, stream=True)
    out["openai_chat_stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
